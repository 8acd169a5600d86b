"""fisher_fast.interference: a hand-worked 2 x 2 example, the identities of SPEC §6, the F̂ and
ε options, top-k order and ids, the store path, bad input.
"""

from __future__ import annotations

import os

import pytest
import torch

from fisher_fast.attention.layouts import AttentionLayout, LayerAttention
from fisher_fast.interference import interference_from_units
from fisher_fast.results import PerUnit
from fisher_fast.store.contribution_store import ContributionStore
from fisher_ref.testing.tolerances import tolerance

RTOL, ATOL = tolerance("float64-paths")
SCALAR_RTOL, SCALAR_ATOL = tolerance("float64-scalar")


def _layout(d_in=1, heads=2, kv=1):
    """One separate/linear layer with head_dim 1: q [H, d_in], k, v [kv, d_in], o [1, H]."""
    la = LayerAttention(index=0, module="m", o_module="m.o", kind="declared", packing="separate",
                        orientation="linear", q="q", k="k", v="v", o="o", q_bias=None,
                        k_bias=None, v_bias=None, o_bias=None, num_heads=heads,
                        num_kv_heads=kv, head_dim=1)
    return AttentionLayout(kind="declared", layers=(la,))


def _units(q, ids, d_in=1, heads=2, kv=1, rest=None):
    """PerUnit with the given q gradients [N, H, d_in]; k, v, o zero unless ``rest`` seeds them."""
    n = len(ids)
    g = torch.Generator().manual_seed(rest) if rest is not None else None
    other = (lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)) if g else \
        (lambda *s: torch.zeros(*s, dtype=torch.float64))
    t = {"q": torch.as_tensor(q, dtype=torch.float64).reshape(n, heads, d_in),
         "k": other(n, kv, d_in), "v": other(n, kv, d_in), "o": other(n, 1, heads)}
    return PerUnit(tensors=t, ids=list(ids), weights=torch.ones(n, dtype=torch.float64))


GA = _units([[1.0, 2.0], [3.0, 0.0]], ["a_0", "a_1"])
GB = _units([[-2.0, 1.0], [1.0, 4.0]], ["b_0", "b_1"])
# C_A = [[1, 4], [9, 0]], F̂_A = [5, 2]; M_Q[i, j, h] = C_i[h] / F̂[h] * |g_j[h]|
M_Q = torch.tensor([[[0.4, 2.0], [0.2, 8.0]], [[3.6, 0.0], [1.8, 0.0]]], dtype=torch.float64)


