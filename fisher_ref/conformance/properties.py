"""The named properties for the per-parameter estimators and per-sample contributions.

Each function ``prop(adapter, ctx) -> PropertyResult`` draws models of the adapter's
families (tiny HF causal LMs and classifiers), batches (with the caller's sample ids) and
splits with Hypothesis, checks one statement of ../shared/SPEC.md, and on failure reports
the shrunk, minimal model and batch, with a diagnosis of what the implementation computed.
``PROPERTIES`` (at the bottom) lists every property of the harness, including those of
``group_properties``, ``true_fisher_properties``, ``attention_properties`` and
``statistics_properties``.
"""

from __future__ import annotations

from fisher_ref.conformance import attention_properties as attn
from fisher_ref.conformance import group_properties as groups
from fisher_ref.conformance import statistics_properties as stats
from fisher_ref.conformance import true_fisher_properties as true_fisher
from fisher_ref.conformance.adapter import provided
from fisher_ref.conformance.cases import build_case_model, case_loss, duplicate, split_batch
from fisher_ref.conformance.diagnosis import Candidate
from fisher_ref.conformance.engine import Context, PropertyResult, not_provided, run_property
from fisher_ref.conformance.estimator_cases import (
    ESTIMATORS,
    EstimateMismatch,
    case_options,
    check_close,
    cover_estimator_cases,
    describe_estimator_case,
    diagnose_estimator,
    estimate,
    estimator_cases,
    oracle_units,
    require_distinct_rows,
)
from fisher_ref.conformance.outputs import RelabeledLoss, ScaledLoss

LOSS_SCALES = (2.0**-10, -4.0, 8.0)


def _expected(ctx: Context, estimator: str, model, config, data, opts, loss=None) -> dict:
    """The oracle's estimate of a case in the adapter's convention (``unit_reduction``)."""
    est, reduction = case_options(opts)
    loss = case_loss(config, reduction) if loss is None else loss
    want = ctx.memo((estimator, config, data, tuple(sorted(opts.items())), repr(loss)),
                    lambda: estimate(ctx.oracle, estimator, model, [data.batch()], loss, **est))
    if ctx.unit_reduction == "mean":
        return want
    W = oracle_units(ctx, model, config, data, opts, loss_fn=loss).total_weight
    factor = ctx.unit_scale(estimator, W)
    return {k: v * factor for k, v in want.items()}


def _agreement_body(adapter, ctx: Context, estimators, distinct: bool = False, loss_of=None):
    def body(example):
        config, data, sizes, opts = example
        model = build_case_model(config, ctx.dtype)
        if distinct:
            require_distinct_rows(ctx, model, config, data, opts)
        est, reduction = case_options(opts)
        loss = case_loss(config, reduction) if loss_of is None else loss_of(config, reduction)
        presented = split_batch(data.batch(), sizes)
        for estimator in estimators:
            got = estimate(adapter, estimator, model, presented, loss, **est)
            want = _expected(ctx, estimator, model, config, data, opts, loss)
            check_close(got, want, ctx, f"{estimator} vs fisher_ref", config, estimator=estimator,
                        presented=presented, loss_fn=loss)
    return body


def _diagnose_case(ctx: Context, extra_of=None):
    def diagnose(example, exc):
        if not isinstance(exc, EstimateMismatch):
            return None
        config, data, sizes, opts = example
        model = build_case_model(config, ctx.dtype)
        extra = extra_of(example, exc, model) if extra_of else []
        return diagnose_estimator(ctx, exc, config, model, opts, extra=extra)
    return diagnose


def _agreement(estimator: str):
    def prop(adapter, ctx: Context) -> PropertyResult:
        name = f"{estimator}_agreement"
        if estimator not in provided(adapter):
            return not_provided(name, (estimator,))
        return run_property(name, (estimator,), estimator_cases(ctx, options=True),
                            _agreement_body(adapter, ctx, (estimator,)), describe_estimator_case,
                            ctx, cover=cover_estimator_cases(ctx, options=True),
                            diagnose=_diagnose_case(ctx))

    prop.__name__ = f"{estimator}_agreement"
    prop.__doc__ = (f"``{estimator}`` equals fisher_ref's on random models of both families, "
                    f"batches, splits and the adapter's units, weightings and reductions.")
    return prop


empirical_fisher_agreement = _agreement("empirical_fisher")
squared_mean_gradient_agreement = _agreement("squared_mean_gradient")


