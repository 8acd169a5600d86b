"""The named properties for group Fisher (SPEC §3) and per-sample contributions (SPEC §5)."""

from __future__ import annotations

import torch

from fisher_ref.conformance.adapter import provided
from fisher_ref.conformance.builtin_adapters import has_attention
from fisher_ref.conformance.cases import build_case_model, case_loss, duplicate, split_batch
from fisher_ref.conformance.diagnosis import Candidate, best_fit
from fisher_ref.conformance.engine import Context, PropertyResult, not_provided, run_property
from fisher_ref.conformance.estimator_cases import (
    EstimateMismatch,
    case_options,
    check_close,
    cover_estimator_cases,
    describe_estimator_case,
    diagnose_estimator,
    diagnosis_tolerance,
    estimator_cases,
    oracle_units,
)
from fisher_ref.conformance.outputs import group_means, per_unit
from fisher_ref.groups import group_ids, reduce_groups


def _groups(adapter, model, batches, loss) -> dict:
    return group_means(adapter.group_fisher(model, batches, loss_fn=loss))


def _reducer(model):
    """Full-shape tensors -> group sums, grouped as the protocol says (heads where the
    model has attention, roles elsewhere).
    """
    ids = group_ids(model, "heads" if has_attention(model) else "generic")

    def reduce(values: dict) -> dict:
        return {n: reduce_groups(v, *ids[n]) for n, v in values.items() if n in ids}
    return reduce


def _diagnose(ctx: Context):
    def diagnose(example, exc):
        if not isinstance(exc, EstimateMismatch):
            return None
        config, data, sizes, opts = example
        model = build_case_model(config, ctx.dtype)
        return diagnose_estimator(ctx, exc, config, model, opts, reduce=_reducer(model))
    return diagnose


def group_fisher_agreement(adapter, ctx: Context) -> PropertyResult:
    """Per-group Fisher means R(F) equal fisher_ref's ``group_fisher`` means (SPEC §3)."""
    name, needs = "group_fisher_agreement", ("group_fisher",)
    if "group_fisher" not in provided(adapter):
        return not_provided(name, needs)

    def body(example):
        config, data, sizes, opts = example
        model = build_case_model(config, ctx.dtype)
        loss = case_loss(config, case_options(opts)[1])
        presented = split_batch(data.batch(), sizes)
        got = _groups(adapter, model, presented, loss)
        want = ctx.memo(("group_fisher", config, data, tuple(opts.items())),
                        lambda: _groups(ctx.oracle, model, [data.batch()], loss))
        factor = ctx.unit_scale("group_fisher", oracle_units(ctx, model, config, data, opts).total_weight)
        check_close(got, {k: v * factor for k, v in want.items()}, ctx,
                    "group Fisher means vs fisher_ref", config, estimator="group_fisher",
                    presented=presented, loss_fn=loss)

    return run_property(name, needs, estimator_cases(ctx), body, describe_estimator_case, ctx,
                        cover=cover_estimator_cases(ctx), diagnose=_diagnose(ctx))


def group_fisher_invariance(adapter, ctx: Context) -> PropertyResult:
    """Group Fisher means do not depend on how the rows are presented: any split fed in
    reverse order, micro-batches of one row, and every row duplicated (fresh ids) give the
    one-batch means (under ``unit_reduction="sum"`` duplication doubles them).
    """
    name, needs = "group_fisher_invariance", ("group_fisher",)
    if "group_fisher" not in provided(adapter):
        return not_provided(name, needs)

    def body(example):
        config, data, sizes, opts = example
        model = build_case_model(config, ctx.dtype)
        loss = case_loss(config, case_options(opts)[1])
        batch = data.batch()
        want = _groups(adapter, model, [batch], loss)
        n = batch["labels"].shape[0]
        dup = 1.0 if ctx.unit_reduction == "mean" else 2.0
        for label, presented, factor in (
                ("split, reversed", split_batch(batch, sizes)[::-1], 1.0),
                ("micro-batches of one row", split_batch(batch, [1] * n), 1.0),
                ("every row duplicated", [duplicate(batch)], dup)):
            got = _groups(adapter, model, presented, loss)
            check_close(got, {k: v * factor for k, v in want.items()}, ctx,
                        f"group Fisher means ({label})", config, estimator="group_fisher",
                        presented=presented, loss_fn=loss)

    cases = estimator_cases(ctx, min_rows=2)
    return run_property(name, needs, cases, body, describe_estimator_case, ctx,
                        cover=cover_estimator_cases(ctx, min_rows=2), diagnose=_diagnose(ctx))


