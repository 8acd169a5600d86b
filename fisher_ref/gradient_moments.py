r"""Gradient moments: mean gradient, empirical Fisher, squared mean, variance, and the
legacy batch-squared estimator (SPEC §2), all diagonal and per parameter element.

With units u, per-unit gradients :math:`g_u` and weights :math:`w_u`, :math:`W = \sum_u w_u`:

.. math::
    \bar g = \frac{1}{W}\sum_u w_u g_u, \qquad
    F = \frac{1}{W}\sum_u w_u g_u^2, \qquad
    S = \bar g^2, \qquad
    V = \frac{1}{W}\sum_u w_u (g_u - \bar g)^2 = F - S.

Each estimator exists twice: ``empirical_fisher(model, batch, ...)`` computes the
gradients, ``empirical_fisher_of(per_unit)`` reuses a :class:`~fisher_ref.results.PerUnit`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fisher_ref._checks import check_positive_int
from fisher_ref._types import Batch, LossFn, SampleId
from fisher_ref.results import FisherResult, PerUnit
from fisher_ref.units import per_sample_gradients


def _w(weights: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Weights ``Tensor[units]`` broadcast against a ``Tensor[units, *param_shape]``."""
    return weights.reshape(-1, *[1] * (g.dim() - 1))


def mean_gradient_of(pu: PerUnit) -> FisherResult:
    r""":math:`\bar g = \sum_u w_u g_u / W` from per-unit gradients.

    Args:
        pu: per-unit gradients, ``Tensor[units, *param_shape]`` per parameter, and weights.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    W = pu.weights.sum()
    return pu.result({k: (_w(pu.weights, g) * g).sum(0) / W for k, g in pu.tensors.items()})


def empirical_fisher_of(pu: PerUnit) -> FisherResult:
    r""":math:`F = \sum_u w_u g_u^2 / W` (square each unit, then average).

    Args:
        pu: per-unit gradients, ``Tensor[units, *param_shape]`` per parameter, and weights.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    W = pu.weights.sum()
    return pu.result({k: (_w(pu.weights, g) * g.square()).sum(0) / W for k, g in pu.tensors.items()})


def squared_mean_gradient_of(pu: PerUnit) -> FisherResult:
    r""":math:`S = \bar g^2` (average, then square).

    Args:
        pu: per-unit gradients, ``Tensor[units, *param_shape]`` per parameter, and weights.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    return pu.result({k: v.square() for k, v in mean_gradient_of(pu).items()})


def gradient_variance_of(pu: PerUnit, unbiased: bool = False) -> FisherResult:
    r"""Weighted population variance :math:`V = \sum_u w_u (g_u - \bar g)^2 / W`.

    Computed in the centred two-pass form, which equals :math:`F - S` in exact arithmetic
    and is never negative, so no clamping is needed. ``unbiased=True`` multiplies by
    :math:`W^2 / (W^2 - \sum_u w_u^2)` (reliability weights; :math:`U/(U-1)` for unit
    weights) and needs at least two units.

    Args:
        pu: per-unit gradients, ``Tensor[units, *param_shape]`` per parameter, and weights.
        unbiased: apply the reliability-weights correction.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    if unbiased and pu.n_units < 2:
        raise ValueError(f"gradient_variance(unbiased=True): expected at least 2 units, got {pu.n_units}.")
    w, W = pu.weights, pu.weights.sum()
    mean = mean_gradient_of(pu)
    out = {k: (_w(w, g) * (g - mean[k]).square()).sum(0) / W for k, g in pu.tensors.items()}
    if unbiased:
        factor = W * W / (W * W - w.square().sum())
        out = {k: v * factor for k, v in out.items()}
    return pu.result(out)


def batch_squared_gradient_of(pu: PerUnit, micro_batch_size: int) -> FisherResult:
    r"""Legacy estimator: mean over micro-batches of the squared micro-batch mean gradient.

    The units, in order, are split into micro-batches m of ``micro_batch_size`` consecutive
    units (the last may be shorter), with weight :math:`W_m` and mean :math:`\bar g_m`:

    .. math:: B_b = \frac{1}{W} \sum_m W_m \bar g_m^2 .

    :math:`B_1 = F` and :math:`B_b = S` for :math:`b \ge U`. Exists to measure the gap
    between the two, never as a default.

    Args:
        pu: per-unit gradients, ``Tensor[units, *param_shape]`` per parameter, and weights.
        micro_batch_size: b >= 1.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    b = check_positive_int("micro_batch_size", micro_batch_size)
    W = pu.weights.sum()
    out = {}
    for k, g in pu.tensors.items():
        acc = torch.zeros_like(g[0])
        for s in range(0, pu.n_units, b):
            w = pu.weights[s:s + b]
            Wm = w.sum()
            gm = (_w(w, g[s:s + b]) * g[s:s + b]).sum(0) / Wm
            acc = acc + Wm * gm.square()
        out[k] = acc / W
    return pu.result(out)


def mean_gradient(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn | None = None,
                  unit: str = "sample", weighting: str = "sample",
                  sample_ids: Sequence[SampleId] | None = None) -> FisherResult:
    r"""Mean gradient :math:`\bar g = \frac{1}{W}\sum_u w_u g_u`.

    Args:
        model: any ``torch.nn.Module`` (copied to float64; never modified).
        batch: dict of tensors ``Tensor[batch, ...]``, optionally ``sample_ids``.
        loss_fn: per-row loss; ``None`` means ``causal_lm_loss`` (``reduction="mean"``).
        unit: ``"sample"`` or ``"token"``.
        weighting: ``"sample"`` (w = 1) or ``"token"`` (w = K_i for sample units).
        sample_ids: row ids, unless the batch carries them.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    return mean_gradient_of(per_sample_gradients(
        model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting, sample_ids=sample_ids))


