r"""The named properties for the true (model-sampled) Fisher: ``exact_fisher`` and ``mc_fisher``.

The true Fisher replaces each data label by one drawn from the model's own predictive
distribution. Its expectation over the draws is exact for one label per unit:

.. math:: F^{\mathrm{exact}} = \frac{1}{W} \sum_u w_u \sum_c p_{u,c}\, (\nabla_\theta - \log p_{u,c})^2 .

Classifiers have one label per row, so a sample unit is a token unit; for causal LMs the
harness asks for ``unit="token"``. A Monte-Carlo estimate with n independent draws per unit
is unbiased, with a squared error whose expectation the oracle computes exactly from the
per-class gradients :math:`g_{u,c}`:

.. math:: E \lVert \hat F_{MC} - F^{\mathrm{exact}} \rVert^2 = \frac{1}{n U^2}
   \sum_u \sum_k \mathrm{Var}_{c \sim p_u}\big(g_{u,c,k}^2\big),

whatever the random stream. ``mc_fisher_converges`` bounds the ratio R of the observed
squared error to that expectation (``mc-fisher-conformance``): the classic defect, the
argmax label in place of a draw, has a bias that does not shrink with n, so its R grows
like n.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from fisher_ref.conformance.adapter import provided
from fisher_ref.conformance.cases import (
    arch_family,
    build_case_model,
    case_loss,
    family_of,
    split_batch,
)
from fisher_ref.conformance.diagnosis import Candidate, best_fit
from fisher_ref.conformance.engine import Context, PropertyResult, not_provided, run_property
from fisher_ref.conformance.estimator_cases import (
    EstimateMismatch,
    check_close,
    describe_estimator_case,
    diagnosis_tolerance,
    estimate,
    estimator_cases,
)
from fisher_ref.gradient_moments import empirical_fisher_of
from fisher_ref.losses import IGNORE_INDEX
from fisher_ref.testing.tolerances import tolerance
from fisher_ref.units import prepare, prepared_gradients

MC_SAMPLES = 1000


def _archs(ctx: Context) -> tuple[str, ...]:
    """Classifiers always; causal LMs when the adapter takes token units."""
    return tuple(a for a in ctx.archs
                 if arch_family(a) == "classifier" or "token" in ctx.units)


def _unit(config) -> str:
    return "sample" if family_of(config) == "classifier" else "token"


def argmax_fisher(model, batch: dict, loss) -> dict:
    """The Fisher of the argmax labels (token units): the classic true-Fisher defect."""
    prep = prepare(model, batch, loss_fn=loss, unit="token")
    with torch.no_grad():
        logits, targets = loss.logits_and_targets(prep.model, prep.batch)
    picked = torch.where(targets != IGNORE_INDEX, logits.argmax(-1), targets)
    return dict(empirical_fisher_of(prepared_gradients(prep, picked)))


def mc_error_scale(model, batch: dict, loss) -> tuple[int, float]:
    r"""U and :math:`n\,E\lVert \hat F_{MC} - F \rVert^2`, the expected squared error of
    one draw per unit, from the per-class gradients (oracle, token units).
    """
    prep = prepare(model, batch, loss_fn=loss, unit="token")
    with torch.no_grad():
        logits, targets = loss.logits_and_targets(prep.model, prep.batch)
    active = targets != IGNORE_INDEX
    probs = torch.softmax(logits, -1)[active]  # [U, C], units in row-major order
    first = second = None
    for c in range(logits.shape[-1]):
        g = prepared_gradients(prep, torch.where(active, torch.full_like(targets, c), targets))
        sq = torch.cat([t.flatten(1) for t in g.tensors.values()], dim=1).square()  # [U, K]
        p = probs[:, c:c + 1]
        first = p * sq if first is None else first + p * sq
        second = p * sq.square() if second is None else second + p * sq.square()
    U = first.shape[0]
    variance = (second - first.square()).clamp(min=0).sum() / U ** 2
    return U, float(variance)


def _true_fisher_candidates(ctx: Context, model, batch: dict, loss) -> list[Candidate]:
    exact = estimate(ctx.oracle, "exact_fisher", model, [batch], loss, unit="token")
    data = estimate(ctx.oracle, "empirical_fisher", model, [batch], loss, unit="token")
    return [Candidate("exact_fisher", exact),
            Candidate("the Fisher of the argmax labels (not drawn from the model)",
                      argmax_fisher(model, batch, loss)),
            Candidate("the empirical Fisher of the data labels (not the true Fisher)", data)]


def _scaled_expected(ctx: Context, value: dict, model, batch, loss) -> dict:
    if ctx.unit_reduction == "mean":
        return value
    W = ctx.oracle.per_unit(model, [batch], loss_fn=loss, unit="token").total_weight
    return {k: v * ctx.unit_scale("exact_fisher", W) for k, v in value.items()}


def _diagnose(ctx: Context):
    def diagnose(example, exc):
        if not isinstance(exc, EstimateMismatch):
            return None
        config, data = example[0], example[1]
        model = build_case_model(config, ctx.dtype)
        cands = _true_fisher_candidates(ctx, model, data.batch(), exc.loss_fn)
        return best_fit(exc.actual, cands,
                        getattr(exc, "fit_tolerance", diagnosis_tolerance(ctx, config)))
    return diagnose


def _cover(ctx: Context, **kwargs):
    def cover(arch):
        return estimator_cases(ctx, archs=(arch,), **kwargs) if arch in _archs(ctx) else None
    return cover


def exact_fisher_agreement(adapter, ctx: Context) -> PropertyResult:
    """``exact_fisher`` equals fisher_ref's: the expectation over the classes, per unit."""
    name, needs = "exact_fisher_agreement", ("exact_fisher",)
    archs = _archs(ctx)
    if needs[0] not in provided(adapter) or not archs:
        return not_provided(name, needs)

    def body(example):
        config, data, sizes, opts = example
        model = build_case_model(config, ctx.dtype)
        loss = case_loss(config)
        batch = data.batch()
        presented = split_batch(batch, sizes)
        got = estimate(adapter, "exact_fisher", model, presented, loss, unit=_unit(config))
        want = ctx.memo(("exact", config, data), lambda: estimate(
            ctx.oracle, "exact_fisher", model, [batch], loss, unit="token"))
        check_close(got, _scaled_expected(ctx, want, model, batch, loss), ctx,
                    "exact_fisher vs fisher_ref", config, estimator="exact_fisher",
                    presented=presented, loss_fn=loss)

    return run_property(name, needs, estimator_cases(ctx, archs=archs), body,
                        describe_estimator_case, ctx, cover=_cover(ctx), diagnose=_diagnose(ctx))


