"""fisher_fast's attention half equals the fisher_ref oracle on random tiny transformers.

Layouts, QK-OV masks and head group ids on every architecture; per-sample contributions;
interference in every mode; conflicts (p, q, effect, interval). Models are float64 and
fisher_fast is asked for float64, so everything compares under the "float64-paths"
tolerance, and permutation counts compare exactly.

One documented difference, in how exact ties meet rounding: when N_A = N_B a permutation may
give the *mirror image* of the task split (pseudo-A = B), which has the same pairs and so
the observed statistic exactly; and swapping two units with identical gradients (duplicate
rows) leaves the statistic unchanged. fisher_fast counts both as ties (the mirror exactly,
the rest within ``TIE_ATOL``); the oracle recomputes them in another summation order, so
rounding can put them a hair above the observed value. ``_oracle_p_with_exact_ties``
counts those as the ties they are before comparing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fisher_fast.losses as fl
import fisher_ref.losses as rl
from fisher_fast.attention.layouts import attention_layout as fast_layout
from fisher_fast.attention.slicing import BLOCKS
from fisher_fast.attention.slicing import head_group_ids as fast_group_ids
from fisher_fast.attention.slicing import qkov_mask as fast_mask
from fisher_fast.conflicts import TIE_ATOL
from fisher_fast.conflicts import conflicts as fast_conflicts
from fisher_fast.contributions import per_sample_contributions as fast_contributions
from fisher_fast.interference import interference as fast_interference
from fisher_ref.conflicts import conflicts as ref_conflicts
from fisher_ref.contributions import per_sample_contributions as ref_contributions
from fisher_ref.interference import interference as ref_interference
from fisher_ref.layouts import attention_layout as ref_layout
from fisher_ref.slicing import head_group_ids as ref_group_ids
from fisher_ref.slicing import qkov_mask as ref_mask
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import TinyConfig, build_model, loss_kind
from fisher_ref.testing.strategies import estimator_options
from fisher_ref.testing.tolerances import tolerance
from fisher_ref.units import per_sample_gradients

RTOL, ATOL = tolerance("float64-paths")
NULL_RTOL, NULL_ATOL = tolerance("null-summary")
EFFECT_RTOL, EFFECT_ATOL = tolerance("permutation-effect")
FDR_RTOL, FDR_ATOL = tolerance("fdr-float64")
ROTARY = ("llama", "mistral", "qwen2", "phi3", "gpt_neox")
LOSSES = {"causal": (fl.causal_lm_loss, rl.causal_lm_loss), "mlm": (fl.masked_lm_loss, rl.masked_lm_loss),
          "cls": (fl.sequence_classification_loss, rl.sequence_classification_loss)}


@st.composite
def tiny_configs(draw):
    """A consistent tiny shape: heads, kv ratio, head_dim (even under rotary), then d_model."""
    arch = draw(st.sampled_from(("gpt2", "llama", "mistral", "qwen2", "bert", "bert-cls", "gpt_neox",
                                 "phi3")))
    heads = draw(st.sampled_from((1, 2, 4)))
    gqa = arch in ("llama", "mistral", "qwen2", "phi3")
    kv = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])) if gqa else None
    head_dim = draw(st.sampled_from((2, 4))) if arch != "gpt_neox" else 4
    hidden = None
    if arch in ("llama", "mistral", "qwen2") and draw(st.booleans()):
        hidden = draw(st.sampled_from((8, 12)))            # explicit head_dim != d / H
    bias = arch == "llama" and draw(st.booleans())
    return TinyConfig(arch=arch, num_layers=draw(st.integers(1, 2)), num_heads=heads,
                      num_kv_heads=kv, head_dim=head_dim, hidden=hidden, attention_bias=bias,
                      tie_embeddings=draw(st.booleans()), seed=draw(st.integers(0, 3)))


LOSS_CLASSES = {"causal": "CausalLMLoss", "mlm": "MaskedLMLoss", "cls": "SequenceClassificationLoss"}


def _batches(cfg, n_a, n_b, seed, empty_a=False, reduction=None):
    """Tasks A and B; ``empty_a``: A's second row is empty (listed, never a unit);
    ``reduction``: the losses' reduction (None: the built-in mean losses).
    """
    kind = loss_kind(cfg.arch)
    a = random_batch(kind=kind, vocab_size=cfg.vocab_size, batch_size=n_a, seq_len=5, seed=seed,
                     sample_ids=[f"a_{i}" for i in range(n_a)],
                     empty_rows=(1,) if empty_a and kind != "cls" else ())
    b = random_batch(kind=kind, vocab_size=cfg.vocab_size, batch_size=n_b, seq_len=5, seed=seed + 1)
    if reduction is None:
        fast_loss, ref_loss = LOSSES[kind]
    else:
        fast_loss, ref_loss = (getattr(m, LOSS_CLASSES[kind])(reduction) for m in (fl, rl))
    return a, b, fast_loss, ref_loss


@given(tiny_configs())
def test_layouts_masks_and_group_ids_match(cfg):
    model = build_model(cfg)
    fast, ref = fast_layout(model), ref_layout(model)
    assert [dataclasses.asdict(la) for la in fast.layers] == [dataclasses.asdict(la) for la in ref.layers]
    for la in ref.layers:
        for h in range(la.num_heads):
            for block in BLOCKS:
                for bias in (False, True):
                    got = fast_mask(model, la.index, h, block, include_bias=bias)
                    want = ref_mask(model, la.index, h, block, include_bias=bias)
                    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    got, want = fast_group_ids(model), ref_group_ids(model)
    assert got.keys() == want.keys()
    for n in want:
        assert got[n][1] == want[n][1] and torch.equal(got[n][0], want[n][0]), n


@given(tiny_configs(), st.sampled_from(("sample", "token")), st.integers(0, 50),
       st.sampled_from((None, 1, 2)))
def test_per_sample_contributions_match(cfg, unit, seed, chunk):
    # chunk: None computes them at once; 1 or 2 streams them into a store chunk by chunk
    from fisher_fast.store.contribution_store import ContributionStore

    model = build_model(cfg, dtype=torch.float64)
    a, _, fast_loss, ref_loss = _batches(cfg, 3, 1, seed)
    store = None if chunk is None else ContributionStore(device="cpu")
    got = fast_contributions(model, a, loss_fn=fast_loss, unit=unit, dtype=torch.float64,
                             store=store, chunk_size=chunk)
    want = ref_contributions(model, a, loss_fn=ref_loss, unit=unit)
    if store is not None:
        assert store.ids("default") == want.ids
        assert_dicts_close(store.get_stacked("default", want.ids), want.tensors, rtol=RTOL,
                           atol=ATOL, what="stored contributions")
    assert got.ids == want.ids and got.empty_ids == want.empty_ids
    torch.testing.assert_close(got.weights.double().cpu(), want.weights, rtol=0, atol=0)
    assert_dicts_close(got.tensors, want.tensors, rtol=RTOL, atol=ATOL, what="contributions")


def _top_k_key(e):
    return e["block"], e["layer"], e["head"], e["id_a"], e["id_b"]


def _assert_top_k_match(got, want):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["score"] == pytest.approx(w["score"], rel=RTOL, abs=ATOL), k
        if _top_k_key(g) != _top_k_key(w):  # only a near-tie may reorder: its partner has the same score
            partner = next(e for e in want if _top_k_key(e) == _top_k_key(g))
            assert partner["score"] == pytest.approx(g["score"], rel=RTOL, abs=ATOL), (k, g, w)


@given(tiny_configs(), st.sampled_from(("a", "b", "pooled", "given")), st.booleans(),
       st.sampled_from((0.0, 0.3)), st.booleans(), st.integers(0, 50), estimator_options(),
       st.booleans(), st.sampled_from((None, 1, 2)))
def test_interference_matches(cfg, fisher, signed, ridge_rel, include_bias, seed, opts, empty, chunk):
    model = build_model(cfg, dtype=torch.float64)
    a, b, fast_loss, ref_loss = _batches(cfg, 3, 2, seed, empty, opts["reduction"])
    if fisher == "given":
        g = torch.Generator().manual_seed(seed)
        fisher = {n: torch.rand(p.shape, generator=g, dtype=torch.float64)
                  for n, p in model.named_parameters()}
    kw = dict(fisher=fisher, signed=signed, ridge_rel=ridge_rel, include_bias=include_bias, top_k=20,
              unit=opts["unit"], weighting=opts["weighting"])
    got = fast_interference(model, a, b, loss_fn=fast_loss, dtype=torch.float64, chunk_size=chunk, **kw)
    want = ref_interference(model, a, b, loss_fn=ref_loss, **kw)
    assert got.ids_a == want.ids_a and got.ids_b == want.ids_b
    assert_dicts_close(dict(got), dict(want), rtol=RTOL, atol=ATOL, what="interference blocks")
    assert_dicts_close(got.means, want.means, rtol=RTOL, atol=ATOL, what="interference means")
    _assert_top_k_match(got.top_k, want.top_k)


def _oracle_p_with_exact_ties(res, n_a, n_b):
    """Oracle p-values, counting the split, its mirror and rounding-level ties as ties."""
    rng = np.random.Generator(np.random.PCG64(res.seed))
    n = n_a + n_b
    firsts = [frozenset(rng.permutation(n)[:n_a]) for _ in range(res.n_permutations)]
    split = {frozenset(range(n_a))} | ({frozenset(range(n_a, n))} if n_a == n_b else set())
    same = np.array([f in split for f in firsts])
    out = {}
    for name, row in res.items():
        null = res.nulls[name]
        count = int(np.sum((null <= row["mean_cosine"] + TIE_ATOL) | same))
        out[name] = (1 + count) / (res.n_permutations + 1)
    return out


def _degenerate(model, batches, ref_loss):
    """Parameters whose gradient is zero in exact arithmetic and rounding noise in floats
    (a key bias: softmax ignores a shift of every score): their cosines are noise.
    """
    grads = [per_sample_gradients(model, b, loss_fn=ref_loss).tensors for b in batches]
    scale = max(float(t.abs().max()) for g in grads for t in g.values())
    return {n for n in grads[0] if max(float(g[n].abs().max()) for g in grads) <= 1e-12 * scale}


def _noise_groups(model, degenerate: set, groups: str, names) -> set:
    """The groups made of degenerate tensors: the parameters themselves, or the heads' slices
    of a degenerate Q/K/V/O tensor (a BERT of hidden size 2, whose LayerNorm maps every token
    to ±(1, −1), has attention gradients ~1e-36 of the largest: every slice is noise).
    """
    if groups == "parameters":
        return set(degenerate)
    lay = ref_layout(model)
    out = set()
    for name in names:  # "L{l}.H{h}.{B}"
        layer, _, block = name.split(".")
        la = lay.layer(int(layer[1:]))
        if {"Q": la.q, "K": la.k, "V": la.v, "O": la.o}[block] in degenerate:
            out.add(name)
    return out


@given(tiny_configs(), st.sampled_from(("heads", "parameters")), st.sampled_from(((3, 2), (2, 2), (2, 4))),
       st.integers(0, 50), st.sampled_from(("bh", "by")), estimator_options(), st.booleans())
def test_conflicts_match(cfg, groups, sizes, seed, fdr, opts, empty):
    model = build_model(cfg, dtype=torch.float64)
    a, b, fast_loss, ref_loss = _batches(cfg, *sizes, seed, empty and sizes[0] > 2, opts["reduction"])
    kw = dict(groups=groups, n_permutations=40, seed=seed, n_bootstrap=30, fdr=fdr,
              unit=opts["unit"], weighting=opts["weighting"])
    got = fast_conflicts(model, a, b, loss_fn=fast_loss, dtype=torch.float64, **kw)
    want = ref_conflicts(model, a, b, loss_fn=ref_loss, **kw)
    assert list(got) == list(want) and got.ids_a == want.ids_a and got.ids_b == want.ids_b
    p_want = _oracle_p_with_exact_ties(want, len(want.ids_a), len(want.ids_b))
    noise = _noise_groups(model, _degenerate(model, (a, b), ref_loss), groups, want)
    for name, w in want.items():
        if name in noise:
            continue
        g = got[name]
        assert g["p"] == p_want[name], name
        assert g["mean_cosine"] == pytest.approx(w["mean_cosine"], rel=RTOL, abs=ATOL), name
        for key in ("null_mean", "null_sd"):
            assert g[key] == pytest.approx(w[key], rel=NULL_RTOL, abs=NULL_ATOL), (name, key)
        if w["null_sd"] > 1e-9:   # else the null has no spread beyond rounding
            assert g["effect"] == pytest.approx(w["effect"], rel=EFFECT_RTOL, abs=EFFECT_ATOL), name
        assert g["interval"] == pytest.approx(w["interval"], rel=NULL_RTOL, abs=NULL_ATOL), name
    if not noise and all(p_want[k] == w["p"] for k, w in want.items()):
        assert [g["q"] for g in got.values()] == pytest.approx([w["q"] for w in want.values()],
                                                               rel=FDR_RTOL, abs=FDR_ATOL)


def _to(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.gpu
@given(tiny_configs(), st.booleans(), st.integers(0, 50))
def test_interference_and_conflicts_match_on_cuda(cfg, signed, seed):
    device = "cuda"  # not the `device` fixture: Hypothesis rejects function-scoped fixtures
    model = build_model(cfg, dtype=torch.float64)
    a, b, fast_loss, ref_loss = _batches(cfg, 3, 2, seed)
    moved = build_model(cfg, dtype=torch.float64).to(device)
    a_dev, b_dev = _to(a, device), _to(b, device)
    got = fast_interference(moved, a_dev, b_dev, loss_fn=fast_loss, dtype=torch.float64, signed=signed)
    want = ref_interference(model, a, b, loss_fn=ref_loss, signed=signed)
    assert_dicts_close({k: v.cpu() for k, v in got.items()}, dict(want), rtol=RTOL, atol=ATOL,
                       what="interference on cuda")
    kw = dict(n_permutations=40, seed=seed, n_bootstrap=30)
    got_c = fast_conflicts(moved, a_dev, b_dev, loss_fn=fast_loss, dtype=torch.float64, **kw)
    want_c = ref_conflicts(model, a, b, loss_fn=ref_loss, **kw)
    p_want = _oracle_p_with_exact_ties(want_c, 3, 2)
    assert {k: v["p"] for k, v in got_c.items()} == p_want
