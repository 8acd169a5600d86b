"""fisher_fast on ``torch.distributed``: data-parallel statistics merged exactly across ranks.

Each rank updates a ``ShardedAccumulator`` (or a ``FisherAccumulator``) on its shard;
``all_reduce_accumulator`` merges the ranks' states in rank order, the same on every rank;
``estimators`` and ``cross_task`` (conflicts, interference) take each rank's rows;
``fail_together`` makes an exception on one rank an exception on all. See
docs/distributed.md.
"""

from . import cross_task, estimators
from .collectives import DEFAULT_TIMEOUT, EveryRankError, RankFailure, RankGroup, fail_together
from .rank_merge import merge_task_states
from .reduce import all_reduce_accumulator
from .sharded import ShardedAccumulator

__all__ = ["DEFAULT_TIMEOUT", "EveryRankError", "RankFailure", "RankGroup", "ShardedAccumulator",
           "all_reduce_accumulator", "cross_task", "estimators", "fail_together", "merge_task_states"]