def test_hand_worked_two_by_two():
    res = interference_from_units(_layout(), GA, GB, eps=0.0)
    torch.testing.assert_close(res["Q"][:, :, 0, :], M_Q, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(res.means["Q"][0], M_Q.mean(dim=(0, 1)), rtol=RTOL, atol=ATOL)
    assert res.ids_a == ["a_0", "a_1"] and res.ids_b == ["b_0", "b_1"]


def test_signed_mode_keeps_the_sign_of_g_b():
    res = interference_from_units(_layout(), GA, GB, eps=0.0, signed=True)
    sign = torch.tensor([[-1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # sign(g_B[j, h])
    torch.testing.assert_close(res["Q"][:, :, 0, :], M_Q * sign[None], rtol=RTOL, atol=ATOL)


def test_signed_top_k_ranks_by_magnitude_and_keeps_sign():
    res = interference_from_units(_layout(), GA, GB, eps=0.0, signed=True, top_k=3)
    assert [(e["score"], e["id_a"], e["id_b"], e["head"]) for e in res.top_k] == [
        pytest.approx((8.0, "a_0", "b_1", 1)), pytest.approx((-3.6, "a_1", "b_0", 0)),
        pytest.approx((2.0, "a_0", "b_0", 1))]


def test_zero_contribution_over_zero_fisher_is_zero():
    zero = {n: torch.zeros(t.shape[1:], dtype=torch.float64) for n, t in GA.tensors.items()}
    res = interference_from_units(_layout(), GA, GB, fisher=zero, eps=0.0)
    assert torch.equal(res["K"], torch.zeros_like(res["K"]))       # C_A = 0 there
    assert torch.isinf(res["Q"]).any() and not torch.isnan(res["Q"]).any()


def test_pair_and_unknown_id():
    res = interference_from_units(_layout(), GA, GB, eps=0.0)
    torch.testing.assert_close(res.pair("a_1", "b_0")["Q"][0], M_Q[1, 0], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="got unknown id 'a_2'"):
        res.pair("a_2", "b_0")


def test_top_k_order_ids_and_ties():
    res = interference_from_units(_layout(), GA, GB, eps=1e-12, top_k=8)
    got = [(e["block"], e["layer"], e["head"], e["id_a"], e["id_b"]) for e in res.top_k]
    assert got[:4] == [("Q", 0, 1, "a_0", "b_1"), ("Q", 0, 0, "a_1", "b_0"),
                       ("Q", 0, 1, "a_0", "b_0"), ("Q", 0, 0, "a_1", "b_1")]
    assert got[4:6] == [("Q", 0, 0, "a_0", "b_0"), ("Q", 0, 0, "a_0", "b_1")]
    # zeros tie: (block, layer, head, i, j) order
    assert got[6:] == [("Q", 0, 1, "a_1", "b_0"), ("Q", 0, 1, "a_1", "b_1")]
    assert res.top_k[0]["score"] == pytest.approx(8.0, rel=SCALAR_RTOL, abs=SCALAR_ATOL)


def test_identity_mean_over_a_is_l1_norm_of_g_b():
    ga, gb = _units(torch.randn(4, 2, 3).tolist(), range(4), d_in=3, rest=1), \
        _units(torch.randn(3, 2, 3).tolist(), "xyz", d_in=3, rest=2)
    res = interference_from_units(_layout(d_in=3), ga, gb, eps=0.0)
    l1_q = gb.tensors["q"].abs().sum(-1)                                    # [N_B, H]
    l1_k = gb.tensors["k"].abs().sum(-1).expand(-1, 2)                       # shared kv head
    torch.testing.assert_close(res["Q"].mean(0)[:, 0], l1_q, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(res["K"].mean(0)[:, 0], l1_k, rtol=RTOL, atol=ATOL)


def test_heads_sum_to_unsliced_block_score():
    ga, gb = _units(torch.randn(2, 2, 3).tolist(), [0, 1], d_in=3, rest=3), \
        _units(torch.randn(2, 2, 3).tolist(), [0, 1], d_in=3, rest=4)
    res = interference_from_units(_layout(d_in=3), ga, gb, eps=1e-3)
    for block, name in (("Q", "q"), ("O", "o")):
        c = ga.tensors[name].square()
        w = c / (c.mean(0) + 1e-3)
        whole = torch.einsum("ip,jp->ij", w.flatten(1), gb.tensors[name].abs().flatten(1))
        torch.testing.assert_close(res[block].sum(-1)[:, :, 0], whole, rtol=RTOL, atol=ATOL)


def test_linear_in_c_a_and_in_abs_g_b():
    base = interference_from_units(_layout(), GA, GB, fisher="b")
    ga3 = PerUnit({n: 3 * t for n, t in GA.tensors.items()}, GA.ids, GA.weights)
    gb2 = PerUnit({n: -2 * t for n, t in GB.tensors.items()}, GB.ids, GB.weights)
    torch.testing.assert_close(interference_from_units(_layout(), ga3, GB, fisher="b")["Q"],
                               9 * base["Q"], rtol=RTOL, atol=ATOL)
    fb = {n: GB.tensors[n].square().mean(0) for n in GB.tensors}  # F̂ held at that of GB
    torch.testing.assert_close(interference_from_units(_layout(), GA, gb2, fisher=fb)["Q"],
                               2 * base["Q"], rtol=RTOL, atol=ATOL)


def test_fisher_options_by_hand():
    ones = {n: torch.ones(t.shape[1:], dtype=torch.float64) for n, t in GA.tensors.items()}
    given = interference_from_units(_layout(), GA, GB, fisher=ones, eps=0.0)["Q"][:, :, 0]
    c = GA.tensors["q"][..., 0].square()
    torch.testing.assert_close(given, c[:, None, :] * GB.tensors["q"][..., 0].abs()[None],
                               rtol=RTOL, atol=ATOL)
    pooled = interference_from_units(_layout(), GA, GB, fisher="pooled", eps=0.0)["Q"][:, :, 0]
    f = (c.sum(0) + GB.tensors["q"][..., 0].square().sum(0)) / 4          # [5+... ] / 4 units
    torch.testing.assert_close(pooled, given / f, rtol=RTOL, atol=ATOL)


def test_ridge_uses_the_slice_median():
    ga = _units([[[1.0, 3.0], [2.0, 4.0]]], ["a"], d_in=2)                # C_A = [[1, 9], [4, 16]]
    res = interference_from_units(_layout(d_in=2), ga, ga, eps=0.5, ridge_rel=0.1)
    torch.testing.assert_close(res.eps["Q"][0], torch.tensor([0.5 + 0.1 * 5.0, 0.5 + 0.1 * 10.0],
                                                             dtype=torch.float64), rtol=RTOL, atol=ATOL)


def test_store_path_matches_and_fills_store(tmp_path):
    store = ContributionStore(tmp_path, device="cpu", device_bytes=0, host_bytes=40)
    plain = interference_from_units(_layout(), GA, GB)
    stored = interference_from_units(_layout(), GA, GB, store=store, task_a="A", score_rows=1)
    for b in "QKVO":
        torch.testing.assert_close(stored[b], plain[b], rtol=0, atol=0)
    assert store.ids("A") == ["a_0", "a_1"] and store.tier_of("A", "a_0") == "disk"
    torch.testing.assert_close(store.get("A", "a_1")["q"], GA.tensors["q"][1].square(), rtol=0, atol=0)


BAD = [
    pytest.param(dict(gb=PerUnit({"q": GB.tensors["q"]}, GB.ids, GB.weights)),
                 "tasks measured on different models", id="different-models"),
    pytest.param(dict(fisher="c"), "fisher: expected one of", id="fisher-choice"),
    pytest.param(dict(fisher={"q": torch.ones(2, 1)}), "got none for 'k'", id="fisher-dict-missing"),
    pytest.param(dict(fisher={n: torch.ones(3) for n in "qkvo"}), "shape mismatch", id="fisher-dict-shape"),
    pytest.param(dict(fisher={n: torch.full((2, 1) if n != "o" else (1, 2), float("nan")) for n in "qkvo"}),
                 "expected finite, non-negative values", id="fisher-dict-nan"),
    pytest.param(dict(fisher={n: -torch.ones((2, 1) if n != "o" else (1, 2)) for n in "qkvo"}),
                 "expected finite, non-negative values", id="fisher-dict-negative"),
    pytest.param(dict(eps=-1.0), "eps: expected a finite number >= 0", id="eps"),
    pytest.param(dict(ridge_rel=float("nan")), "ridge_rel", id="ridge-nan"),
    pytest.param(dict(top_k=-1), "top_k", id="top-k"),
    pytest.param(dict(signed="yes"), "signed: expected a bool", id="signed"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError) as err:
        interference_from_units(_layout(), GA, kwargs.pop("gb", GB), **kwargs)
    assert message in str(err.value)


# --------------------------------------------------------------------- on a real model


def _llama_case():
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=2, hidden=12),
                        dtype=torch.float64)
    a = random_batch(vocab_size=11, batch_size=3, seq_len=5, seed=1, sample_ids=["x_1", "x_2", "x_3"])
    b = random_batch(vocab_size=11, batch_size=3, seq_len=5, seed=2, empty_rows=(1,))
    return model, a, b


def test_model_identity_and_ids_with_empty_rows():
    from fisher_fast.attention.slicing import qkov_mask
    from fisher_fast.interference import interference
    from fisher_fast.per_sample import per_sample_gradients

    model, a, b = _llama_case()
    res = interference(model, a, b, eps=0.0, dtype=torch.float64)
    assert res.ids_a == ["x_1", "x_2", "x_3"] and res.ids_b == [0, 2]      # row 1 of B is empty
    gb = per_sample_gradients(model, b, dtype=torch.float64)
    for layer, head, block in ((0, 3, "Q"), (1, 2, "V"), (1, 0, "O")):
        l1 = sum((gb.tensors[n].abs() * m).flatten(1).sum(1)
                 for n, m in qkov_mask(model, layer, head, block).items())
        torch.testing.assert_close(res[block][:, :, layer, head].mean(0), l1, rtol=RTOL, atol=ATOL)


@pytest.mark.gpu
def test_model_interference_on_cuda_with_gpu_store(device, tmp_path):
    from fisher_fast.interference import interference

    model, a, b = _llama_case()
    cpu = interference(model, a, b, dtype=torch.float64, signed=True)
    on_dev = lambda batch: {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}  # noqa: E731
    store = ContributionStore(tmp_path, device=device, device_bytes=2_000, host_bytes=2_000)
    gpu = interference(model.to(device), on_dev(a), on_dev(b), dtype=torch.float64, signed=True,
                       store=store, chunk_size=1)
    for blk in "QKVO":
        torch.testing.assert_close(gpu[blk].cpu(), cpu[blk], rtol=RTOL, atol=ATOL)
    assert {store.tier_of("a", i) for i in store.ids("a")} <= {"device", "host", "disk"}


@pytest.mark.parametrize("fisher", ["a", "b", "pooled"])
def test_model_interference_streams_task_a_through_the_store(tmp_path, monkeypatch, fisher):
    # with a store, A's gradients are computed a chunk (here one unit) at a time, filed,
    # and summed into F̂ as they go: the scores equal the in-memory path's
    from fisher_fast.interference import interference
    from fisher_fast.per_sample import per_sample_gradients

    model, a, b = _llama_case()
    plain = interference(model, a, b, dtype=torch.float64, fisher=fisher)
    store = ContributionStore(tmp_path, device="cpu", device_bytes=0, host_bytes=2_000)
    calls = []
    add = store.add
    monkeypatch.setattr(store, "add", lambda task, ids, t: calls.append(list(ids)) or add(task, ids, t))
    streamed = interference(model, a, b, dtype=torch.float64, fisher=fisher, store=store,
                            chunk_size=1, task_a="A")
    assert calls == [[i] for i in plain.ids_a]  # one chunk at a time
    assert streamed.ids_a == plain.ids_a and store.ids("A") == plain.ids_a
    rtol, atol = tolerance("float64-reorder-signed")
    for blk in "QKVO":
        torch.testing.assert_close(streamed[blk], plain[blk], rtol=rtol, atol=atol)
    name = store.parameter_names("A")[0]
    g = per_sample_gradients(model, a, dtype=torch.float64).tensors[name]
    torch.testing.assert_close(store.get("A", plain.ids_a[0])[name], g[0].square(),
                               rtol=RTOL, atol=ATOL)


def test_a_failed_streamed_interference_leaves_the_store_unchanged(tmp_path):
    from fisher_fast.interference import interference

    model, a, b = _llama_case()
    store = ContributionStore(tmp_path, device="cpu", device_bytes=0, host_bytes=0)
    store.add("other", ["x"], {"w": torch.ones(1, 3)})
    before = sorted(os.listdir(tmp_path)), store.tasks(), store.usage()
    with pytest.raises(ValueError, match="fisher: expected a tensor for every slice parameter"):
        interference(model, a, b, dtype=torch.float64, fisher={"nope": torch.zeros(1)},
                     store=store, chunk_size=1)  # fails after A's chunks were filed
    assert (sorted(os.listdir(tmp_path)), store.tasks(), store.usage()) == before


def test_score_rows_is_the_scoring_step_and_chunk_size_the_forward_chunk(tmp_path):
    """``score_rows`` (A's units scored at a time) and ``chunk_size`` (forward rows) are two
    options: any of either gives the same scores, with and without a store.
    """
    from fisher_fast.interference import interference

    model, a, b = _llama_case()
    plain = interference(model, a, b, dtype=torch.float64)
    for kw in (dict(score_rows=1), dict(chunk_size=1), dict(chunk_size=2, score_rows=3),
               dict(store=ContributionStore(tmp_path / "s", device="cpu"), chunk_size=3,
                    score_rows=1)):
        got = interference(model, a, b, dtype=torch.float64, **kw)
        for blk in "QKVO":
            torch.testing.assert_close(got[blk], plain[blk], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="score_rows: expected a positive int"):
        interference(model, a, b, score_rows=0)
