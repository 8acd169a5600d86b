"""What the estimator properties share: drawing cases, calling adapters, comparing, diagnosing.

An estimator case is ``(config, data, sizes, opts)``: a model config of either family, a
``DataSpec``, the split sizes and the options drawn (``unit``, ``weighting``, ``reduction``).
``EstimateMismatch`` carries what the adapter returned, so that the engine's ``diagnose``
hook can fit it against the catalogue of :mod:`fisher_ref.conformance.diagnosis`.
"""

from __future__ import annotations

import torch
from hypothesis import assume
from hypothesis import strategies as st

from fisher_ref.conformance.cases import (
    case_loss,
    data_specs,
    describe_case,
    family_of,
    join,
    split_batch,
    splits,
    tiny_configs,
)
from fisher_ref.conformance.diagnosis import Candidate, diagnose_estimate
from fisher_ref.conformance.engine import Context
from fisher_ref.conformance.outputs import tensor_dict
from fisher_ref.testing.compare import compare_dicts

ESTIMATORS = ("empirical_fisher", "squared_mean_gradient")
SIGNED_QUANTITIES = ("squared_mean_gradient",)  # (E[g])² cancels: the signed float32 row


class EstimateMismatch(AssertionError):
    """A definition is broken; ``actual`` is what the adapter returned (for the diagnosis),
    ``presented`` the batches it was given, ``loss_fn`` the loss it was given.
    """

    def __init__(self, message: str, actual: dict, presented: list, loss_fn, estimator: str):
        super().__init__(message)
        self.actual, self.presented, self.loss_fn, self.estimator = actual, presented, loss_fn, estimator


def check_close(actual: dict, expected: dict, ctx: Context, what: str, config, *,
                estimator: str = "empirical_fisher", presented=None, loss_fn=None,
                scale: float = 1.0) -> None:
    """Raise :class:`EstimateMismatch` listing every tensor outside the tolerance.

    ``scale`` multiplies the absolute tolerance (a loss scaled by c: c²).
    """
    quantity = "signed" if estimator in SIGNED_QUANTITIES else "squares"
    tol = ctx.close(config, quantity)
    bad = compare_dicts(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale,
                        atol_scale=tol["atol_scale"], what=what)
    if bad:
        lines = "\n  ".join(m.message for m in bad[:6])
        more = f"\n  ... and {len(bad) - 6} more" if len(bad) > 6 else ""
        raise EstimateMismatch(f"{what}: {len(bad)} parameter(s) differ:\n  {lines}{more}", actual,
                               presented, loss_fn, estimator)


def estimate(adapter, name: str, model, batches, loss_fn, **options) -> dict:
    """``adapter.<name>(model, batches, loss_fn=..., **options)`` as float64 CPU tensors."""
    return tensor_dict(getattr(adapter, name)(model, batches, loss_fn=loss_fn, **options), name)


def case_options(opts: dict) -> tuple[dict, str]:
    """The estimator keyword options of ``opts`` and the row reduction."""
    est = {k: v for k, v in opts.items() if k in ("unit", "weighting")}
    return est, opts.get("reduction", "mean")


def oracle_units(ctx: Context, model, config, data, opts: dict, batch=None, loss_fn=None):
    """The oracle's per-unit gradients of a case (memoized on the case, not the split)."""
    est, reduction = case_options(opts)
    loss = case_loss(config, reduction) if loss_fn is None else loss_fn
    rows = data.batch() if batch is None else batch
    key = ("units", config, data, tuple(sorted(opts.items())), repr(loss), batch is None)
    return ctx.memo(key, lambda: ctx.oracle.per_unit(model, [rows], loss_fn=loss, **est))