def distinct_rows_agreement(adapter, ctx: Context) -> PropertyResult:
    """F and S equal fisher_ref's on cases with at least two units whose gradients differ.

    On one unit E[g²] = (E[g])², so a shrinker left alone reduces any failure to one row,
    where squaring the mean gradient cannot be told from squaring each gradient. Here the
    minimal counterexample keeps two distinct rows, and its diagnosis can name the quantity.
    """
    name = "distinct_rows_agreement"
    have = tuple(e for e in ESTIMATORS if e in provided(adapter))
    if not have:
        return not_provided(name, ESTIMATORS)
    return run_property(name, have, estimator_cases(ctx, min_rows=2, allow_empty=False),
                        _agreement_body(adapter, ctx, have, distinct=True), describe_estimator_case,
                        ctx, cover=cover_estimator_cases(ctx, min_rows=2, allow_empty=False),
                        diagnose=_diagnose_case(ctx))


def _self_consistency(name: str, needs_rows: int, transform, doc: str, allow_empty: bool = True,
                      requires_custom_loss: bool = False, extra_of=None):
    """A property comparing each provided estimator on two presentations of the same data."""

    def prop(adapter, ctx: Context) -> PropertyResult:
        have = tuple(e for e in ESTIMATORS if e in provided(adapter))
        if not have or (requires_custom_loss and not ctx.custom_loss):
            return not_provided(name, ESTIMATORS)

        def body(example):
            config, data, sizes, opts = example
            model = build_case_model(config, ctx.dtype)
            _, reduction = case_options(opts)
            base = case_loss(config, reduction)
            batch = data.batch()
            for est in have:
                ref_batches, other_batches, loss_b, factor = transform(batch, sizes, base)
                want = estimate(adapter, est, model, ref_batches, base)
                got = estimate(adapter, est, model, other_batches, loss_b)
                scale = factor(est, ctx)
                want = {k: v * scale for k, v in want.items()}
                check_close(got, want, ctx, f"{est} ({name})", config, estimator=est,
                            presented=other_batches, loss_fn=loss_b, scale=abs(scale))

        cases = estimator_cases(ctx, min_rows=needs_rows, allow_empty=allow_empty)
        return run_property(name, have, cases, body, describe_estimator_case, ctx,
                            cover=cover_estimator_cases(ctx, min_rows=needs_rows,
                                                        allow_empty=allow_empty),
                            diagnose=_diagnose_case(ctx, extra_of))

    prop.__name__ = name
    prop.__doc__ = doc
    return prop


def _one(est, ctx):
    return 1.0


def _micro_batches(batch, sizes, loss):
    # b = 1 against b = n: the extreme pair. Any b in between can hide a defect that squares
    # per micro-batch (internal blocks of 2 inside updates of 4 align exactly with one batch);
    # arbitrary splits are split_invariance's business.
    n = batch["labels"].shape[0]
    return [batch], split_batch(batch, [1] * n), loss, _one


def _split_reversed(batch, sizes, loss):
    return [batch], split_batch(batch, sizes)[::-1], loss, _one


def _duplication_factor(est, ctx):
    """Twice the units: the SPEC's means do not move; sums double (S, squared: x4)."""
    return 1.0 if ctx.unit_reduction == "mean" else (4.0 if est == "squared_mean_gradient" else 2.0)


def _duplicated(batch, sizes, loss):
    return [batch], [duplicate(batch)], loss, _duplication_factor


def _scaled(c):
    def transform(batch, sizes, loss):
        return split_batch(batch, sizes), split_batch(batch, sizes), ScaledLoss(c, loss), \
            lambda est, ctx: c * c
    return transform


micro_batch_invariance = _self_consistency(
    "micro_batch_invariance", 2, _micro_batches,
    "The same rows fed as micro-batches of one row each give the same F and S as one batch.")
split_invariance = _self_consistency(
    "split_invariance", 2, _split_reversed,
    "Any split of the rows into batches, fed in reverse order, gives the one-batch F and S.")
duplication_invariance = _self_consistency(
    "duplication_invariance", 1, _duplicated,
    "Duplicating every row (fresh ids) leaves F and S unchanged (no token-count division).")