def mc_fisher_converges(adapter, ctx: Context) -> PropertyResult:
    """The Monte-Carlo true Fisher of 1000 draws is as close to fisher_ref's ``exact_fisher``
    as independent draws from the model make it: its squared error is at most
    ``mc-fisher-conformance`` times the expectation (module docstring), with any random
    stream (a statistical property), on 4-6 units of a classifier (a causal LM's tokens for
    an adapter without the classifier family). Labels taken as the argmax, or the data's own
    labels, do not converge there.
    """
    name, needs = "mc_fisher_converges", ("mc_fisher",)
    # classifiers where the adapter takes them: 1000 draws of a causal LM's every token is
    # minutes for a per-unit loop; LMs (token units) only for an adapter without classifiers
    archs = tuple(a for a in _archs(ctx) if arch_family(a) == "classifier") or _archs(ctx)
    if needs[0] not in provided(adapter) or not archs:
        return not_provided(name, needs)
    bound = tolerance("mc-fisher-conformance")[0]

    def body(example):
        config, data, sizes, opts, seed = example
        model = build_case_model(config, ctx.dtype)
        loss = case_loss(config)
        batch = data.batch()
        presented = split_batch(batch, sizes)
        got = estimate(adapter, "mc_fisher", model, presented, loss, unit=_unit(config),
                       n_samples=MC_SAMPLES, seed=seed)
        n_units, var1 = ctx.memo(("mc-scale", config, data),
                                 lambda: mc_error_scale(model, batch, loss))
        want = ctx.memo(("exact", config, data), lambda: estimate(
            ctx.oracle, "exact_fisher", model, [batch], loss, unit="token"))
        factor = ctx.unit_scale("exact_fisher", float(n_units))
        want = {k: v * factor for k, v in want.items()}
        expected_sq = var1 * factor ** 2 / MC_SAMPLES
        sq = sum(float((got[k] - want[k]).square().sum()) for k in want if k in got)
        ratio = sq / expected_sq if expected_sq > 0 else (0.0 if sq == 0 else float("inf"))
        if set(got) != set(want) or not ratio <= bound:
            exc = EstimateMismatch(
                f"mc_fisher with {MC_SAMPLES} draws: squared error against fisher_ref's "
                f"exact_fisher {sq:.3g} = {ratio:.3g} x its expectation for independent draws "
                f"from the model ({expected_sq:.3g}); expected at most {bound:g} x", got,
                presented, loss, "mc_fisher")
            norm = sum(float(v.square().sum()) for v in want.values()) ** 0.5
            exc.fit_tolerance = (bound * expected_sq) ** 0.5 / norm if norm else 1e-9
            raise exc

    @st.composite
    def cases(draw, archs=archs):
        config, data, sizes, opts = draw(estimator_cases(ctx, min_rows=4, allow_empty=False,
                                                         archs=archs))
        return config, data, sizes, opts, draw(st.integers(0, 3))

    def cover(arch):
        return cases(archs=(arch,)) if arch in archs else None

    return run_property(name, needs, cases(), body,
                        lambda e: describe_estimator_case(e) + f"; n_samples={MC_SAMPLES}, seed={e[4]}",
                        ctx, max_examples=max(1, ctx.max_examples // 3), cover=cover,
                        diagnose=_diagnose(ctx))

