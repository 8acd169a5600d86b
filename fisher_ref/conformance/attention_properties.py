"""The named properties for QK-OV slices (SPEC §4) and interference (SPEC §6).

They draw the architectures with an attention layout: every causal LM and the ViT
(``nn.MultiheadAttention``). A failed slice property is diagnosed by naming the oracle's
slices the returned mask covers; a failed interference agreement by the variant of M
(task B's or the pooled Fisher as F̂, signed or abs φ) it matches.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from fisher_ref.conformance.adapter import provided
from fisher_ref.conformance.cases import (
    ATTENTION_ARCHS,
    DataSpec,
    build_case_model,
    case_loss,
    data_specs,
    describe_case,
    describe_model,
    family_of,
    split_batch,
    splits,
    tiny_configs,
)
from fisher_ref.conformance.diagnosis import Candidate, best_fit
from fisher_ref.conformance.engine import Context, PropertyResult, not_provided, run_property
from fisher_ref.conformance.outputs import block_tensors, bool_masks
from fisher_ref.testing.compare import compare_dicts
from fisher_ref.testing.tolerances import tolerance

BLOCKS = ("Q", "K", "V", "O")

IDENTITY_EPS = 1e-300  # "epsilon = 0" without 0/0 where F̂ vanishes; F̂ + 1e-300 == F̂ otherwise


def _mask(adapter, model, layer, head, block) -> dict[str, torch.Tensor]:
    return bool_masks(adapter.qkov_mask(model, layer, head, block), f"qkov_mask(L{layer}.H{head}.{block})")


def attention_archs(ctx: Context) -> tuple[str, ...]:
    """The context's architectures that have an attention layout."""
    return tuple(a for a in ctx.archs if a in ATTENTION_ARCHS)


class SliceMismatch(AssertionError):
    """A slice is wrong; ``masks`` is what the adapter returned for ``(layer, head, block)``."""

    def __init__(self, message: str, where: tuple, masks: dict):
        super().__init__(message)
        self.where, self.masks = where, masks


def _slices_diagnosis(ctx: Context):
    def diagnose(config, exc):
        if not isinstance(exc, SliceMismatch):
            return None
        model = build_case_model(config, ctx.dtype)
        layout = ctx.oracle.attention_layout(model)
        covered = []
        for la in layout.layers:
            for h in range(la.num_heads):
                for b in BLOCKS:
                    if b in ("K", "V") and any(la.kv_head(g) == la.kv_head(h) for g in range(h)):
                        continue  # a kv slice shared with an earlier head: named once
                    true = _mask(ctx.oracle, model, la.index, h, b)
                    hit = sum(int((exc.masks.get(n, torch.zeros_like(m)) & m).sum()) for n, m in true.items())
                    size = sum(int(m.sum()) for m in true.values())
                    if hit:
                        covered.append(f"L{la.index}.H{h}.{b}" + ("" if hit == size else f" ({hit}/{size})"))
        total = sum(int(m.sum()) for m in exc.masks.values())
        inside = sum(int(m.sum()) for n, m in exc.masks.items() if n in layout.parameter_names())
        where = "L{}.H{}.{}".format(*exc.where)
        if total == 0:
            return f"the mask returned for {where} is empty (an offset past the tensor's end?)"
        text = (f"the mask returned for {where} covers the oracle's slices "
                f"{', '.join(covered[:8]) or '(none)'}{' ...' if len(covered) > 8 else ''}")
        if inside < total:
            text += f", and {total - inside} entries outside every attention tensor"
        return text
    return diagnose