def _contributions_property(name: str, check, doc: str):
    def prop(adapter, ctx: Context) -> PropertyResult:
        needs = ("per_sample_contributions",)
        if needs[0] not in provided(adapter):
            return not_provided(name, needs)

        def body(example):
            config, data, sizes, opts = example
            model = build_case_model(config, ctx.dtype)
            loss = case_loss(config, case_options(opts)[1])
            presented = split_batch(data.batch(), sizes)
            got = per_unit(adapter.per_sample_contributions(model, presented, loss_fn=loss))
            want = ctx.memo(("contributions", config, data, tuple(opts.items())), lambda: per_unit(
                ctx.oracle.per_sample_contributions(model, [data.batch()], loss_fn=loss)))
            check(got, want, config, model, ctx, presented)

        return run_property(name, needs, estimator_cases(ctx), body, describe_estimator_case, ctx,
                            cover=cover_estimator_cases(ctx), diagnose=_diagnose_contributions(ctx))

    prop.__name__ = name
    prop.__doc__ = doc
    return prop


class ContributionMismatch(AssertionError):
    """A contribution differs; ``actual`` / ``expected`` are stacked in the oracle's id order."""

    def __init__(self, message: str, actual: dict, expected: dict, presented: list):
        super().__init__(message)
        self.actual, self.expected, self.presented = actual, expected, presented


def _diagnose_contributions(ctx: Context):
    def diagnose(example, exc):
        if not isinstance(exc, ContributionMismatch):
            return None
        expected = exc.expected  # C_u = g_u² stacked [U, ...]
        cands = [Candidate("g_u² (the SPEC contribution)", expected),
                 Candidate("g_u² / n_units", {k: v / v.shape[0] for k, v in expected.items()})]
        grads = _stacked_gradients(ctx, example)
        if grads is not None:
            cands.append(Candidate("the squared summed gradient of the unit's batch",
                                   _batch_squares(grads, exc.presented, expected)))
        cands += [Candidate("g_u² rounded to float16",
                            {k: v.to(torch.float16).to(torch.float64) for k, v in expected.items()},
                            2e-2),
                  Candidate("g_u² with entries below float16's smallest normal flushed to 0",
                            {k: torch.where(v.abs() < 6.103515625e-05, torch.zeros_like(v), v)
                             for k, v in expected.items()})]
        return best_fit(exc.actual, cands, diagnosis_tolerance(ctx, example[0]))
    return diagnose


def _stacked_gradients(ctx: Context, example):
    """The oracle's per-unit gradients of the example's rows."""
    config, data, sizes, opts = example
    return oracle_units(ctx, build_case_model(config, ctx.dtype), config, data, opts)


def _batch_squares(pu, presented, expected) -> dict:
    """Each unit's contribution replaced by its batch's squared summed (mean) gradient."""
    pos = {repr(i): k for k, i in enumerate(pu.ids)}
    out = {k: torch.zeros_like(v) for k, v in expected.items()}
    for b in presented:
        units = [pos[repr(i)] for i in b["sample_ids"] if repr(i) in pos]
        if not units:
            continue
        for k in out:
            g = pu.tensors[k][units].mean(0).square()
            for u in units:
                out[k][u] = g
    return out


class LayoutMismatch(AssertionError):
    """Contribution ids or shapes are wrong; ``diagnosis`` names what they look like."""

    def __init__(self, message: str, diagnosis: str):
        super().__init__(message)
        self.diagnosis = diagnosis


