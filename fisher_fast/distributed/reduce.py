"""All-reducing a ``FisherAccumulator`` over the ranks, exactly (rank-major order).

Each rank updates its own accumulator on its shard; :func:`all_reduce_accumulator` gathers
every rank's task states one tensor at a time and merges them in rank order
(``rank_merge``), so every rank ends with bit-identical states equal to one process that
saw rank 0's units, then rank 1's, … (float64: to rounding, SPEC §8). Sample ids are
gathered and must be unique across the ranks.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from ..accumulator import FisherAccumulator
from ..stats.micro_batches import MicroBatchState
from ..stats.moments import Moments, SecondMoment
from ..stats.task_state import TaskState
from .collectives import DEFAULT_TIMEOUT, EveryRankError, RankFailure, RankGroup
from .rank_merge import duplicate_ids, merge_counts, merge_in_rank_order, merge_micro_batches

#: the tensors of each moment state kind, in gather order
FIELDS = {"Moments": ("W", "mean", "m2"), "SecondMoment": ("W", "f")}
KINDS = {"Moments": Moments, "SecondMoment": SecondMoment}
MICRO_FIELDS = ("closed", "open_sum", "open_w")


def _describe(state: TaskState) -> dict:
    """What the other ranks need to know of a task state to gather its tensors."""
    def moments(d):
        return {k: (type(m).__name__, tuple(m.W.shape), tuple(getattr(m, FIELDS[type(m).__name__][1]).shape),
                    str(m.W.dtype)) for k, m in d.items()}
    return {"counts": (state.n_units, state.n_rows, state.total_weight, state.sum_w2,
                       list(state.empty_ids)),
            "moments": moments(state.moments), "group_moments": moments(state.group_moments),
            "micro": {b: {k: (tuple(s.closed.shape), str(s.closed.dtype), s.seen)
                          for k, s in d.items()} for b, d in state.micro.items()}}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def _union(metas: list, what: str, agree=lambda d: d) -> dict:
    """Key -> description over the ranks that have the key; every rank must agree on
    ``agree(description)``.
    """
    out: dict = {}
    for r, meta in enumerate(metas):
        for k, d in meta.items():
            if k in out and agree(out[k][1]) != agree(d):
                raise EveryRankError(f"{what} {k!r}: expected the same state on every rank, got "
                                     f"{out[k][1]} on rank {out[k][0]} and {d} on rank {r}.")
            out.setdefault(k, (r, d))
    return {k: d for k, (_, d) in out.items()}


def _gather_moments(ranks: RankGroup, states: list, metas: list, attr: str, task: str,
                    device: torch.device) -> dict:
    """Gather and rank-order merge the moment states ``attr`` of ``task``."""
    mine = getattr(states[ranks.rank], attr) if states[ranks.rank] is not None else {}
    has_units = [m is not None and m["counts"][0] > 0 for m in metas]
    union = _union([m[attr] if m is not None else {} for m in metas], f"task {task!r}: {attr}")
    out = {}
    for key, (kind, w_shape, shape, dtype) in union.items():
        fields = FIELDS[kind]
        gathered = []
        for f in fields:
            local = getattr(mine[key], f) if has_units[ranks.rank] and key in mine else \
                torch.zeros(w_shape if f == "W" else shape, dtype=_dtype(dtype), device=device)
            gathered.append(ranks.gather_tensor(local, f"{task}/{attr}/{key}.{f}"))
        per_rank = [KINDS[kind](*(g[r] for g in gathered))
                    if has_units[r] and key in metas[r][attr] else None for r in range(len(metas))]
        out[key] = merge_in_rank_order(per_rank)
    return out


def _gather_micro(ranks: RankGroup, states: list, metas: list, task: str,
                  device: torch.device) -> dict:
    """Gather and rank-major join the micro-batch states of ``task``."""
    sizes = list(dict.fromkeys(b for m in metas if m is not None for b in m["micro"]))
    out = {}
    for b in sizes:
        metas_b = [m["micro"].get(b, {}) if m is not None else {} for m in metas]
        union = _union(metas_b, f"task {task!r}: micro-batch state b={b} of",
                       agree=lambda d: d[:2])  # (shape, dtype); the ranks' units differ
        mine = states[ranks.rank].micro.get(b, {}) if states[ranks.rank] is not None else {}
        out[b] = {}
        for key, (shape, dtype, _) in union.items():
            gathered = []
            for f in MICRO_FIELDS:
                local = getattr(mine[key], f) if key in mine else torch.zeros(
                    () if f == "open_w" else shape, dtype=_dtype(dtype), device=device)
                gathered.append(ranks.gather_tensor(local, f"{task}/micro{b}/{key}.{f}"))
            per_rank = [MicroBatchState(b, *(g[r] for g in gathered), metas_b[r][key][2])
                        if key in metas_b[r] else None for r in range(len(metas))]
            out[b][key] = merge_micro_batches(per_rank, key)
    return out


def all_reduce_accumulator(acc: FisherAccumulator, sample_ids: Mapping[str, Sequence], *,
                           group: dist.ProcessGroup | None = None,
                           timeout: float = DEFAULT_TIMEOUT) -> FisherAccumulator:
    """Merge every rank's ``acc`` into one accumulator, the same on every rank (collective).

    Rank r contributes the units of its shard; the result is the accumulator of one
    process that saw rank 0's units, then rank 1's, … (rank-major), for every task any rank
    saw: counts and weights add up, Welford/Chan states merge in rank order (so every rank
    computes bit-identical states), ``batch_squared_gradient``'s micro-batches run
    rank-major (see ``rank_merge``). A rank with no rows (or without a task) takes part and
    contributes nothing. ``acc`` itself is left unchanged, so a rank may go on updating it
    and all-reduce again later.

    Args:
        acc: this rank's accumulator (same configuration and model shapes on every rank).
        sample_ids: task -> the sample ids of every row this rank fed to ``acc`` (empty
            rows included); they must be unique across the ranks.
        group: the process group (``None``: the default group).
        timeout: seconds each step waits for the slowest rank.

    Returns:
        A new ``FisherAccumulator`` (sharing ``acc``'s model and options) with the merged
        states.

    Raises:
        EveryRankError: (a ``ValueError``, on every rank) the ranks' configurations differ,
            a sample id occurs twice, or a micro-batch would straddle two ranks.
        RankFailure: (on every rank) a rank failed, or did not answer within ``timeout``.
    """
    if not isinstance(acc, FisherAccumulator):
        raise ValueError(f"acc: expected a FisherAccumulator, got {type(acc).__name__}.")
    if not isinstance(sample_ids, Mapping):
        raise ValueError(f"sample_ids: expected a mapping task -> ids, got {type(sample_ids).__name__}.")
    ranks = RankGroup(group, timeout)
    try:
        ids = {t: (v.tolist() if hasattr(v, "tolist") else list(v)) for t, v in sample_ids.items()}
        local = ({t: _describe(s) for t, s in acc._tasks.items()}, ids, acc.config_summary())
        gathered = ranks.gather_objects(local, "describe the task states")
        return _reduce(acc, ranks, gathered)
    except (RankFailure, EveryRankError):
        raise
    except Exception as error:  # every rank must hear of it
        ranks.fail(error, "all_reduce_accumulator")
        raise  # unreachable: fail raises


def _reduce(acc: FisherAccumulator, ranks: RankGroup, gathered: list) -> FisherAccumulator:
    metas_by_rank = [g[0] for g in gathered]
    ids_by_rank = [g[1] for g in gathered]
    for r, g in enumerate(gathered):
        if g[2] != gathered[0][2]:
            diff = sorted(k for k in {**g[2], **gathered[0][2]} if g[2].get(k) != gathered[0][2].get(k))
            raise EveryRankError(f"accumulator: expected the same configuration on every rank, "
                                 f"got differences in {diff} between rank 0 and rank {r}.")
    tasks = list(dict.fromkeys([t for m in metas_by_rank for t in m] +
                               [t for i in ids_by_rank for t in i]))
    for task in tasks:
        for r, (m, i) in enumerate(zip(metas_by_rank, ids_by_rank, strict=True)):
            rows, given = m[task]["counts"][1] if task in m else 0, len(i.get(task, ()))
            if rows != given:
                raise EveryRankError(f"sample_ids of task {task!r} on rank {r}: expected the ids "
                                     f"of the {rows} rows the accumulator saw, got {given} ids.")
        dup = duplicate_ids(ids_by_rank, task)
        if dup is not None:
            raise EveryRankError(f"sample_ids: expected ids unique across ranks, got {dup}.")
    merged = {}
    for task in tasks:
        metas = [m.get(task) for m in metas_by_rank]
        if all(m is None for m in metas):
            continue
        states = [acc._tasks.get(task) if r == ranks.rank else None for r in range(ranks.world_size)]
        counts = [TaskState(*m["counts"]) if m is not None else None for m in metas]
        state = merge_counts(counts)
        state.moments = _gather_moments(ranks, states, metas, "moments", task, acc.device)
        state.group_moments = _gather_moments(ranks, states, metas, "group_moments", task, acc.device)
        state.micro = _gather_micro(ranks, states, metas, task, acc.device)
        merged[task] = state
    ranks.check("all_reduce_accumulator done")
    out = copy.copy(acc)
    out._tasks = merged
    return out
