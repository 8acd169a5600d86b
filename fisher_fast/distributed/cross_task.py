"""Conflicts and interference with each task's rows sharded over the ranks.

Each rank computes the per-unit gradients of its rows of task A and of task B (only the
tensors the statistic reads: the attention slices, or every parameter for
``groups="parameters"``); they are all-gathered in rank-major order (rank 0's units, then
rank 1's, …), and every rank computes the statistic on the gathered units with
``conflicts_from_units`` / ``interference_from_units``. The result is that of one process on
the concatenated rows: the same cosines, the same permutation stream (seeded as in
SPEC §7) and so the same p-values, the same scores and top-k ids.

Memory: every rank holds all the ranks' gathered slice gradients (N · |slices| entries per
task); a blockwise or ring exchange that never holds them all is not built yet
(docs/distributed.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..attention.layouts import AttentionLayout, attention_layout
from ..attention.slicing import BLOCKS, block_params
from ..conflicts import ConflictResult, conflicts_from_units
from ..interference import InterferenceResult, interference_from_units
from ..per_sample import unit_gradients
from ..results import PerUnit, SampleIds
from ..run.chunks import model_device
from ..run.options import Options
from .collectives import DEFAULT_TIMEOUT, EveryRankError, RankFailure, RankGroup


def _slice_names(layout: AttentionLayout, include_bias: bool) -> list[str]:
    """The parameters that hold some QK-OV slice, in layout order."""
    return list(dict.fromkeys(n for la in layout.layers for B in BLOCKS
                              for n, _ in block_params(la, B, include_bias)))


def _local_units(model: nn.Module, batch: dict | None, ids: SampleIds | None, opts: Options,
                 names: list[str]) -> PerUnit:
    """This rank's units of one task (none for a rank without rows)."""
    if batch is not None:
        return unit_gradients(model, batch, ids, opts, names)
    params, device = dict(model.named_parameters()), model_device(model)
    return PerUnit({n: torch.zeros((0, *params[n].shape), dtype=opts.dtype, device=device)
                    for n in names}, [], torch.zeros(0, dtype=opts.dtype, device=device), [])


def gather_units(ranks: RankGroup, units: PerUnit, task: str) -> PerUnit:
    """Every rank's ``units``, concatenated in rank order (the same on every rank).

    Each tensor is padded to the largest rank's unit count for ``all_gather`` and cut back.
    Sample ids must be unique across the ranks (else :class:`EveryRankError`).
    """
    metas = ranks.gather_objects((list(units.ids), list(units.empty_ids)), f"{task}: unit ids")
    ids = [i for m in metas for i in m[0]]
    owner: dict = {}  # sample id -> the rank that has it (token units: (sample id, position))
    for r, m in enumerate(metas):
        sids = {(type(s).__name__, s): s for s in
                (i[0] if isinstance(i, tuple) else i for i in list(m[0]) + list(m[1]))}
        for key, sid in sids.items():
            if key in owner:
                raise EveryRankError(f"sample_ids of task {task!r}: expected ids unique across "
                                     f"ranks, got {sid!r} on rank {owner[key]} and on rank {r}.")
            owner[key] = r
    counts = [len(m[0]) for m in metas]
    top = max(counts)

    def gathered(t: torch.Tensor, what: str) -> torch.Tensor:
        pad = torch.zeros((top - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        parts = ranks.gather_tensor(torch.cat([t, pad]), f"{task}: {what}")
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    tensors = {n: gathered(t, n) for n, t in units.tensors.items()}
    return PerUnit(tensors, ids, gathered(units.weights, "weights"),
                   [i for m in metas for i in m[1]])


def _both_tasks(model, batch_a, batch_b, ids_a, ids_b, opts, names, ranks) -> tuple:
    try:
        ga = _local_units(model, batch_a, ids_a, opts, names)
        gb = _local_units(model, batch_b, ids_b, opts, names)
        return gather_units(ranks, ga, "a"), gather_units(ranks, gb, "b")
    except (RankFailure, EveryRankError):
        raise
    except Exception as error:  # every rank must hear of it
        ranks.fail(error, "per-unit gradients")
        raise  # unreachable: fail raises


def conflicts(model: nn.Module, batch_a: dict | None, batch_b: dict | None, *,
              group: dist.ProcessGroup | None = None, timeout: float = DEFAULT_TIMEOUT,
              groups: str = "heads", n_permutations: int = 1000, seed: int = 0,
              n_bootstrap: int = 1000, layout: AttentionLayout | dict | None = None,
              loss_fn=None, unit: str = "sample", weighting: str = "sample",
              include_bias: bool = False, fdr: str = "bh", dtype: torch.dtype | None = None,
              sample_ids_a: SampleIds | None = None,
              sample_ids_b: SampleIds | None = None) -> ConflictResult:
    """``fisher_fast.conflicts`` of every rank's rows of A and B (collective).

    ``batch_a``, ``batch_b``: this rank's rows of each task (``None``: none). The other
    arguments are ``fisher_fast.conflicts``'s; the permutations run over the pooled units
    ``[A units of rank 0, of rank 1, …, B units of rank 0, …]``, exactly as one process on
    the concatenated rows, so the p-values are the same for the same seed.
    """
    ranks = RankGroup(group, timeout)
    lay = attention_layout(model, layout) if groups == "heads" else None
    opts = Options.of(loss_fn, unit, weighting, dtype)
    names = _slice_names(lay, include_bias) if lay is not None else \
        [n for n, p in model.named_parameters() if p.requires_grad]
    ga, gb = _both_tasks(model, batch_a, batch_b, sample_ids_a, sample_ids_b, opts, names, ranks)
    return conflicts_from_units(ga, gb, groups=groups, layout=lay, n_permutations=n_permutations,
                                seed=seed, n_bootstrap=n_bootstrap, include_bias=include_bias, fdr=fdr)


def interference(model: nn.Module, batch_a: dict | None, batch_b: dict | None, *,
                 group: dist.ProcessGroup | None = None, timeout: float = DEFAULT_TIMEOUT,
                 fisher: str | dict = "a", signed: bool = False, eps: float = 1e-12,
                 ridge_rel: float = 0.0, top_k: int = 100,
                 layout: AttentionLayout | dict | None = None, loss_fn=None,
                 unit: str = "sample", weighting: str = "sample", include_bias: bool = False,
                 dtype: torch.dtype | None = None, sample_ids_a: SampleIds | None = None,
                 sample_ids_b: SampleIds | None = None) -> InterferenceResult:
    """``fisher_fast.interference`` of every rank's rows of A and B (collective).

    ``batch_a``, ``batch_b``: this rank's rows of each task (``None``: none). Units are
    ordered rank-major, so ``M[i, j]`` indexes the concatenated rows; the other arguments
    are ``fisher_fast.interference``'s (no ``store``: not offered across ranks yet).
    """
    ranks = RankGroup(group, timeout)
    lay = attention_layout(model, layout)
    opts = Options.of(loss_fn, unit, weighting, dtype)
    names = _slice_names(lay, include_bias)
    ga, gb = _both_tasks(model, batch_a, batch_b, sample_ids_a, sample_ids_b, opts, names, ranks)
    return interference_from_units(lay, ga, gb, fisher=fisher, signed=signed, eps=eps,
                                   ridge_rel=ridge_rel, top_k=top_k, include_bias=include_bias,
                                   names=names)
