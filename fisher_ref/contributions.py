r"""Per-unit contributions :math:`C_u = g_u^2` at full parameter shape (SPEC §5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fisher_ref._types import Batch, LossFn, SampleId
from fisher_ref.results import PerUnit
from fisher_ref.units import per_sample_gradients


def contributions_from_gradients(grads: PerUnit) -> PerUnit:
    r"""Square each unit's gradient: :math:`C_u[p] = g_u[p]^2`, same ids and weights.

    Args:
        grads: per-unit gradients, ``tensors[name]`` of shape ``Tensor[units, *param_shape]``.

    Returns:
        PerUnit: the contributions, ``Tensor[units, *param_shape]`` per parameter.
    """
    return PerUnit({n: g.square() for n, g in grads.tensors.items()}, list(grads.ids),
                   grads.weights.clone(), list(grads.empty_ids))


def per_sample_contributions(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn | None = None,
                             unit: str = "sample", weighting: str = "sample",
                             sample_ids: Sequence[SampleId] | None = None) -> PerUnit:
    r"""Per-unit contributions to the empirical Fisher, before any group reduction.

    .. math::

        C_u[p] = g_u[p]^2, \qquad F[p] = \frac{\sum_u w_u C_u[p]}{\sum_u w_u}

    Args:
        model: any ``torch.nn.Module`` (copied to float64; never modified).
        batch: dict of tensors ``Tensor[batch, ...]``, optionally ``sample_ids``.
        loss_fn: per-row loss; ``None`` means ``causal_lm_loss`` (``reduction="mean"``).
        unit: ``"sample"`` or ``"token"`` (see :func:`fisher_ref.units.per_sample_gradients`).
        weighting: ``"sample"`` (w = 1) or ``"token"`` (w = K_i for sample units).
        sample_ids: row ids, unless the batch carries them.

    Returns:
        PerUnit: ``tensors[name]`` of shape ``Tensor[units, *param_shape]`` (float64), the units'
        ``ids`` (the callers' sample ids, or ``(sample_id, position)`` for token units),
        ``weights`` and ``empty_ids``.
    """
    grads = per_sample_gradients(model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting,
                                 sample_ids=sample_ids)
    return contributions_from_gradients(grads)
