"""QK-OV interference: a hand-worked example, linearity, head sums, the SPEC §6 identity."""

from itertools import pairwise

import pytest
import torch

from fisher_ref.interference import interference, interference_from_gradients
from fisher_ref.layouts import AttentionLayout, LayerAttention, attention_layout
from fisher_ref.results import PerUnit
from fisher_ref.slicing import qkov_mask
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance
from fisher_ref.units import per_sample_gradients

RTOL, ATOL = tolerance("float64-paths")
CAST = dict(zip(("rtol", "atol"), tolerance("float64-cast-placement"), strict=True))

# one layer, separate projections, H = H_kv = 2, head_dim = 1, d = 2
HAND = AttentionLayout("declared", (LayerAttention(
    index=0, module="attn", o_module="attn.o", kind="declared", packing="separate",
    orientation="linear", q="q", k="k", v="v", o="o", q_bias=None, k_bias=None, v_bias=None,
    o_bias=None, num_heads=2, num_kv_heads=2, head_dim=1),))


def _units(q_row0, ids):
    """PerUnit whose only nonzero gradient entries are row 0 of q (head 0's query)."""
    n = len(q_row0)
    q = torch.zeros(n, 2, 2, dtype=torch.float64)
    q[:, 0] = torch.tensor(q_row0, dtype=torch.float64)
    t = {"q": q} | {k: torch.zeros(n, 2, 2, dtype=torch.float64) for k in ("k", "v", "o")}
    return PerUnit(t, ids, torch.ones(n, dtype=torch.float64))


A = _units([[1.0, 2.0], [3.0, 0.0]], ["a_1", "a_2"])  # F_A on row 0 = [(1+9)/2, (4+0)/2] = [5, 2]
B = _units([[2.0, -1.0], [0.0, 4.0]], [10, "b_2"])


