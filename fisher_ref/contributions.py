r"""Per-unit contributions :math:`C_u = g_u^2` at full parameter shape (SPEC §5)."""

from __future__ import annotations

from fisher_ref.results import PerUnit
from fisher_ref.units import per_sample_gradients


def contributions_from_gradients(grads: PerUnit) -> PerUnit:
    r"""Square each unit's gradient: :math:`C_u[p] = g_u[p]^2`, same ids and weights."""
    return PerUnit({n: g.square() for n, g in grads.tensors.items()}, list(grads.ids),
                   grads.weights.clone(), list(grads.empty_ids))


def per_sample_contributions(model, batch, *, loss_fn=None, unit="sample", weighting="sample",
                             sample_ids=None) -> PerUnit:
    r"""Per-unit contributions to the empirical Fisher, before any group reduction.

    .. math::

        C_u[p] = g_u[p]^2, \qquad F[p] = \frac{\sum_u w_u C_u[p]}{\sum_u w_u}

    Args: as :func:`fisher_ref.units.per_sample_gradients`.

    Returns:
        PerUnit: ``tensors[name]`` of shape ``[U, *param.shape]`` (float64), the units'
        ``ids`` (the callers' sample ids, or ``(sample_id, position)`` for token units),
        ``weights`` and ``empty_ids``.
    """
    grads = per_sample_gradients(model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting,
                                 sample_ids=sample_ids)
    return contributions_from_gradients(grads)