def _id_diagnosis(ids, want_ids, presented) -> str:
    """What the returned ids look like, from the callers' ids."""
    got = sorted(map(repr, ids))
    rows = [i for b in presented for i in b["sample_ids"]]
    looks = {
        "the units' positions 0..U-1 instead of the callers' ids": list(range(len(want_ids))),
        "the rows' positions within each batch": [k for b in presented for k in range(len(b["sample_ids"]))],
        "the rows' positions in the split, empty rows counted": [rows.index(i) for i in want_ids],
        'the ids cut at their first "_" (and merged)': sorted({str(i).split("_")[0] for i in want_ids}),
        "the ids as strings": [str(i) for i in want_ids],
    }
    for label, candidate in looks.items():
        if sorted(map(repr, candidate)) == got:
            return f"the ids returned are {label}"
    missing = [i for i in want_ids if repr(i) not in set(got)]
    return f"no known id mistake fits ({len(missing)} of the callers' ids missing, e.g. {missing[:3]})"


def _check_ids(got, want, config, model, ctx, presented):
    ids, _ = got
    if len(set(map(repr, ids))) != len(ids):
        raise LayoutMismatch(f"contribution ids are not unique: {ids}",
                             _id_diagnosis(ids, want[0], presented))
    if sorted(map(repr, ids)) != sorted(map(repr, want[0])):
        raise LayoutMismatch(f"contribution ids: expected the callers' ids of the non-empty rows "
                             f"{want[0]}, got {ids}", _id_diagnosis(ids, want[0], presented))


def _shape_diagnosis(model, name: str, got: tuple, n_units: int) -> str:
    ids = group_ids(model, "heads" if has_attention(model) else "generic")
    n_groups = ids[name][1] if name in ids else None
    if n_groups is not None and got == (n_units, n_groups):
        return (f"{name}: [U, {n_groups}] is one value per group (SPEC §3): the contributions were "
                f"stored after group reduction")
    if got == tuple(dict(model.named_parameters())[name].shape):
        return f"{name}: no unit axis: one contribution for the whole split"
    return f"{name}: shape {got} fits no known reduction"


def _check_shapes(got, want, config, model, ctx, presented):
    ids, tensors = got
    params = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise AssertionError(f"contributions: expected one entry per trainable parameter "
                             f"{sorted(params)}, got {sorted(tensors)}")
    for n, shape in params.items():
        if tuple(tensors[n].shape) != (len(want[0]), *shape):
            raise LayoutMismatch(f"contributions[{n!r}]: expected shape "
                                 f"{(len(want[0]), *shape)} (units x full parameter shape), "
                                 f"got {tuple(tensors[n].shape)}",
                                 _shape_diagnosis(model, n, tuple(tensors[n].shape), len(want[0])))


def _check_values(got, want, config, model, ctx, presented):
    (ids, tensors), (ref_ids, ref_tensors) = got, want
    index = {repr(i): k for k, i in enumerate(ids)}
    missing = [sid for sid in ref_ids if repr(sid) not in index]
    if missing:
        raise AssertionError(f"contributions: no entry for sample ids {missing} (got ids {ids})")
    order = [index[repr(sid)] for sid in ref_ids]
    actual = {n: t[order] for n, t in tensors.items() if n in ref_tensors}
    try:
        check_close(actual, ref_tensors, ctx, f"contributions g_u² vs fisher_ref (units u in the "
                    f"order of ids {ref_ids})", config)
    except EstimateMismatch as exc:
        raise ContributionMismatch(str(exc), actual, ref_tensors, presented) from None


contributions_keyed_by_ids = _contributions_property(
    "contributions_keyed_by_ids", _check_ids,
    "Contributions carry exactly the callers' sample ids (opaque: 'doc_a_1' is one id).")
contributions_full_shape = _contributions_property(
    "contributions_full_shape", _check_shapes,
    "Contributions have shape [U, *param.shape] for every parameter: no group reduction.")
contributions_agreement = _contributions_property(
    "contributions_agreement", _check_values,
    "Each sample's contribution equals its own squared gradient g_u² (fisher_ref).")