def test_hand_worked_two_by_two():
    r = interference_from_gradients(A, B, HAND, eps=0.0)
    # M[i, j] = C_i[0]/5 |g_j[0]| + C_i[1]/2 |g_j[1]|
    expected = torch.tensor([[1 / 5 * 2 + 4 / 2 * 1, 1 / 5 * 0 + 4 / 2 * 4],
                             [9 / 5 * 2 + 0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(r["Q"][:, :, 0, 0], expected, rtol=RTOL, atol=ATOL)
    assert float(r["Q"][:, :, 0, 1].abs().sum()) == 0 and float(r["O"].abs().sum()) == 0
    assert [(e["id_a"], e["id_b"], e["block"], e["head"]) for e in r.top_k[:3]] == [
        ("a_1", "b_2", "Q", 0), ("a_2", 10, "Q", 0), ("a_1", 10, "Q", 0)]
    assert r.top_k[0]["score"] == pytest.approx(8.0)
    torch.testing.assert_close(r.pair("a_2", 10)["Q"][0, 0], expected[1, 0])


def test_hand_worked_signed_pooled_and_ridge():
    signed = interference_from_gradients(A, B, HAND, eps=0.0, signed=True)
    assert float(signed["Q"][0, 0, 0, 0]) == pytest.approx(1 / 5 * 2 - 4 / 2 * 1)
    pooled = interference_from_gradients(A, B, HAND, eps=0.0, fisher="pooled")
    # F pooled on row 0 = [(1 + 9 + 4 + 0)/4, (4 + 0 + 1 + 16)/4] = [3.5, 5.25]
    assert float(pooled["Q"][0, 0, 0, 0]) == pytest.approx(1 / 3.5 * 2 + 4 / 5.25 * 1)
    from_b = interference_from_gradients(A, B, HAND, eps=0.0, fisher="b")
    # F_B on row 0 = [(4 + 0)/2, (1 + 16)/2] = [2, 8.5]
    assert float(from_b["Q"][0, 0, 0, 0]) == pytest.approx(1 / 2 * 2 + 4 / 8.5 * 1)
    # slice entries of F_A: [5, 2] -> median 3.5; eps = 0.25 + 1 * 3.5
    ridge = interference_from_gradients(A, B, HAND, eps=0.25, ridge_rel=1.0)
    assert float(ridge["Q"][0, 0, 0, 0]) == pytest.approx(1 / 8.75 * 2 + 4 / 5.75 * 1)
    given = interference_from_gradients(A, B, HAND, eps=0.0,
                                        fisher={n: torch.ones(2, 2) for n in "qkvo"})
    assert float(given["Q"][1, 0, 0, 0]) == pytest.approx(9 * 2 + 0)


def _random_units(model, n, seed, ids=None):
    g = torch.Generator().manual_seed(seed)
    t = {name: torch.randn(n, *p.shape, generator=g, dtype=torch.float64)
         for name, p in model.named_parameters()}
    return PerUnit(t, list(range(n)) if ids is None else ids, torch.ones(n, dtype=torch.float64))


PHI3 = TinyConfig(arch="phi3", num_layers=2, num_heads=4, num_kv_heads=2)  # fused, GQA r = 2


@pytest.fixture(scope="module")
def phi3():
    model = build_model(PHI3)
    return model, attention_layout(model)


def test_abs_mode_is_nonnegative_and_means_match(phi3):
    model, lay = phi3
    r = interference_from_gradients(_random_units(model, 3, 0), _random_units(model, 2, 1), lay)
    for block, m in r.items():
        assert m.shape == (3, 2, 2, 4) and bool((m >= 0).all())
        torch.testing.assert_close(r.means[block], m.mean(dim=(0, 1)), rtol=RTOL, atol=ATOL)


def test_linear_in_contributions_and_in_abs_gradients(phi3):
    model, lay = phi3
    a, b = _random_units(model, 2, 0), _random_units(model, 2, 1)
    f_hat = {n: t[0].square() + 1.0 for n, t in a.tensors.items()}  # fixed F-hat
    # unit 2 of A has C = C_0 + 4 C_1; unit 2 of B has |g| = 3 |g_0| + |g_1|
    a3 = PerUnit({n: torch.cat([t, (t[0].square() + 4 * t[1].square()).sqrt()[None]])
                  for n, t in a.tensors.items()}, [0, 1, 2], torch.ones(3, dtype=torch.float64))
    b3 = PerUnit({n: torch.cat([t, -(3 * t[0].abs() + t[1].abs())[None]]) for n, t in b.tensors.items()},
                 [0, 1, 2], torch.ones(3, dtype=torch.float64))
    r = interference_from_gradients(a3, b3, lay, fisher=f_hat)
    for m in r.values():
        torch.testing.assert_close(m[2], m[0] + 4 * m[1], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(m[:, 2], 3 * m[:, 0] + m[:, 1], rtol=RTOL, atol=ATOL)


def test_head_sum_equals_the_unsliced_block(phi3):
    model, lay = phi3
    a, b = _random_units(model, 2, 0), _random_units(model, 3, 1)
    r = interference_from_gradients(a, b, lay)
    H, dh, r_kv = 4, 4, 2
    rows = {"Q": slice(0, H * dh), "K": slice(H * dh, H * dh + 2 * dh), "V": slice(H * dh + 2 * dh, None)}
    for la in lay.layers:
        F = a.tensors[la.q].square().mean(0)
        for block, rs in rows.items():
            ca, fb, gb = a.tensors[la.q][:, rs].square(), F[rs], b.tensors[la.q][:, rs].abs()
            whole = torch.einsum("ipq,pq,jpq->ij", ca, 1 / (fb + 1e-12), gb)
            repeats = 1 if block == "Q" else r_kv  # query heads sharing one K/V slice
            torch.testing.assert_close(r[block][:, :, la.index].sum(-1), repeats * whole,
                                       rtol=RTOL, atol=ATOL)
        Fo = a.tensors[la.o].square().mean(0)
        whole_o = torch.einsum("ipq,pq,jpq->ij", a.tensors[la.o].square(), 1 / (Fo + 1e-12),
                               b.tensors[la.o].abs())
        torch.testing.assert_close(r["O"][:, :, la.index].sum(-1), whole_o, rtol=RTOL, atol=ATOL)


def test_spec_identity_mean_over_a_is_l1_norm_of_g_b():
    model = build_model(TinyConfig(arch="llama", num_layers=1, num_heads=4, num_kv_heads=2))
    ba = random_batch(batch_size=3, seed=1, sample_ids=["x_1", "x_2", "x_3"])
    bb = random_batch(batch_size=2, seed=2)
    r = interference(model, ba, bb, eps=0.0)
    gb = per_sample_gradients(model, bb)
    for block in ("Q", "K", "V", "O"):
        for h in range(4):
            masks = qkov_mask(model, 0, h, block)
            l1 = sum(gb.tensors[n][:, m].abs().sum(1) for n, m in masks.items())
            torch.testing.assert_close(r[block][:, :, 0, h].mean(0), l1, rtol=RTOL, atol=ATOL)
    assert r.ids_a == ["x_1", "x_2", "x_3"] and {e["id_a"] for e in r.top_k} <= set(r.ids_a)


def test_top_k_ties_follow_block_layer_head_order(phi3):
    model, lay = phi3
    r = interference_from_gradients(_random_units(model, 1, 0), _random_units(model, 1, 1), lay,
                                    top_k=1000)
    keys = [(e["score"], "QKVO".index(e["block"]), e["layer"], e["head"]) for e in r.top_k]
    assert len(keys) == 4 * 2 * 4
    assert all(k1[0] > k2[0] or (k1[0] == k2[0] and k1[1:] < k2[1:]) for k1, k2 in pairwise(keys))
    # K and V heads sharing a kv head tie exactly
    assert sum(k1[0] == k2[0] for k1, k2 in pairwise(keys)) >= 8


BAD = [
    pytest.param(lambda: interference_from_gradients(A, PerUnit({"q": B.tensors["q"]}, B.ids, B.weights),
                                                     HAND),
                 "tasks measured on different models", id="different-parameters"),
    pytest.param(lambda: interference_from_gradients(A, PerUnit(B.tensors | {"o": torch.zeros(2, 3, 2)},
                                                                B.ids, B.weights), HAND),
                 "expected 'o' of shape (2, 2) in both, got (3, 2)", id="different-shapes"),
    pytest.param(lambda: interference_from_gradients(A, B, HAND, fisher="c"), "fisher: expected 'a', 'b'",
                 id="unknown-fisher"),
    pytest.param(lambda: interference_from_gradients(A, B, HAND, fisher={"q": torch.ones(3)}),
                 "fisher['q']: expected shape (2, 2)", id="fisher-shape"),
    pytest.param(lambda: interference_from_gradients(A, B, HAND,
                                                     fisher={"q": torch.full((2, 2), float("inf"))}),
                 "fisher['q']: expected finite, non-negative values", id="fisher-inf"),
    pytest.param(lambda: interference_from_gradients(A, B, HAND, fisher={"q": -torch.ones(2, 2)}),
                 "fisher['q']: expected finite, non-negative values", id="fisher-negative"),
    pytest.param(lambda: interference_from_gradients(A, B, HAND, eps=-1.0), "eps: expected a finite",
                 id="negative-eps"),
    pytest.param(lambda: interference_from_gradients(A, B, HAND, top_k=-1), "top_k: expected",
                 id="negative-top-k"),
    pytest.param(lambda: interference_from_gradients(A, B, HAND).pair("a_3", 10),
                 "got unknown id 'a_3'", id="unknown-sample-id"),
    pytest.param(lambda: interference_from_gradients(A, B, HAND).pair("a_1", "10"),
                 "got unknown id '10'", id="string-vs-int-id"),
]


@pytest.mark.parametrize("call, message", BAD)
def test_bad_input(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_float32_gradients_are_computed_in_float64(phi3):
    model, lay = phi3
    a, b = _random_units(model, 2, 0), _random_units(model, 2, 1)
    a32 = PerUnit({n: t.float() for n, t in a.tensors.items()}, a.ids, a.weights.float())
    b32 = PerUnit({n: t.float() for n, t in b.tensors.items()}, b.ids, b.weights.float())
    a64 = PerUnit({n: t.double() for n, t in a32.tensors.items()}, a.ids, a.weights)
    b64 = PerUnit({n: t.double() for n, t in b32.tensors.items()}, b.ids, b.weights)
    got, want = interference_from_gradients(a32, b32, lay), interference_from_gradients(a64, b64, lay)
    for block in want:
        assert got[block].dtype == torch.float64
        torch.testing.assert_close(got[block], want[block], **CAST)


def test_signed_top_k_ranks_by_magnitude_and_keeps_the_sign():
    r = interference_from_gradients(A, B, HAND, eps=0.0, signed=True, top_k=2)
    # signed M on head 0: [[2/5 - 2, 0 + 8], [18/5, 0]] -> |M| order 8, 3.6
    assert [(e["score"], e["id_a"], e["id_b"]) for e in r.top_k] == [
        (pytest.approx(8.0), "a_1", "b_2"), (pytest.approx(3.6), "a_2", 10)]
    r3 = interference_from_gradients(A, B, HAND, eps=0.0, signed=True, top_k=3)
    assert r3.top_k[2]["score"] == pytest.approx(2 / 5 - 2.0)  # -1.6, sign kept


def test_include_bias_adds_the_head_bias_entries_only():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))  # H=2, dh=4, d=8: c_attn.bias [24]
    lay = attention_layout(model)
    a, b = _random_units(model, 2, 0), _random_units(model, 3, 1)
    without = interference_from_gradients(a, b, lay)
    with_bias = interference_from_gradients(a, b, lay, include_bias=True)
    bias = "transformer.h.0.attn.c_attn.bias"
    ga, gb = a.tensors[bias], b.tensors[bias]
    F = ga.square().mean(0)
    for block, start in (("Q", 4), ("K", 8 + 4), ("V", 16 + 4)):  # head 1's entries
        e = slice(start, start + 4)
        extra = torch.einsum("ip,p,jp->ij", ga[:, e].square(), 1 / (F[e] + 1e-12), gb[:, e].abs())
        torch.testing.assert_close(with_bias[block][:, :, 0, 1], without[block][:, :, 0, 1] + extra,
                                   rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(with_bias["O"], without["O"], rtol=0.0, atol=0.0)  # no O bias


def _qwen_with_frozen_q_bias():
    model = build_model(TinyConfig(arch="qwen2", num_heads=2, head_dim=4)).double()
    model.model.layers[0].self_attn.q_proj.bias.requires_grad_(False)
    return model


def test_a_frozen_tensor_outside_the_slices_is_not_needed():
    # include_bias=False: the slices never touch the (frozen) query bias
    model = _qwen_with_frozen_q_bias()
    a, b = random_batch(batch_size=2, seed=1), random_batch(batch_size=2, seed=2)
    got = interference(model, a, b)
    assert got["Q"].shape == (2, 2, 2, 2) and bool(torch.isfinite(got["Q"]).all())


def test_a_frozen_tensor_inside_the_slices_is_a_value_error():
    from fisher_ref.conflicts import conflicts

    model = _qwen_with_frozen_q_bias()
    a, b = random_batch(batch_size=3, seed=1), random_batch(batch_size=2, seed=2)
    with pytest.raises(ValueError, match=r"q_proj.bias: expected the shape .* frozen"):
        conflicts(model, a, b, include_bias=True, n_permutations=10)
