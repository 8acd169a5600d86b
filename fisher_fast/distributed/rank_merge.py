r"""Merging the ranks' task states in rank order (pure: no collectives here).

Rank r holds the statistics of its shard; the merged state is that of one process that saw
rank 0's units, then rank 1's, and so on (*rank-major* order):

- counts, weights, Σw² and the rows seen add up; empty ids concatenate in rank order;
- Welford/Chan states (``Moments``) and E[g²] states (``SecondMoment``) merge by Chan's
  formula, left to right in rank order, so the result is the two-pass result up to
  rounding (SPEC §8) and, every rank merging the same gathered values in the same order,
  bit-identical on every rank;
- ``batch_squared_gradient(b)``'s micro-batches run over the units in rank-major order.
  A rank's state closes its micro-batches at its own multiples of b, so the ranks' states
  join exactly only where no micro-batch straddles two ranks: every non-empty rank but the
  last must hold a multiple of b units. Otherwise :class:`EveryRankError` says so.

.. math::

    \text{BSG}_b = \frac{1}{W}\Big(\sum_{r < r_{last}} \big(C_r + O_r\big) + C_{r_{last}}
    + O_{r_{last}}\Big), \qquad O_r = \frac{(\textstyle\sum_{u \in open_r} w_u g_u)^2}{W_{open_r}}

(C_r: rank r's closed micro-batches, O_r: its open one, full on every rank but the last.)
"""

from __future__ import annotations

from collections.abc import Sequence

from ..stats.micro_batches import MicroBatchState
from ..stats.task_state import TaskState
from .collectives import EveryRankError


def merge_in_rank_order(states: Sequence) -> object:
    """Chan-merge moment states (``Moments`` or ``SecondMoment``) left to right; ``None``
    entries (ranks without units) are skipped. Returns ``None`` if every entry is.
    """
    present = [s for s in states if s is not None]
    if not present:
        return None
    out = present[0]
    for s in present[1:]:
        out = out.merge(s)
    return out


def merge_micro_batches(states: Sequence[MicroBatchState | None], name: str) -> MicroBatchState | None:
    """Join the ranks' ``batch_squared_gradient(b)`` states of one parameter, rank-major.

    Args:
        states: rank r's state, or ``None`` where rank r has no units.
        name: the parameter (for the error message).

    Raises:
        EveryRankError: a micro-batch would straddle two ranks.
    """
    present = [(r, s) for r, s in enumerate(states) if s is not None and s.seen > 0]
    if not present:
        return next((s for s in states if s is not None), None)
    b = present[0][1].b
    for r, s in present[:-1]:
        if s.seen % b:
            raise EveryRankError(
                f"batch_squared_gradient(micro_batch_size={b}) of {name!r}: expected every "
                f"non-empty rank but the last to hold a multiple of {b} units (micro-batches "
                f"run rank-major and may not straddle two ranks), got {s.seen} units on rank "
                f"{r} and units on rank {present[-1][0]} after it.")
    last = present[-1][1]
    closed = last.closed
    for _, s in present[:-1]:
        closed = closed + s.value(1.0)  # closed + its (full) open micro-batch, unnormalised
    return MicroBatchState(b, closed, last.open_sum, last.open_w, sum(s.seen for _, s in present))


def merge_counts(states: Sequence[TaskState | None]) -> TaskState:
    """A ``TaskState`` with the ranks' counts, weights, rows and empty ids (no moments)."""
    present = [s for s in states if s is not None]
    out = TaskState()
    for s in present:
        out.n_units += s.n_units
        out.n_rows += s.n_rows
        out.total_weight += s.total_weight
        out.sum_w2 += s.sum_w2
        out.empty_ids = out.empty_ids + list(s.empty_ids)
    return out


def merge_task_states(states: Sequence[TaskState | None]) -> TaskState:
    """The rank-major merge of the ranks' states of one task (``None``: the rank never saw
    the task). The reference for :func:`fisher_fast.distributed.all_reduce_accumulator`,
    which merges the same way one gathered tensor at a time.
    """
    out = merge_counts(states)
    with_units = [s if s is not None and s.n_units > 0 else None for s in states]

    def keys(attr):
        return list(dict.fromkeys(k for s in with_units if s is not None for k in getattr(s, attr)))

    for attr in ("moments", "group_moments"):
        merged = {k: merge_in_rank_order([getattr(s, attr).get(k) if s is not None else None
                                          for s in with_units]) for k in keys(attr)}
        setattr(out, attr, merged)
    sizes = list(dict.fromkeys(b for s in states if s is not None for b in s.micro))
    for b in sizes:
        names = list(dict.fromkeys(k for s in states if s is not None for k in s.micro.get(b, {})))
        out.micro[b] = {k: merge_micro_batches(
            [s.micro.get(b, {}).get(k) if s is not None else None for s in states], k)
            for k in names}
    return out


def duplicate_ids(ids_by_rank: Sequence[dict], task: str) -> str | None:
    """The first sample id of ``task`` that occurs twice across (or within) the ranks'
    id lists, described with its ranks; ``None`` if the ids are unique.
    """
    first: dict = {}
    for r, ids in enumerate(ids_by_rank):
        for i in ids.get(task, ()):
            key = (type(i).__name__, i)  # 1 and "1" are different ids
            if key in first:
                return f"{i!r} on rank {first[key]} and on rank {r} (task {task!r})"
            first[key] = r
    return None