def _slices_property(name: str, check, doc: str):
    def prop(adapter, ctx: Context) -> PropertyResult:
        needs = ("qkov_mask",)
        archs = attention_archs(ctx)
        if needs[0] not in provided(adapter) or not archs:
            return not_provided(name, needs)

        def body(config):
            model = build_case_model(config, ctx.dtype)
            check(adapter, model, ctx.oracle.attention_layout(model), ctx, config)

        def cover(arch):
            return tiny_configs((arch,), size=ctx.size) if arch in archs else None

        return run_property(name, needs, tiny_configs(archs, size=ctx.size), body,
                            lambda c: describe_model(c), ctx, cover=cover,
                            diagnose=_slices_diagnosis(ctx))

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
                                lambda la=la, h=h, b=b: _mask(ctx.oracle, model, la.index, h, b))
                for n in set(got) | set(want):
                    if n not in shapes:
                        raise AssertionError(f"slice L{la.index}.H{h}.{b}: unknown parameter {n!r}")
                    g = got.get(n, torch.zeros(shapes[n], dtype=torch.bool))
                    w = want.get(n, torch.zeros(shapes[n], dtype=torch.bool))
                    if g.shape != w.shape or not torch.equal(g, w):
                        raise SliceMismatch(
                            f"slice L{la.index}.H{h}.{b}, parameter {n!r}: expected "
                            f"{int(w.sum())} entries {_where(w)}, got {int(g.sum())} {_where(g)}",
                            (la.index, h, b), got)


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
                    raise SliceMismatch(f"slice L{la.index}.H{h}.{b} touches {extra}, outside "
                                        f"layer {la.index}'s Q/K/V/O weights {sorted(tensors)}",
                                        (la.index, h, b), masks)
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
                        raise SliceMismatch(
                            f"slices overlap in {n!r}: L{la.index}.H{h}.{b} and "
                            f"L{la.index}.{BLOCKS[other // 1000]} head {other % 1000} share "
                            f"{int(clash.sum())} entries", (la.index, h, b), masks)
                    owner[n][m] = label
            sizes = {t: sum(int(m.sum()) for m in ms.values()) for t, ms in seen.items()}
            if not seen or min(sizes.values()) == 0 or len(set(sizes.values())) > 1:
                odd = min(sizes, key=lambda t: (sizes[t], t)) if seen else 0
                raise SliceMismatch(f"L{la.index}.{b}: every (kv-)head needs a non-empty slice "
                                    f"of the same size; entries per head: {sizes}",
                                    (la.index, odd, b), seen.get(odd, {}))
        for n, o in owner.items():
            if (o < 0).any():
                raise AssertionError(f"slices of layer {la.index} leave {int((o < 0).sum())} of "
                                     f"{o.numel()} entries of {n!r} in no slice")


def _check_semantic(adapter, model, layout, ctx, config):
    from fisher_ref.semantic_check import check_masks

    batch = None
    if family_of(config) == "classifier":  # no vocabulary: the check's inputs are images
        rows = DataSpec(seed=0, batch_size=2, family="classifier", input_shape=config.input_shape,
                        num_classes=config.num_classes).batch()  # float64: the check's own copy
        batch = {"input": rows["input"]}
    report = check_masks(model, lambda la, h, b: _mask(adapter, model, la, h, b), layout, batch=batch)
    if report.failures():  # inconclusive checks (a head these inputs cannot move) decide nothing
        first = report.failures()[0]
        block = first.block if first.block in BLOCKS else first.block.split("+")[0]
        raise SliceMismatch(str(report), (first.layer, first.head, block),
                            _mask(adapter, model, first.layer, first.head, block))


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
def _two_task_cases(draw, ctx: Context, archs=None):
    config = draw(tiny_configs(archs or attention_archs(ctx), max_layers=1, size=ctx.size))
    a = draw(data_specs(config, dtype=ctx.dtype, max_rows=3, size=ctx.size))
    b = draw(data_specs(config, dtype=ctx.dtype, max_rows=3, id_offset=100, size=ctx.size))
    return config, a, draw(splits(a.batch_size)), b, draw(splits(b.batch_size))


def _describe_two(example) -> str:
    config, a, sa, b, sb = example
    return (f"task A: {describe_case(config, a, sa)}; task B: data {b.describe()}; split {sb}")


class InterferenceMismatch(AssertionError):
    """Interference differs; ``actual`` is what the adapter returned (blocks)."""

    def __init__(self, message: str, actual: dict, signed: bool):
        super().__init__(message)
        self.actual, self.signed = actual, signed


def _interference_diagnosis(ctx: Context):
    def diagnose(example, exc):
        if not isinstance(exc, InterferenceMismatch):
            return None
        config, a, sa, b, sb = example
        model = build_case_model(config, ctx.dtype)
        from fisher_ref.conformance.builtin_adapters import ref

        cands = []
        for fisher, what in (("a", "task A's Fisher"), ("b", "task B's Fisher"),
                             ("pooled", "the pooled Fisher of A and B")):
            for signed in (exc.signed, not exc.signed):
                value = block_tensors(ref("interference")(
                    model, a.batch(), b.batch(), loss_fn=case_loss(config), fisher=fisher,
                    signed=signed))
                phi = "signed φ" if signed else "abs φ"
                cands.append(Candidate(f"M with F̂ = {what} and {phi}", value))
        rtol, atol = ctx.tolerance(config)
        return best_fit(exc.actual, cands, {"rtol": rtol, "atol": atol, "atol_scale": 0.0})
    return diagnose