@st.composite
def estimator_cases(draw, ctx: Context, min_rows: int = 1, options: bool = False,
                    allow_empty: bool = True, archs=None):
    """``(config, data, sizes, opts)``: a model of the context's architectures (or
    ``archs``), its rows, a split, and (``options``) the unit, weighting and reduction.
    """
    config = draw(tiny_configs(tuple(archs or ctx.archs), size=ctx.size))
    data = draw(data_specs(config, dtype=ctx.dtype, min_rows=min_rows, allow_empty=allow_empty,
                           size=ctx.size))
    sizes = draw(splits(data.batch_size))
    opts = {}
    if options:
        opts = {"unit": draw(st.sampled_from(ctx.units)),
                "weighting": draw(st.sampled_from(ctx.weightings))}
    if len(ctx.row_reductions) > 1:
        opts["reduction"] = draw(st.sampled_from(ctx.row_reductions))
    return config, data, sizes, opts


def cover_estimator_cases(ctx: Context, **kwargs):
    """``arch -> strategy``: :func:`estimator_cases` on one architecture (for coverage)."""
    def cover(arch):
        if arch not in ctx.archs:
            return None
        return estimator_cases(ctx, archs=(arch,), **kwargs)
    return cover


def describe_estimator_case(example) -> str:
    """The model, rows, split and options of an estimator case."""
    config, data, sizes, opts = example[:4]
    text = describe_case(config, data, sizes)
    return text + (f"; options {opts}" if opts else "")


def require_distinct_rows(ctx: Context, model, config, data, opts) -> None:
    """``assume`` at least two units whose gradients differ, so that E[g²] != (E[g])²."""
    pu = oracle_units(ctx, model, config, data, opts)
    assume(pu.n_units >= 2)
    spread = max(float((g - g[:1]).abs().max()) for g in pu.tensors.values())
    scale = max(float(g.abs().max()) for g in pu.tensors.values())
    assume(spread > 1e-6 * scale)


def diagnosis_tolerance(ctx: Context, config=None, estimator: str = "empirical_fisher") -> dict:
    """When a catalogue quantity counts as what was returned: the property's own
    element-wise tolerance (``compare_dicts`` keywords).
    """
    quantity = "signed" if estimator in SIGNED_QUANTITIES else "squares"
    return ctx.close(config, quantity)


def other_option_candidates(ctx: Context, model, batch, config, opts, estimator: str) -> list:
    """The same estimator under the other unit, weighting and reduction (oracle)."""
    est, reduction = case_options(opts)
    out = []
    is_lm = family_of(config) == "causal_lm"
    variants = []
    if is_lm:
        for unit in ("sample", "token"):
            for weighting in ("sample", "token"):
                if (unit, weighting) != (est.get("unit", "sample"), est.get("weighting", "sample")):
                    variants.append(({"unit": unit, "weighting": weighting}, reduction))
        variants.append((est, "sum" if reduction == "mean" else "mean"))
    for options, red in variants:
        value = estimate(ctx.oracle, estimator, model, [batch], case_loss(config, red), **options)
        label = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"
        out.append(Candidate(f"{estimator}({label}, reduction={red!r})", value))
    return out


def diagnose_estimator(ctx: Context, exc: EstimateMismatch, config, model, opts: dict,
                       extra: list = (), reduce=None) -> str:
    """The diagnosis line of a failed estimator comparison (see :mod:`diagnosis`)."""
    batches = exc.presented
    batch = join(batches)
    est, _ = case_options(opts)
    pu = ctx.oracle.per_unit(model, [batch], loss_fn=exc.loss_fn, **est)
    n_tokens = None
    loss = exc.loss_fn
    if hasattr(loss, "token_counts"):
        n_tokens = int(loss.token_counts(batch).sum())
    cands = list(extra)
    if reduce is None and hasattr(loss, "token_counts"):
        cands += other_option_candidates(ctx, model, batch, config, opts, exc.estimator)
    tol = diagnosis_tolerance(ctx, config, exc.estimator)
    return diagnose_estimate(exc.actual, pu, tolerance=tol,
                             batch_ids=[list(b["sample_ids"]) for b in batches],
                             n_tokens=n_tokens, extra=cands, reduce=reduce)


def presented_split(data, sizes) -> list:
    """The batches of a case as the adapter is fed them."""
    return split_batch(data.batch(), sizes)


def as_float64(d: dict) -> dict:
    """Every tensor of ``d`` in float64."""
    return {k: v.to(torch.float64) for k, v in d.items()}
