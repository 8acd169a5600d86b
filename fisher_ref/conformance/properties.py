"""The named properties for the per-parameter estimators and per-sample contributions.

Each function ``prop(adapter, ctx) -> PropertyResult`` draws tiny models, batches (with
the caller's sample ids) and splits with Hypothesis, checks one statement of
../shared/SPEC.md, and on failure reports the shrunk, minimal model and batch. ``PROPERTIES``
(at the bottom) lists every property of the harness, including those of
``attention_properties`` and ``statistics_properties``.
"""

from __future__ import annotations

from hypothesis import strategies as st

from fisher_ref.conformance import attention_properties as attn
from fisher_ref.conformance import statistics_properties as stats
from fisher_ref.conformance.adapter import provided
from fisher_ref.conformance.cases import (
    build_case_model,
    data_specs,
    describe_case,
    duplicate,
    split_batch,
    splits,
    tiny_configs,
)
from fisher_ref.conformance.engine import Context, PropertyResult, not_provided, run_property
from fisher_ref.conformance.outputs import ScaledLoss, group_means, per_unit, tensor_dict
from fisher_ref.losses import causal_lm_loss
from fisher_ref.testing.compare import compare_dicts

ESTIMATORS = ("empirical_fisher", "squared_mean_gradient")
LOSS_SCALES = (2.0**-10, -4.0, 8.0)


def _check_close(actual: dict, expected: dict, ctx: Context, what: str, config,
                 scale: float = 1.0):
    rtol, atol = ctx.tolerance(config)
    bad = compare_dicts(actual, expected, rtol=rtol, atol=atol * scale, what=what)
    if bad:
        lines = "\n  ".join(m.message for m in bad[:6])
        more = f"\n  ... and {len(bad) - 6} more" if len(bad) > 6 else ""
        raise AssertionError(f"{what}: {len(bad)} parameter(s) differ:\n  {lines}{more}")


def _estimate(adapter, name: str, model, batches, loss_fn=causal_lm_loss, **options) -> dict:
    return tensor_dict(getattr(adapter, name)(model, batches, loss_fn=loss_fn, **options), name)


@st.composite
def _estimator_cases(draw, ctx: Context, min_rows: int = 1, options: bool = False,
                     allow_empty: bool = True):
    config = draw(tiny_configs(ctx.archs))
    data = draw(data_specs(min_rows=min_rows, allow_empty=allow_empty))
    sizes = draw(splits(data.batch_size))
    opts = {}
    if options:
        opts = {"unit": draw(st.sampled_from(ctx.units)),
                "weighting": draw(st.sampled_from(ctx.weightings))}
    return config, data, sizes, opts


def _describe(example) -> str:
    config, data, sizes, opts = example[:4]
    text = describe_case(config, data, sizes)
    return text + (f"; options {opts}" if opts else "")


def _agreement(estimator: str):
    def prop(adapter, ctx: Context) -> PropertyResult:
        name = f"{estimator}_agreement"
        if estimator not in provided(adapter):
            return not_provided(name, (estimator,))

        def body(example):
            config, data, sizes, opts = example
            model = build_case_model(config, ctx.dtype)
            batch = data.batch()
            got = _estimate(adapter, estimator, model, split_batch(batch, sizes), **opts)
            want = ctx.memo((estimator, config, data, tuple(sorted(opts.items()))),
                            lambda: _estimate(ctx.oracle, estimator, model, [batch], **opts))
            _check_close(got, want, ctx, f"{estimator} vs fisher_ref", config)

        return run_property(name, (estimator,), _estimator_cases(ctx, options=True), body,
                            _describe, ctx)

    prop.__name__ = f"{estimator}_agreement"
    prop.__doc__ = (f"``{estimator}`` equals fisher_ref's on random models, batches, splits and "
                    f"the adapter's units and weightings.")
    return prop


empirical_fisher_agreement = _agreement("empirical_fisher")
squared_mean_gradient_agreement = _agreement("squared_mean_gradient")


def _self_consistency(name: str, needs_rows: int, transform, doc: str, allow_empty: bool = True):
    """A property comparing each provided estimator on two presentations of the same data."""

    def prop(adapter, ctx: Context) -> PropertyResult:
        have = tuple(e for e in ESTIMATORS if e in provided(adapter))
        if not have:
            return not_provided(name, ESTIMATORS)

        def body(example):
            config, data, sizes, opts = example
            model = build_case_model(config, ctx.dtype)
            batch = data.batch()
            for est in have:
                reference_batches, other_batches, loss_a, loss_b, scale = transform(batch, sizes)
                want = _estimate(adapter, est, model, reference_batches, loss_fn=loss_a)
                got = _estimate(adapter, est, model, other_batches, loss_fn=loss_b)
                want = {k: v * scale for k, v in want.items()}
                _check_close(got, want, ctx, f"{est} ({name})", config, scale=scale)

        cases = _estimator_cases(ctx, min_rows=needs_rows, allow_empty=allow_empty)
        return run_property(name, have, cases, body,
                            _describe, ctx)

    prop.__name__ = name
    prop.__doc__ = doc
    return prop


def _micro_batches(batch, sizes):
    # b = 1 against b = n: the extreme pair. Any b in between can hide a defect that squares
    # per micro-batch (internal blocks of 2 inside updates of 4 align exactly with one batch);
    # arbitrary splits are split_invariance's business.
    n = batch["input_ids"].shape[0]
    return [batch], split_batch(batch, [1] * n), causal_lm_loss, causal_lm_loss, 1.0


def _split_reversed(batch, sizes):
    return [batch], split_batch(batch, sizes)[::-1], causal_lm_loss, causal_lm_loss, 1.0


def _duplicated(batch, sizes):
    return [batch], [duplicate(batch)], causal_lm_loss, causal_lm_loss, 1.0