def _interference_property(name: str, check, doc: str):
    def prop(adapter, ctx: Context) -> PropertyResult:
        needs = ("interference",)
        archs = attention_archs(ctx)
        if needs[0] not in provided(adapter) or not archs:
            return not_provided(name, needs)

        def body(example):
            config, a, sa, b, sb = example
            model = build_case_model(config, ctx.dtype)
            ba, bb = a.batch(), b.batch()
            check(adapter, model, (ba, split_batch(ba, sa)), (bb, split_batch(bb, sb)), ctx,
                  (config, a, b))

        def cover(arch):
            return _two_task_cases(ctx, archs=(arch,)) if arch in archs else None

        return run_property(name, needs, _two_task_cases(ctx), body, _describe_two, ctx,
                            cover=cover, diagnose=_interference_diagnosis(ctx))

    prop.__name__ = name
    prop.__doc__ = doc
    return prop


def _interference(adapter, model, task_a, task_b, config, **options):
    return block_tensors(adapter.interference(model, task_a, task_b, loss_fn=case_loss(config),
                                              **options))


def _agreement_check(signed: bool):
    def check(adapter, model, a, b, ctx, key):
        config = key[0]
        got = _interference(adapter, model, a[1], b[1], config, signed=signed)
        want = ctx.memo(("interference", signed) + key,
                        lambda: _interference(ctx.oracle, model, [a[0]], [b[0]], config, signed=signed))
        rtol, atol = ctx.tolerance(config)
        if signed:  # signed sums cancel: their rounding scales with the terms, |M| of abs mode
            scale = ctx.memo(("interference", False) + key,
                             lambda: _interference(ctx.oracle, model, [a[0]], [b[0]], config))
            bad = _signed_mismatches(got, want, scale, rtol, atol,
                                     tolerance("signed-interference-terms", ctx.dtype)[1])
        else:
            bad = [m.message for m in compare_dicts(got, want, rtol=rtol, atol=atol,
                                                    what="interference blocks")]
        if bad:
            raise InterferenceMismatch(
                f"interference (signed={signed}) vs fisher_ref:\n  " + "\n  ".join(bad), got, signed)
    return check


def _signed_mismatches(got, want, scale, rtol, atol, term_rtol) -> list[str]:
    """Blocks where |got - want| > rtol |want| + atol + term_rtol * M_abs, element-wise."""
    out = []
    for blk, w in want.items():
        g = got.get(blk)
        if g is None or g.shape != w.shape:
            out.append(f"{blk}: expected shape {tuple(w.shape)}, got "
                       f"{None if g is None else tuple(g.shape)}")
            continue
        bound = rtol * w.abs() + atol + term_rtol * scale[blk].abs()
        bad = (g - w).abs() > bound
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            out.append(f"{blk}: {int(bad.sum())}/{bad.numel()} elements differ; first at {idx}: got "
                       f"{float(g[idx]):.6g}, expected {float(w[idx]):.6g} (abs-mode scale "
                       f"{float(scale[blk][idx]):.3g}; rtol={rtol:g}, atol={atol:g}, "
                       f"term rtol={term_rtol:g})")
    return out


def _check_identity(adapter, model, a, b, ctx, key):
    r"""mean_i M[i, j, l, h] = sum over the slice (where F̂_A > 0) of |g^B_j| (F̂ = F_A, eps ~ 0)."""
    loss = case_loss(key[0])
    got = _interference(adapter, model, a[1], b[1], key[0], eps=IDENTITY_EPS)
    fisher_a = ctx.memo(("fisher_a",) + key, lambda: ctx.oracle.empirical_fisher(
        model, [a[0]], loss_fn=loss))
    _, grads_b = ctx.memo(("grads_b",) + key, lambda: ctx.oracle.per_sample_gradients(
        model, [b[0]], loss_fn=loss))
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
    got = _interference(adapter, model, a[1], b[1], key[0])
    for blk, t in got.items():
        if not torch.isfinite(t).all():
            raise AssertionError(f"interference block {blk}: non-finite entries")
        if (t < 0).any():
            raise InterferenceMismatch(f"interference block {blk} (abs mode): {int((t < 0).sum())} "
                                       f"negative entries, min {float(t.min()):.3g}", got, False)


interference_agreement = _interference_property(
    "interference_agreement", _agreement_check(False),
    "M^B[i, j, l, h] for every block equals fisher_ref's (F̂ = F of task A, eps 1e-12).")
interference_signed_agreement = _interference_property(
    "interference_signed_agreement", _agreement_check(True),
    "With signed=True (φ = identity), M^B[i, j, l, h] equals fisher_ref's for every block.")
interference_identity = _interference_property(
    "interference_identity", _check_identity,
    "SPEC §6: with F̂ = mean_i C_i and eps = 0, mean_i M[i, j] is the L1 norm of g_j on the slice.")
interference_nonnegative = _interference_property(
    "interference_nonnegative", _check_nonnegative,
    "In abs mode (the default) every M entry is finite and >= 0.")
