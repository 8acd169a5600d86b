r"""Estimators from a task's moment states (docs/architecture.md conventions).

.. math::

    \bar g = \text{mean}, \quad F = \frac{M_2}{W} + \bar g^2, \quad S = \bar g^2,
    \quad V = \frac{M_2}{W} \;\Big(\times \frac{W^2}{W^2 - \sum_u w_u^2}
    \text{ if unbiased}\Big)

V comes straight from the sum of squared deviations M2, so it is never negative and needs
no clamp. Group statistics: mean = R(F), variance = M2_f / W of f_u = R(g_u²),
stderr = sqrt(variance / U), snr = mean / stderr, n = U.
"""

from __future__ import annotations

import torch

from ..results import FisherResult
from ..stats.moments import SecondMoment
from ..stats.task_state import TaskState


def _result(state: TaskState, tensors: dict) -> FisherResult:
    return FisherResult(tensors, n_units=state.n_units, total_weight=state.total_weight,
                        empty_ids=state.empty_ids)


def _moments(state: TaskState, what: str) -> dict:
    if not state.moments:
        raise ValueError(f"{what}: expected per-element moments, got an accumulator that "
                         "keeps only group statistics (elements=False).")
    return state.moments


def mean_gradient(state: TaskState) -> FisherResult:
    """ḡ per element."""
    return _result(state, {k: m.mean.clone() for k, m in _moments(state, "mean_gradient").items()})


def empirical_fisher(state: TaskState, discard: bool = False) -> FisherResult:
    """F = E[g²] per element. ``discard``: the state is thrown away after this call (the functional API), so a
    ``SecondMoment``'s array may be handed out instead of copied.
    """
    def f(m):
        return m.second_moment(copy=False) if isinstance(m, SecondMoment) and discard \
            else m.second_moment()
    return _result(state, {k: f(m) for k, m in _moments(state, "empirical_fisher").items()})


def squared_mean_gradient(state: TaskState) -> FisherResult:
    """S = ḡ² per element."""
    return _result(state, {k: m.mean.square() for k, m in
                           _moments(state, "squared_mean_gradient").items()})


def gradient_variance(state: TaskState, unbiased: bool = False) -> FisherResult:
    """V = M2 / W per element (× W²/(W² − Σw²) when ``unbiased``)."""
    out = {k: m.variance() for k, m in _moments(state, "gradient_variance").items()}
    if unbiased:
        W2 = state.total_weight ** 2
        if state.n_units < 2 or W2 - state.sum_w2 <= 0:
            raise ValueError(f"gradient_variance(unbiased=True): expected at least two units, "
                             f"got {state.n_units}.")
        out = {k: v * (W2 / (W2 - state.sum_w2)) for k, v in out.items()}
    return _result(state, out)


def batch_squared_gradient(state: TaskState, micro_batch_size: int) -> FisherResult:
    """B_b per element, from the micro-batch states of size ``micro_batch_size``."""
    if micro_batch_size not in state.micro:
        raise ValueError(f"micro_batch_size: expected one of the tracked sizes "
                         f"{sorted(state.micro)}, got {micro_batch_size!r}.")
    W = state.total_weight
    return _result(state, {k: s.value(W) for k, s in state.micro[micro_batch_size].items()})


def group_fisher(state: TaskState) -> FisherResult:
    """Per group: mean, variance, stderr, snr and n of f_u = R(g_u²)."""
    if not state.group_moments:
        raise ValueError("group_fisher: expected group statistics, got an accumulator built "
                         "without groups (pass groups='generic' or 'heads').")
    out = {}
    for k, m in state.group_moments.items():
        mean, var = m.mean.clone(), m.variance()
        stderr = (var / state.n_units).sqrt()
        out[k] = {"mean": mean, "variance": var, "stderr": stderr, "snr": mean / stderr,
                  "n": torch.full(mean.shape, state.n_units, dtype=torch.long, device=mean.device)}
    return _result(state, out)