def _scaled(c):
    def transform(batch, sizes):
        return split_batch(batch, sizes), split_batch(batch, sizes), causal_lm_loss, ScaledLoss(c), c * c
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
    plain callable an implementation cannot tell an empty row).
    """
    results = [_self_consistency("loss_scaling", 1, _scaled(c), "", allow_empty=False)(adapter, ctx)
               for c in LOSS_SCALES]
    for r, c in zip(results, LOSS_SCALES):
        if r.verdict != "pass":
            if r.counterexample:
                r.counterexample += f"; loss scaled by c={c:g}"
            return r
    out = results[0]
    out.examples = sum(r.examples for r in results)
    out.seconds = sum(r.seconds for r in results)
    return out


def group_fisher_agreement(adapter, ctx: Context) -> PropertyResult:
    """Per-group Fisher means R(F) equal fisher_ref's ``group_fisher`` means (SPEC §3)."""
    name, needs = "group_fisher_agreement", ("group_fisher",)
    if "group_fisher" not in provided(adapter):
        return not_provided(name, needs)

    def body(example):
        config, data, sizes, _ = example
        model = build_case_model(config, ctx.dtype)
        batch = data.batch()
        got = group_means(adapter.group_fisher(model, split_batch(batch, sizes), loss_fn=causal_lm_loss))
        want = ctx.memo(("group_fisher", config, data), lambda: group_means(
            ctx.oracle.group_fisher(model, [batch], loss_fn=causal_lm_loss)))
        _check_close(got, want, ctx, "group Fisher means vs fisher_ref", config)

    return run_property(name, needs, _estimator_cases(ctx), body, _describe, ctx)


def _contributions_property(name: str, check, doc: str):
    def prop(adapter, ctx: Context) -> PropertyResult:
        needs = ("per_sample_contributions",)
        if needs[0] not in provided(adapter):
            return not_provided(name, needs)

        def body(example):
            config, data, sizes, _ = example
            model = build_case_model(config, ctx.dtype)
            batch = data.batch()
            got = per_unit(adapter.per_sample_contributions(model, split_batch(batch, sizes),
                                                            loss_fn=causal_lm_loss))
            want = ctx.memo(("contributions", config, data), lambda: per_unit(
                ctx.oracle.per_sample_contributions(model, [batch], loss_fn=causal_lm_loss)))
            check(got, want, config, model, ctx)

        return run_property(name, needs, _estimator_cases(ctx), body, _describe, ctx)

    prop.__name__ = name
    prop.__doc__ = doc
    return prop


def _check_ids(got, want, config, model, ctx):
    ids, _ = got
    if len(set(map(repr, ids))) != len(ids):
        raise AssertionError(f"contribution ids are not unique: {ids}")
    if sorted(map(repr, ids)) != sorted(map(repr, want[0])):
        raise AssertionError(f"contribution ids: expected the callers' ids of the non-empty rows "
                             f"{want[0]}, got {ids}")


def _check_shapes(got, want, config, model, ctx):
    ids, tensors = got
    params = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise AssertionError(f"contributions: expected one entry per trainable parameter "
                             f"{sorted(params)}, got {sorted(tensors)}")
    for n, shape in params.items():
        if tuple(tensors[n].shape) != (len(want[0]), *shape):
            raise AssertionError(f"contributions[{n!r}]: expected shape "
                                 f"{(len(want[0]), *shape)} (units x full parameter shape), "
                                 f"got {tuple(tensors[n].shape)}")


def _check_values(got, want, config, model, ctx):
    (ids, tensors), (ref_ids, ref_tensors) = got, want
    index = {repr(i): k for k, i in enumerate(ids)}
    for k, sid in enumerate(ref_ids):
        if repr(sid) not in index:
            raise AssertionError(f"contributions: no entry for sample id {sid!r} (got ids {ids})")
        j = index[repr(sid)]
        actual = {n: t[j] for n, t in tensors.items() if n in ref_tensors}
        expected = {n: t[k] for n, t in ref_tensors.items()}
        _check_close(actual, expected, ctx, f"contribution of sample {sid!r} vs fisher_ref g²",
                     config)


contributions_keyed_by_ids = _contributions_property(
    "contributions_keyed_by_ids", _check_ids,
    "Contributions carry exactly the callers' sample ids (opaque: 'doc_a_1' is one id).")
contributions_full_shape = _contributions_property(
    "contributions_full_shape", _check_shapes,
    "Contributions have shape [U, *param.shape] for every parameter: no group reduction.")
contributions_agreement = _contributions_property(
    "contributions_agreement", _check_values,
    "Each sample's contribution equals its own squared gradient g_u² (fisher_ref).")


PROPERTIES = {
    "empirical_fisher_agreement": empirical_fisher_agreement,
    "squared_mean_gradient_agreement": squared_mean_gradient_agreement,
    "micro_batch_invariance": micro_batch_invariance,
    "split_invariance": split_invariance,
    "duplication_invariance": duplication_invariance,
    "loss_scaling": loss_scaling,
    "group_fisher_agreement": group_fisher_agreement,
    "contributions_agreement": contributions_agreement,
    "contributions_full_shape": contributions_full_shape,
    "contributions_keyed_by_ids": contributions_keyed_by_ids,
    "slices_agreement": attn.slices_agreement,
    "slices_partition": attn.slices_partition,
    "slices_semantic": attn.slices_semantic,
    "interference_agreement": attn.interference_agreement,
    "interference_identity": attn.interference_identity,
    "interference_nonnegative": attn.interference_nonnegative,
    "pvalues_positive": stats.pvalues_positive,
    "pvalues_calibrated": stats.pvalues_calibrated,
    "qvalues_statsmodels": stats.qvalues_statsmodels,
}
