"""Per-unit contributions C_u = g_u² at full parameter shape (SPEC §5), optionally stored.

The gradients come from ``fisher_fast.per_sample_gradients`` (one batched forward and
backward, no loop over units); this module squares them and, when given a
``ContributionStore``, files them under (task, sample id, parameter). Group reductions are
computed from C, never instead of it.
"""

from __future__ import annotations

import torch

from fisher_fast.results import PerUnit


def unit_gradients(model, batch, *, loss_fn=None, unit="sample", weighting="sample",
                   sample_ids=None, dtype=None) -> PerUnit:
    """``fisher_fast.per_sample.per_sample_gradients`` (the core's batched capture)."""
    from fisher_fast.per_sample import per_sample_gradients

    return per_sample_gradients(model, batch, loss_fn=loss_fn, unit=unit,
                                            weighting=weighting, sample_ids=sample_ids, dtype=dtype)


def per_sample_contributions(model: torch.nn.Module, batch: dict, *, loss_fn=None,
                             unit: str = "sample", weighting: str = "sample", sample_ids=None,
                             dtype=None, store=None, task="default") -> PerUnit:
    """Per-unit contributions :math:`C_u = g_u \\odot g_u`, full shape, keyed by unit id.

    .. math:: C_u[p] = \\big(\\partial \\ell_u / \\partial \\theta_p\\big)^2

    No weight is applied: the empirical Fisher is :math:`\\sum_u w_u C_u / W` with the
    returned ``weights``.

    Args:
        model, batch, loss_fn, unit, weighting, sample_ids, dtype: as for
            ``per_sample_gradients``.
        store: a ``ContributionStore`` to file every unit's contributions in (all of them or,
            if the write fails, none).
        task: the task name under which ``store`` files them.

    Returns:
        PerUnit with ``tensors[name]`` of shape ``[U, *param.shape]``, the unit ids, the
        weights and the empty rows' ids.
    """
    g = unit_gradients(model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting,
                       sample_ids=sample_ids, dtype=dtype)
    c = {n: t.square() for n, t in g.tensors.items()}
    if store is not None:
        store.add(task, g.ids, c)
    return PerUnit(tensors=c, ids=list(g.ids), weights=g.weights, empty_ids=list(g.empty_ids))