def loss_scaling(adapter, ctx: Context) -> PropertyResult:
    """Scaling every loss by c scales F and S by c² (c in {2^-10, -4, 8}).

    The constants are powers of two, so scaling is exact in binary floating point even
    through HF's float32 norm upcasts: a failure is a definition, never rounding. The scaled
    loss is a plain callable (no token protocol), so the drawn rows are never empty (with a
    plain callable an implementation cannot tell an empty row). Whether the caller's loss is
    used at all is ``uses_callers_loss``'s business; an adapter declaring
    ``custom_loss = False`` is not checked here.
    """
    results = []
    for c in LOSS_SCALES:
        prop = _self_consistency("loss_scaling", 1, _scaled(c), "", allow_empty=False,
                                 requires_custom_loss=True, extra_of=_unscaled(c, ctx))
        results.append(prop(adapter, ctx))
    for r, c in zip(results, LOSS_SCALES, strict=False):
        if r.verdict != "pass":
            if r.counterexample:
                r.counterexample += f"; loss scaled by c={c:g}"
            return r
    out = results[0]
    out.examples = sum(r.examples for r in results)
    out.seconds = sum(r.seconds for r in results)
    return out


def _unscaled(c, ctx):
    def extra(example, exc, model):
        config, data, sizes, opts = example
        base = estimate(ctx.oracle, exc.estimator, model, [data.batch()],
                        case_loss(config, case_options(opts)[1]))
        return [Candidate(f"{exc.estimator} of the unscaled loss{suffix} (c = {c:g})",
                          {k: v * f for k, v in base.items()})
                for suffix, f in (("", 1.0), (" × |c|", abs(c)), (" × c⁴", c ** 4))]
    return extra


def uses_callers_loss(adapter, ctx: Context) -> PropertyResult:
    """F and S are computed with the ``loss_fn`` the caller passes, not a loss of the
    adapter's own: here the built-in loss on other labels (each label moved to the next
    class, ``(y + 1) mod C``), a loss of the same form and scale, so that only an adapter
    that ignores ``loss_fn`` (e.g. takes ``model(**batch).loss`` or its own cross-entropy of
    ``batch["labels"]``) fails. Separate from ``loss_scaling``, which checks scaling only.
    """
    name = "uses_callers_loss"
    have = tuple(e for e in ESTIMATORS if e in provided(adapter))
    if not have or not ctx.custom_loss:
        return not_provided(name, ESTIMATORS)

    def relabeled(config, reduction):
        return RelabeledLoss(case_loss(config, reduction))

    def extra(example, exc, model):
        config, data, sizes, opts = example
        own = estimate(ctx.oracle, exc.estimator, model, [data.batch()],
                       case_loss(config, case_options(opts)[1]))
        return [Candidate(f"{exc.estimator} of the batch's own labels (the caller's loss_fn is "
                          f"ignored)", own)]

    return run_property(name, have, estimator_cases(ctx, allow_empty=False),
                        _agreement_body(adapter, ctx, have, loss_of=relabeled),
                        describe_estimator_case, ctx,
                        cover=cover_estimator_cases(ctx, allow_empty=False),
                        diagnose=_diagnose_case(ctx, extra))


PROPERTIES = {
    "empirical_fisher_agreement": empirical_fisher_agreement,
    "squared_mean_gradient_agreement": squared_mean_gradient_agreement,
    "distinct_rows_agreement": distinct_rows_agreement,
    "micro_batch_invariance": micro_batch_invariance,
    "split_invariance": split_invariance,
    "duplication_invariance": duplication_invariance,
    "loss_scaling": loss_scaling,
    "uses_callers_loss": uses_callers_loss,
    "group_fisher_agreement": groups.group_fisher_agreement,
    "group_fisher_invariance": groups.group_fisher_invariance,
    "contributions_agreement": groups.contributions_agreement,
    "contributions_full_shape": groups.contributions_full_shape,
    "contributions_keyed_by_ids": groups.contributions_keyed_by_ids,
    "exact_fisher_agreement": true_fisher.exact_fisher_agreement,
    "mc_fisher_converges": true_fisher.mc_fisher_converges,
    "slices_agreement": attn.slices_agreement,
    "slices_partition": attn.slices_partition,
    "slices_semantic": attn.slices_semantic,
    "interference_agreement": attn.interference_agreement,
    "interference_signed_agreement": attn.interference_signed_agreement,
    "interference_identity": attn.interference_identity,
    "interference_nonnegative": attn.interference_nonnegative,
    "pvalues_agreement": stats.pvalues_agreement,
    "pvalues_direction": stats.pvalues_direction,
    "pvalues_positive": stats.pvalues_positive,
    "pvalues_calibrated": stats.pvalues_calibrated,
    "qvalues_statsmodels": stats.qvalues_statsmodels,
}
