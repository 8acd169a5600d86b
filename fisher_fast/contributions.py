"""Per-unit contributions C_u = g_u² at full parameter shape (SPEC §5), optionally stored.

The gradients come from ``fisher_fast.per_sample.iter_unit_gradients`` (one batched forward
and backward per chunk, no loop over units); this module squares them and, when given a
``ContributionStore``, files them chunk by chunk under (task, sample id, parameter), all or
none. Group reductions are computed from C, never instead of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable

import torch

from .per_sample import iter_unit_gradients
from .results import LossFn, PerUnit, SampleIds
from .store.contribution_store import ContributionStore


def per_sample_contributions(model: torch.nn.Module, batch: dict, *,
                             loss_fn: LossFn | None = None, unit: str = "sample",
                             weighting: str = "sample", sample_ids: SampleIds | None = None,
                             dtype: torch.dtype | None = None,
                             store: ContributionStore | None = None, task: Hashable = "default",
                             chunk_size: int | None = None, memory_budget: float | None = None,
                             return_tensors: bool = True,
                             params: list[str] | None = None) -> PerUnit:
    r"""Per-unit contributions :math:`C_u = g_u \odot g_u`, full shape, keyed by unit id.

    .. math:: C_u[p] = \big(\partial \ell_u / \partial \theta_p\big)^2

    No weight is applied: the empirical Fisher is :math:`\sum_u w_u C_u / W` with the
    returned ``weights``.

    Args:
        model: as for ``per_sample_gradients``.
        batch: as for ``per_sample_gradients``.
        loss_fn: as for ``per_sample_gradients``.
        unit: as for ``per_sample_gradients``.
        weighting: as for ``per_sample_gradients``.
        sample_ids: as for ``per_sample_gradients``.
        dtype: as for ``per_sample_gradients``.
        chunk_size: as for ``per_sample_gradients``.
        memory_budget: as for ``per_sample_gradients``.
        params: only these parameters' contributions (e.g. the attention weights).
        store: a ``ContributionStore``. The batch is then computed and filed chunk by chunk
            (``iter_unit_gradients``: at most one chunk's gradients exist at a time, the
            store spilling to host memory and disk as its budgets say), inside one
            ``store.transaction()``: every unit is filed, or, if anything fails, none.
        task: the task name under which ``store`` files them.
        return_tensors: also return the contributions (``False`` with a store: only ids,
            weights and empty ids come back, ``tensors`` is empty; read them with
            ``store.get_stacked(task, ids)``). Without a store they are always returned.

    Returns:
        PerUnit with ``tensors[name]`` of shape ``[U, *param.shape]``, the unit ids, the
        weights and the empty rows' ids.
    """
    if store is None and not return_tensors:
        raise ValueError("return_tensors=False: expected a store to file the contributions "
                         "in, got store=None.")
    kept, ids, weights, empty = [], [], [], []
    chunks = iter_unit_gradients(model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting,
                                 sample_ids=sample_ids, dtype=dtype, chunk_size=chunk_size,
                                 memory_budget=memory_budget, params=params)
    with contextlib.closing(chunks), \
            store.transaction() if store is not None else contextlib.nullcontext():
        for g in chunks:
            c = {n: t.square_() for n, t in g.tensors.items()}  # the chunk's own tensors
            if store is not None and g.ids:
                store.add(task, g.ids, c)
            if return_tensors:
                kept.append(c)
            ids += g.ids
            weights.append(g.weights)
            empty += g.empty_ids
    tensors = {n: torch.cat([c[n] for c in kept]) for n in kept[0]} if kept else {}
    return PerUnit(tensors=tensors, ids=ids, weights=torch.cat(weights), empty_ids=empty)
