"""``ShardedAccumulator``: a ``FisherAccumulator`` on one rank's shard that remembers its
sample ids, so that :meth:`ShardedAccumulator.all_reduce` can check them across ranks.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..accumulator import FisherAccumulator
from ..results import LossFn, SampleIds
from .collectives import DEFAULT_TIMEOUT, RankGroup
from .reduce import all_reduce_accumulator


class ShardedAccumulator:
    """Streaming Fisher statistics of one rank's shard, all-reduced on demand.

    Every rank builds one (same model, same options), updates it with its own rows, and
    calls :meth:`all_reduce` (a collective) to get the statistics of all the ranks' rows,
    in rank-major order (rank 0's units, then rank 1's, …), bit-identical on every rank::

        acc = ShardedAccumulator(model, dtype=torch.float64)
        with fail_together():
            for batch, ids in my_shard:
                acc.update(batch, task="a", sample_ids=ids)
            fisher = acc.all_reduce().empirical_fisher("a")

    Args:
        model: the model (the same weights on every rank).
        loss_fn: per-row loss (default ``causal_lm_loss``).
        group: the process group (``None``: the default group; it must be initialised).
        timeout: seconds each collective step waits for the slowest rank.
        **options: the keyword arguments of ``FisherAccumulator``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None, *,
                 group: dist.ProcessGroup | None = None, timeout: float = DEFAULT_TIMEOUT,
                 **options: object):
        self._ranks = RankGroup(group, timeout)
        self.group, self.timeout = group, timeout
        #: this rank's accumulator (its shard only)
        self.local = FisherAccumulator(model, loss_fn, **options)
        self._ids: dict[str, list] = {}

    @property
    def rank(self) -> int:
        """This process's rank in ``group``."""
        return self._ranks.rank

    @property
    def world_size(self) -> int:
        """The number of ranks in ``group``."""
        return self._ranks.world_size

    def update(self, batch: dict, task: str = "default", sample_ids: SampleIds | None = None) -> int:
        """Add a batch of this rank's shard to ``task`` (local; no collective).

        With more than one rank the sample ids must be given (``sample_ids`` or
        ``batch["sample_ids"]``): the default ids ``0..B-1`` would repeat across ranks.
        Returns how many units were added; a failed update changes nothing.
        """
        given = batch.get("sample_ids", sample_ids) if isinstance(batch, dict) else sample_ids
        if given is None and self.world_size > 1:
            raise ValueError(f"sample_ids: expected explicit ids on each of the {self.world_size} "
                             "ranks (the default ids 0..B-1 would repeat across ranks), got none.")
        before = self.local._tasks[task].n_rows if task in self.local._tasks else 0
        n = self.local.update(batch, task=task, sample_ids=sample_ids)
        after = self.local._tasks[task].n_rows
        ids = list(range(before, after)) if given is None else \
            given.tolist() if hasattr(given, "tolist") else list(given)
        self._ids.setdefault(task, []).extend(ids)
        return n

    def sample_ids(self) -> dict[str, list]:
        """Task -> the sample ids of every row this rank has fed (empty rows included)."""
        return {t: list(v) for t, v in self._ids.items()}

    def all_reduce(self) -> FisherAccumulator:
        """The accumulator of every rank's rows (collective: every rank must call it).

        See :func:`fisher_fast.distributed.all_reduce_accumulator`; this rank's own
        accumulator (``local``) is left unchanged.
        """
        return all_reduce_accumulator(self.local, self._ids, group=self.group, timeout=self.timeout)
