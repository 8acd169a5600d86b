"""rank_merge: the ranks' states merged in rank order equal one process on all the rows
(in process: each 'rank' is an accumulator on its shard, no collectives).
"""

import pytest
import torch

import fisher_fast as ff
from fisher_fast.distributed import EveryRankError
from fisher_fast.distributed.rank_merge import duplicate_ids, merge_task_states
from fisher_fast.stats import readout
from fisher_ref.testing.batches import concat_batches
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.tolerances import tolerance
from tests.fisher_fast._fast_modules import TinyLM, tiny_batch

TOL = dict(zip(("rtol", "atol"), tolerance("welford"), strict=True))
OPTS = dict(dtype=torch.float64, groups="generic", micro_batch_sizes=(2,))


def _ranks(model, shards, **opts):
    """One accumulator per shard ('rank'); a shard of None is a rank without rows."""
    accs = []
    for shard in shards:
        acc = ff.FisherAccumulator(model, **{**OPTS, **opts})
        if shard is not None:
            acc.update(shard)
        accs.append(acc)
    return accs


def _merged(accs, task="default"):
    return merge_task_states([a._tasks.get(task) for a in accs])


@pytest.mark.parametrize("sizes", [(2, 4), (4, 0, 3), (0, 2, 2, 1)], ids=str)
def test_rank_order_merge_equals_one_process(sizes):
    model = TinyLM()
    shards = [tiny_batch(B=b, seed=10 + r, empty_rows=(1,) if b == 3 else ()) if b else None
              for r, b in enumerate(sizes)]
    merged = _merged(_ranks(model, shards))
    one = ff.FisherAccumulator(model, **OPTS)
    one.update(concat_batches([s for s in shards if s is not None]))
    whole = one._tasks["default"]
    assert (merged.n_units, merged.n_rows) == (whole.n_units, whole.n_rows)
    assert merged.total_weight == pytest.approx(whole.total_weight, rel=1e-15)
    for name in ("mean_gradient", "empirical_fisher", "squared_mean_gradient", "gradient_variance"):
        assert_dicts_close(getattr(readout, name)(merged), getattr(readout, name)(whole), **TOL)
    assert_dicts_close(readout.batch_squared_gradient(merged, 2),
                       readout.batch_squared_gradient(whole, 2), **TOL)
    for k, g in readout.group_fisher(whole).items():
        assert_dicts_close(readout.group_fisher(merged)[k], g, **TOL)


def test_empty_ids_keep_rank_order():
    model = TinyLM()
    a, b = tiny_batch(B=3, seed=1, empty_rows=(2,)), tiny_batch(B=3, seed=2, empty_rows=(0,))
    a["sample_ids"], b["sample_ids"] = ["a0", "a1", "a2"], ["b0", "b1", "b2"]
    assert _merged(_ranks(model, [a, b])).empty_ids == ["a2", "b0"]


def test_second_moment_states_merge():
    model = TinyLM()
    shards = [tiny_batch(B=3, seed=1), None, tiny_batch(B=2, seed=2)]
    merged = _merged(_ranks(model, shards, statistics="fisher", groups=None,
                               micro_batch_sizes=()))
    whole = ff.empirical_fisher(model, concat_batches([shards[0], shards[2]]), dtype=torch.float64)
    assert_dicts_close(readout.empirical_fisher(merged), whole, **TOL)


def test_micro_batch_straddling_two_ranks_is_an_error():
    model = TinyLM()
    accs = _ranks(model, [tiny_batch(B=3, seed=1), tiny_batch(B=2, seed=2)])  # 3 units: odd
    with pytest.raises(EveryRankError, match=r"multiple of 2 units .* got 3 units on rank 0"):
        _merged(accs)


def test_micro_batches_may_end_short_on_the_last_rank():
    model = TinyLM()
    shards = [tiny_batch(B=2, seed=1), None, tiny_batch(B=3, seed=2)]
    merged = _merged(_ranks(model, shards))
    whole = ff.batch_squared_gradient(model, concat_batches([shards[0], shards[2]]),
                                      dtype=torch.float64, micro_batch_size=2)
    assert_dicts_close(readout.batch_squared_gradient(merged, 2), whole, **TOL)


def test_duplicate_ids_name_both_ranks():
    assert duplicate_ids([{"t": [1, 2]}, {"t": ["1", 3]}], "t") is None  # 1 and "1" differ
    assert duplicate_ids([{"t": [1, 2]}, {}, {"t": [5, 2]}], "t") == "2 on rank 0 and on rank 2 (task 't')"
