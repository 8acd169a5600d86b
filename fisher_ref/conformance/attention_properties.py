"""The named properties for QK-OV slices (SPEC §4) and interference (SPEC §6)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from fisher_ref.conformance.adapter import provided
from fisher_ref.conformance.cases import (
    build_case_model,
    data_specs,
    describe_case,
    describe_model,
    split_batch,
    splits,
    tiny_configs,
)
from fisher_ref.conformance.engine import Context, PropertyResult, not_provided, run_property
from fisher_ref.conformance.outputs import block_tensors, bool_masks
from fisher_ref.losses import causal_lm_loss
from fisher_ref.testing.compare import compare_dicts

BLOCKS = ("Q", "K", "V", "O")

IDENTITY_EPS = 1e-300  # "epsilon = 0" without 0/0 where F̂ vanishes; F̂ + 1e-300 == F̂ otherwise


def _mask(adapter, model, layer, head, block) -> dict[str, torch.Tensor]:
    return bool_masks(adapter.qkov_mask(model, layer, head, block), f"qkov_mask(L{layer}.H{head}.{block})")


def _slices_property(name: str, check, doc: str):
    def prop(adapter, ctx: Context) -> PropertyResult:
        needs = ("qkov_mask",)
        if needs[0] not in provided(adapter):
            return not_provided(name, needs)

        def body(config):
            model = build_case_model(config, ctx.dtype)
            check(adapter, model, ctx.oracle.attention_layout(model), ctx, config)

        return run_property(name, needs, tiny_configs(ctx.archs), body,
                            lambda c: describe_model(c), ctx)

    prop.__name__ = name
    prop.__doc__ = doc
    return prop


def _check_agreement(adapter, model, layout, ctx, config):
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for la in layout.layers:
        for h in range(la.num_heads):
            for b in BLOCKS:
                got = _mask(adapter, model, la.index, h, b)
                want = ctx.memo(("mask", config, la.index, h, b),
                                lambda: _mask(ctx.oracle, model, la.index, h, b))
                for n in set(got) | set(want):
                    if n not in shapes:
                        raise AssertionError(f"slice L{la.index}.H{h}.{b}: unknown parameter {n!r}")
                    g = got.get(n, torch.zeros(shapes[n], dtype=torch.bool))
                    w = want.get(n, torch.zeros(shapes[n], dtype=torch.bool))
                    if g.shape != w.shape or not torch.equal(g, w):
                        raise AssertionError(
                            f"slice L{la.index}.H{h}.{b}, parameter {n!r}: expected "
                            f"{int(w.sum())} entries {_where(w)}, got {int(g.sum())} {_where(g)}")


def _where(mask: torch.Tensor) -> str:
    if mask.dim() != 2 or not mask.any():
        return ""
    rows = mask.any(1).nonzero().flatten().tolist()
    cols = mask.any(0).nonzero().flatten().tolist()
    return f"(rows {rows[0]}..{rows[-1]}, columns {cols[0]}..{cols[-1]})"


def _check_partition(adapter, model, layout, ctx, config):
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for la in layout.layers:
        owner: dict[str, torch.Tensor] = {}  # name -> LongTensor of slice index (-1: none)
        tensors = {la.q, la.k, la.v, la.o}
        for n in tensors:
            owner[n] = torch.full(shapes[n], -1, dtype=torch.long)
        for b_index, b in enumerate(BLOCKS):
            seen: dict[int, dict] = {}
            for h in range(la.num_heads):
                masks = _mask(adapter, model, la.index, h, b)
                extra = sorted(set(masks) - tensors)
                if extra:
                    raise AssertionError(f"slice L{la.index}.H{h}.{b} touches {extra}, outside "
                                         f"layer {la.index}'s Q/K/V/O weights {sorted(tensors)}")
                target = la.kv_head(h) if b in ("K", "V") else h
                if target in seen:  # heads sharing a key-value head share its K/V slice
                    if set(seen[target]) != set(masks) or any(
                            not torch.equal(seen[target][n], masks[n]) for n in masks):
                        raise AssertionError(f"L{la.index}.{b}: query heads sharing kv head "
                                             f"{target} got different slices (head {h})")
                    continue
                seen[target] = masks
                label = b_index * 1000 + target
                for n, m in masks.items():
                    if m.shape != shapes[n]:
                        raise AssertionError(f"slice L{la.index}.H{h}.{b}: mask for {n!r} has "
                                             f"shape {tuple(m.shape)}, expected {tuple(shapes[n])}")
                    clash = m & (owner[n] >= 0)
                    if clash.any():
                        other = int(owner[n][clash][0])
                        raise AssertionError(
                            f"slices overlap in {n!r}: L{la.index}.H{h}.{b} and "
                            f"L{la.index}.{BLOCKS[other // 1000]} head {other % 1000} share "
                            f"{int(clash.sum())} entries")
                    owner[n][m] = label
            sizes = {t: sum(int(m.sum()) for m in ms.values()) for t, ms in seen.items()}
            if not seen or min(sizes.values()) == 0 or len(set(sizes.values())) > 1:
                raise AssertionError(f"L{la.index}.{b}: every (kv-)head needs a non-empty slice "
                                     f"of the same size; entries per head: {sizes}")
        for n, o in owner.items():
            if (o < 0).any():
                raise AssertionError(f"slices of layer {la.index} leave {int((o < 0).sum())} of "
                                     f"{o.numel()} entries of {n!r} in no slice")


def _check_semantic(adapter, model, layout, ctx, config):
    from fisher_ref.semantic_check import check_masks

    report = check_masks(model, lambda l, h, b: _mask(adapter, model, l, h, b), layout)
    if report.failures():  # inconclusive checks (a head these inputs cannot move) decide nothing
        raise AssertionError(str(report))


slices_agreement = _slices_property(
    "slices_agreement", _check_agreement,
    "Every mask I(l, h, B) equals fisher_ref's qkov_mask (biases excluded).")
slices_partition = _slices_property(
    "slices_partition", _check_partition,
    "Per layer, the slices of distinct (kv-)heads and blocks are disjoint, query heads sharing "
    "a kv head share its K/V slice, and together they cover the Q/K/V/O weights.")
slices_semantic = _slices_property(
    "slices_semantic", _check_semantic,
    "Perturbing a slice moves exactly that head's query/key/value/output in the model's own "
    "forward pass (fisher_ref.semantic_check.check_masks).")


@st.composite
def _two_task_cases(draw, ctx: Context):
    config = draw(tiny_configs(ctx.archs, max_layers=1))
    a = draw(data_specs(max_rows=3))
    b = draw(data_specs(max_rows=3, id_offset=100))
    return config, a, draw(splits(a.batch_size)), b, draw(splits(b.batch_size))


def _describe_two(example) -> str:
    config, a, sa, b, sb = example
    return (f"task A: {describe_case(config, a, sa)}; task B: data {b.describe()}; split {sb}")


def _interference_property(name: str, check, doc: str):
    def prop(adapter, ctx: Context) -> PropertyResult:
        needs = ("interference",)
        if needs[0] not in provided(adapter):
            return not_provided(name, needs)

        def body(example):
            config, a, sa, b, sb = example
            model = build_case_model(config, ctx.dtype)
            ba, bb = a.batch(), b.batch()
            check(adapter, model, (ba, split_batch(ba, sa)), (bb, split_batch(bb, sb)), ctx,
                  (config, a, b))

        return run_property(name, needs, _two_task_cases(ctx), body, _describe_two, ctx)

    prop.__name__ = name
    prop.__doc__ = doc
    return prop


def _interference(adapter, model, task_a, task_b, **options):
    return block_tensors(adapter.interference(model, task_a, task_b, loss_fn=causal_lm_loss,
                                              **options))


def _check_interference_agreement(adapter, model, a, b, ctx, key):
    got = _interference(adapter, model, a[1], b[1])
    want = ctx.memo(("interference",) + key, lambda: _interference(ctx.oracle, model, [a[0]], [b[0]]))
    rtol, atol = ctx.tolerance(key[0])
    bad = compare_dicts(got, want, rtol=rtol, atol=atol, what="interference blocks")
    if bad:
        raise AssertionError("interference vs fisher_ref:\n  " + "\n  ".join(m.message for m in bad))


def _check_identity(adapter, model, a, b, ctx, key):
    r"""mean_i M[i, j, l, h] = sum over the slice (where F̂_A > 0) of |g^B_j| (F̂ = F_A, eps ~ 0)."""
    got = _interference(adapter, model, a[1], b[1], eps=IDENTITY_EPS)
    fisher_a = ctx.memo(("fisher_a",) + key, lambda: ctx.oracle.empirical_fisher(
        model, [a[0]], loss_fn=causal_lm_loss))
    _, grads_b = ctx.memo(("grads_b",) + key, lambda: ctx.oracle.per_sample_gradients(
        model, [b[0]], loss_fn=causal_lm_loss))
    layout = ctx.oracle.attention_layout(model)
    rtol, atol = ctx.tolerance(key[0])
    for blk in BLOCKS:
        for la in layout.layers:
            for h in range(la.num_heads):
                masks = _mask(ctx.oracle, model, la.index, h, blk)
                want = sum((grads_b[n].abs() * (m & (fisher_a[n] > 0))).flatten(1).sum(1)
                           for n, m in masks.items())
                mean_i = got[blk][:, :, la.index, h].mean(0)
                if not torch.allclose(mean_i, want, rtol=max(rtol, 1e-9), atol=atol):
                    raise AssertionError(
                        f"SPEC §6 identity fails at L{la.index}.H{h}.{blk}: mean over task-A units "
                        f"of M[i, j] = {mean_i.tolist()}, expected the L1 norms of g^B_j on the "
                        f"slice {want.tolist()}")


def _check_nonnegative(adapter, model, a, b, ctx, key):
    got = _interference(adapter, model, a[1], b[1])
    for blk, t in got.items():
        if not torch.isfinite(t).all():
            raise AssertionError(f"interference block {blk}: non-finite entries")
        if (t < 0).any():
            raise AssertionError(f"interference block {blk} (abs mode): {int((t < 0).sum())} "
                                 f"negative entries, min {float(t.min()):.3g}")


interference_agreement = _interference_property(
    "interference_agreement", _check_interference_agreement,
    "M^B[i, j, l, h] for every block equals fisher_ref's (F̂ = F of task A, eps 1e-12).")
interference_identity = _interference_property(
    "interference_identity", _check_identity,
    "SPEC §6: with F̂ = mean_i C_i and eps = 0, mean_i M[i, j] is the L1 norm of g_j on the slice.")
interference_nonnegative = _interference_property(
    "interference_nonnegative", _check_nonnegative,
    "In abs mode (the default) every M entry is finite and >= 0.")
