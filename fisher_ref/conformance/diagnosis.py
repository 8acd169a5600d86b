r"""Name what a failing implementation computed: fit its result against known wrong quantities.

When an estimator property fails, the harness knows the example (model, rows, split) and
what the implementation returned. It builds a *catalogue* of quantities from the oracle's
per-unit gradients :math:`g_u` of the same rows, the SPEC estimators and their classic
variants,

- :math:`F = \sum_u w_u g_u^2 / W` (``empirical_fisher``), :math:`S = \bar g^2`
  (``squared_mean_gradient``), :math:`V = F - S` (``gradient_variance``),
  :math:`B_b` for :math:`1 < b < U` (``batch_squared_gradient(b)``);
- the same over the batches as the implementation was fed them (the squared summed
  gradient of each batch, the unweighted mean of per-batch F, the last batch's F) and over
  the first k units only;
- any extra quantity a property adds (another unit or weighting, the Fisher of the argmax
  labels, task B's Fisher, the unscaled loss, ...);

each times a named scale (``/ n_units``, ``× n_units``, ``/ n_units²``, ``/ n_tokens``,
``× n_tokens``) and then, for the best ones, plus a fitted constant ε, rounded to float16,
or with values below float16's smallest normal flushed to zero. A candidate *fits* when the
implementation's result equals it within the property's own element-wise tolerance
(``compare_dicts``: a 1e-8 ridge is no fit for F, however small its L2 norm); the best fit
by relative L2 error over every tensor is reported by name:

    matches squared_mean_gradient / n_tokens to 2e-16

or, where no candidate is within the tolerance, ``no known wrong quantity fits (closest:
...)``. Candidates that fit equally well (on one unit F = S) are all named, since the
example cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fisher_ref.gradient_moments import (
    batch_squared_gradient_of,
    empirical_fisher_of,
    gradient_variance_of,
    squared_mean_gradient_of,
)
from fisher_ref.results import PerUnit
from fisher_ref.testing.compare import compare_dicts

FLOAT16_TINY = 6.103515625e-05  # smallest normal float16
FLOAT16_SLACK = 2e-2  # float16 keeps ~3 digits: a float16 candidate fits to ~1e-3
TIE_FACTOR = 10.0  # candidates within this factor of the best fit are indistinguishable


@dataclass
class Candidate:
    """A named quantity: ``value`` keyed like the implementation's result."""

    name: str
    value: dict
    slack: float = 0.0