def empirical_fisher(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn | None = None,
                     unit: str = "sample", weighting: str = "sample",
                     sample_ids: Sequence[SampleId] | None = None) -> FisherResult:
    r"""Empirical Fisher diagonal :math:`F = \frac{1}{W}\sum_u w_u g_u^2` (E[g²]).

    Scaling: multiplying every loss by c multiplies F by :math:`c^2`; with
    ``reduction="sum"`` a row's gradient is :math:`K_i` times its ``"mean"`` gradient.
    No token-count division beyond what ``loss_fn`` and ``weighting`` say, no epsilon.

    Args:
        model: any ``torch.nn.Module`` (copied to float64; never modified).
        batch: dict of tensors ``Tensor[batch, ...]``, optionally ``sample_ids``.
        loss_fn: per-row loss; ``None`` means ``causal_lm_loss`` (``reduction="mean"``).
        unit: ``"sample"`` or ``"token"``.
        weighting: ``"sample"`` (w = 1) or ``"token"`` (w = K_i for sample units).
        sample_ids: row ids, unless the batch carries them.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    return empirical_fisher_of(per_sample_gradients(
        model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting, sample_ids=sample_ids))


def squared_mean_gradient(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn | None = None,
                          unit: str = "sample", weighting: str = "sample",
                          sample_ids: Sequence[SampleId] | None = None) -> FisherResult:
    r"""Squared mean gradient :math:`S = \bar g^2` ((E[g])²); :math:`S \le F`.

    Args:
        model: any ``torch.nn.Module`` (copied to float64; never modified).
        batch: dict of tensors ``Tensor[batch, ...]``, optionally ``sample_ids``.
        loss_fn: per-row loss; ``None`` means ``causal_lm_loss`` (``reduction="mean"``).
        unit: ``"sample"`` or ``"token"``.
        weighting: ``"sample"`` (w = 1) or ``"token"`` (w = K_i for sample units).
        sample_ids: row ids, unless the batch carries them.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    return squared_mean_gradient_of(per_sample_gradients(
        model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting, sample_ids=sample_ids))


def gradient_variance(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn | None = None,
                      unit: str = "sample", weighting: str = "sample",
                      sample_ids: Sequence[SampleId] | None = None,
                      unbiased: bool = False) -> FisherResult:
    r"""Gradient variance :math:`V = F - S = \frac{1}{W}\sum_u w_u (g_u-\bar g)^2 \ge 0`.

    Args:
        model: any ``torch.nn.Module`` (copied to float64; never modified).
        batch: dict of tensors ``Tensor[batch, ...]``, optionally ``sample_ids``.
        loss_fn: per-row loss; ``None`` means ``causal_lm_loss`` (``reduction="mean"``).
        unit: ``"sample"`` or ``"token"``.
        weighting: ``"sample"`` (w = 1) or ``"token"`` (w = K_i for sample units).
        sample_ids: row ids, unless the batch carries them.
        unbiased: multiply by :math:`W^2/(W^2-\sum_u w_u^2)` (:math:`U/(U-1)` for unit
            weights); needs at least two units.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    return gradient_variance_of(per_sample_gradients(
        model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting, sample_ids=sample_ids),
        unbiased=unbiased)


def batch_squared_gradient(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn | None = None,
                           unit: str = "sample", weighting: str = "sample",
                           sample_ids: Sequence[SampleId] | None = None,
                           micro_batch_size: int = 1) -> FisherResult:
    r"""Legacy :math:`B_b = \frac{1}{W}\sum_m W_m \bar g_m^2` over consecutive micro-batches of b units.

    Equals F at ``micro_batch_size=1`` and S at ``micro_batch_size >= U``.

    Args:
        model: any ``torch.nn.Module`` (copied to float64; never modified).
        batch: dict of tensors ``Tensor[batch, ...]``, optionally ``sample_ids``.
        loss_fn: per-row loss; ``None`` means ``causal_lm_loss`` (``reduction="mean"``).
        unit: ``"sample"`` or ``"token"``.
        weighting: ``"sample"`` (w = 1) or ``"token"`` (w = K_i for sample units).
        sample_ids: row ids, unless the batch carries them.
        micro_batch_size: b >= 1, the units per micro-batch, in order.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    check_positive_int("micro_batch_size", micro_batch_size)
    return batch_squared_gradient_of(per_sample_gradients(
        model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting, sample_ids=sample_ids),
        micro_batch_size)