def relative_error(actual: dict, value: dict) -> float:
    r""":math:`\lVert a - c \rVert_2 / \lVert c \rVert_2` over the common keys (inf if none)."""
    keys = [k for k in value if k in actual and tuple(actual[k].shape) == tuple(value[k].shape)]
    if not keys or len(keys) < len(value):
        return float("inf")
    a = torch.cat([torch.as_tensor(actual[k], dtype=torch.float64).flatten() for k in keys])
    c = torch.cat([value[k].to(torch.float64).flatten() for k in keys])
    den = float(c.norm())
    num = float((a - c).norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def _subset(pu: PerUnit, index: list[int]) -> PerUnit:
    idx = torch.tensor(index, dtype=torch.long)
    return PerUnit({k: g[idx] for k, g in pu.tensors.items()}, [pu.ids[i] for i in index],
                   pu.weights[idx], list(pu.empty_ids))


def _batch_units(pu: PerUnit, batch_ids: list[list]) -> list[list[int]]:
    """Unit indices of each batch (by sample id; token units by their row's id)."""
    row = [u[0] if isinstance(u, tuple) else u for u in pu.ids]
    out = []
    for ids in batch_ids:
        wanted = {repr(i) for i in ids}
        units = [k for k, r in enumerate(row) if repr(r) in wanted]
        if units:
            out.append(units)
    return out


def estimator_bases(pu: PerUnit, batch_ids: list[list] | None = None) -> list[Candidate]:
    """The SPEC estimators and their classic variants from per-unit gradients ``pu``."""
    U = pu.n_units
    out = [Candidate("empirical_fisher", dict(empirical_fisher_of(pu))),
           Candidate("squared_mean_gradient", dict(squared_mean_gradient_of(pu)))]
    if U > 1:
        out.append(Candidate("gradient_variance", dict(gradient_variance_of(pu))))
    for b in sorted({2, 3, 4, 8, U // 2} - {0, 1}):
        if b < U:
            out.append(Candidate(f"batch_squared_gradient({b})", dict(batch_squared_gradient_of(pu, b))))
    for k in sorted({1, 2, 4, 8, U // 2, U - 1} - {0}):
        if k < U:
            out.append(Candidate(f"empirical_fisher of the first {k} units",
                                 dict(empirical_fisher_of(_subset(pu, list(range(k)))))))
    groups = _batch_units(pu, batch_ids) if batch_ids else []
    for b in (2, 4):
        if groups and b < U:
            out.append(_micro_batch_mean(pu, groups, b))
    if len(groups) >= 1:
        W = pu.weights.sum()
        summed = {}
        for n, g in pu.tensors.items():
            w = pu.weights.reshape(-1, *[1] * (g.dim() - 1))
            summed[n] = sum((w[u] * g[u]).sum(0).square() for u in groups) / W
        out.append(Candidate("the squared summed gradient of each batch / n_units", summed))
        per_batch = [empirical_fisher_of(_subset(pu, u)) for u in groups]
        if len(groups) > 1:
            out.append(Candidate("the unweighted mean of each batch's empirical_fisher",
                                 {n: sum(f[n] for f in per_batch) / len(per_batch) for n in pu.tensors}))
            out.append(Candidate("the last batch's empirical_fisher", dict(per_batch[-1])))
    return out


def _micro_batch_mean(pu: PerUnit, groups: list[list[int]], b: int) -> Candidate:
    """The unweighted mean, over micro-batches of b consecutive units restarting in each
    batch as fed, of the squared micro-batch mean gradient.
    """
    chunks = [units[s:s + b] for units in groups for s in range(0, len(units), b)]
    value = {}
    for n, g in pu.tensors.items():
        value[n] = sum(g[c].mean(0).square() for c in chunks) / len(chunks)
    return Candidate(f"the unweighted mean over micro-batches of {b} (in each batch) of the "
                     f"squared micro-batch mean gradient", value)


def named_scales(n_units: int, n_tokens: int | None) -> dict[str, float]:
    """The named factors a result is commonly off by (distinct values only: on one unit,
    ``/ n_units`` is no factor at all).
    """
    scales = {"": 1.0}
    if n_units != 1:
        scales.update({" / n_units": 1.0 / n_units, " × n_units": float(n_units),
                       " / n_units²": 1.0 / n_units ** 2})
    if n_tokens and n_tokens not in (1, n_units):
        scales.update({" / n_tokens": 1.0 / n_tokens, " × n_tokens": float(n_tokens)})
    return scales


def _scaled(base: Candidate, scales: dict[str, float]) -> list[Candidate]:
    return [Candidate(base.name + suffix, {k: v * s for k, v in base.value.items()}, base.slack)
            for suffix, s in scales.items()]


def _variants(base: Candidate, actual: dict) -> list[Candidate]:
    """``base + ε`` (ε fitted), float16-rounded, and flushed below float16's smallest normal."""
    keys = [k for k in base.value if k in actual]
    if not keys:
        return []
    diff = torch.cat([(torch.as_tensor(actual[k], dtype=torch.float64) - base.value[k]).flatten()
                      for k in keys])
    eps = float(diff.median())
    out = []
    if eps != 0.0:
        out.append(Candidate(f"{base.name} + {eps:.1g}", {k: v + eps for k, v in base.value.items()}))
    out.append(Candidate(f"{base.name} rounded to float16",
                         {k: v.to(torch.float16).to(torch.float64) for k, v in base.value.items()},
                         FLOAT16_SLACK))
    flushed = {k: torch.where(v.abs() < FLOAT16_TINY, torch.zeros_like(v), v)
               for k, v in base.value.items()}
    if any(not torch.equal(flushed[k], base.value[k]) for k in flushed):
        out.append(Candidate(f"{base.name} with entries below float16's smallest normal flushed "
                             f"to 0", flushed))
    return out


def _fitted_scale(base: Candidate, actual: dict) -> Candidate | None:
    keys = [k for k in base.value if k in actual]
    a = torch.cat([torch.as_tensor(actual[k], dtype=torch.float64).flatten() for k in keys])
    c = torch.cat([base.value[k].flatten() for k in keys])
    den = float(c.dot(c))
    if den == 0.0:
        return None
    alpha = float(a.dot(c)) / den
    if abs(alpha - 1.0) < 1e-6:
        return None  # the candidate itself, already named
    return Candidate(f"{alpha:.4g} × {base.name}", {k: v * alpha for k, v in base.value.items()})


def fits(actual: dict, candidate: Candidate, tolerance) -> bool:
    """Whether ``actual`` equals the candidate within ``tolerance``: a float (relative L2
    error, plus the candidate's slack) or ``compare_dicts`` keywords (``rtol``, ``atol``,
    ``atol_scale``; the slack raises the rtol).
    """
    if isinstance(tolerance, (int, float)):
        return relative_error(actual, candidate.value) <= tolerance + candidate.slack
    if set(candidate.value) - set(actual):
        return False
    kw = dict(tolerance, rtol=max(tolerance["rtol"], candidate.slack))
    try:
        return not compare_dicts({k: actual[k] for k in candidate.value}, candidate.value, **kw)
    except RuntimeError:  # shapes that do not broadcast: no fit
        return False


def best_fit(actual: dict, candidates: list[Candidate], tolerance) -> str:
    """The diagnosis line for ``actual`` against ``candidates`` (already scaled).

    ``tolerance`` says when a candidate fits (see :func:`fits`); the best fit by relative
    L2 error, and the other fits within ``TIE_FACTOR`` of it (quantities this example cannot
    tell apart), are named.
    """
    ranked = sorted(((relative_error(actual, c.value), i, c) for i, c in enumerate(candidates)),
                    key=lambda t: (t[0], t[1]))
    if not ranked:
        return "no diagnosis (no candidate quantity)"
    fitting = [(e, c) for e, _, c in ranked if fits(actual, c, tolerance)]
    if not fitting:
        err, _, best = ranked[0]
        return f"no known wrong quantity fits (closest: {best.name}, relative error {err:.2g})"
    err, best = fitting[0]
    ties = [c.name for e, c in fitting[1:] if e <= max(TIE_FACTOR * err, 1e-12)][:3]
    text = f"matches {best.name} to {err:.1g}"
    if ties:
        text += f" (indistinguishable on this example from {', '.join(ties)})"
    return text


def diagnose_estimate(actual: dict, pu: PerUnit, *, tolerance, batch_ids=None,
                      n_tokens: int | None = None, extra: list[Candidate] = (),
                      reduce=None, scales: dict[str, float] | None = None) -> str:
    """The diagnosis line of an estimator's result ``actual`` (``{name: Tensor}``).

    Args:
        actual: what the implementation returned.
        pu: the oracle's per-unit gradients of the rows the implementation was given.
        tolerance: when a candidate fits (:func:`fits`).
        batch_ids: the sample ids of each batch, as fed (for the per-batch candidates).
        n_tokens: the total active label tokens (for the token-count scales).
        extra: more base candidates (e.g. another weighting, the argmax-label Fisher).
        reduce: maps a full-shape candidate to the result's form (group means).
        scales: named scales (default :func:`named_scales`).
    """
    actual = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in actual.items()}
    bases = estimator_bases(pu, batch_ids) + list(extra)
    if reduce is not None:
        bases = [Candidate(b.name, reduce(b.value), b.slack) for b in bases]
    scales = named_scales(pu.n_units, n_tokens) if scales is None else scales
    scaled = [c for b in bases for c in _scaled(b, scales)]
    ranked = sorted(scaled, key=lambda c: relative_error(actual, c.value))
    more = [v for c in ranked[:4] for v in _variants(c, actual)]
    fitted = [f for f in (_fitted_scale(c, actual) for c in ranked[:1]) if f is not None]
    return best_fit(actual, scaled + more + fitted, tolerance)
