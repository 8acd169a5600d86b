"""collectives: bad arguments, and the one-rank paths (an in-process gloo group of one)."""

import pytest
import torch
import torch.distributed as dist

import fisher_fast.distributed as ffd
from tests.fisher_fast.distributed._scenarios import TinyLM, tiny_batch


@pytest.fixture
def one_rank():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_no_process_group_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected an initialised process group .* got none"):
        ffd.RankGroup()


@pytest.mark.parametrize("timeout", [0, -1.0, True, "30"], ids=repr)
def test_bad_timeout(one_rank, timeout):
    with pytest.raises(ValueError, match=r"timeout: expected a positive number of seconds, got"):
        ffd.RankGroup(timeout=timeout)


def test_fail_together_reraises_as_rank_failure(one_rank):
    with pytest.raises(ffd.RankFailure, match=r"rank 0 of 1 failed: rank 0: KeyError: 'boom'") as info:
        with ffd.fail_together(timeout=5):
            raise KeyError("boom")
    assert isinstance(info.value.__cause__, KeyError)


def test_every_rank_errors_pass_through(one_rank):
    with pytest.raises(ffd.EveryRankError, match="alike"):
        with ffd.fail_together(timeout=5):
            raise ffd.EveryRankError("alike")


def test_one_rank_all_reduce_is_the_local_state(one_rank):
    acc = ffd.ShardedAccumulator(TinyLM(), dtype=torch.float64, timeout=5)
    acc.update(tiny_batch(3, seed=1))  # one rank: the default ids are fine
    acc.update(tiny_batch(2, seed=2))
    assert acc.sample_ids() == {"default": [0, 1, 2, 3, 4]}
    reduced = acc.all_reduce()
    for k, v in acc.local.empirical_fisher().items():
        assert torch.equal(reduced.empirical_fisher()[k], v)
    assert reduced is not acc.local and reduced.n_units() == acc.local.n_units() == 5


@pytest.mark.parametrize("ids, match", [
    ({"default": [0, 1]}, r"sample_ids of task 'default' on rank 0: expected the ids of the 3 rows "
                          r"the accumulator saw, got 2 ids"),
    ({"default": [0, 1, 1]}, r"expected ids unique across ranks, got 1 on rank 0 and on rank 0"),
    ([0, 1, 2], r"sample_ids: expected a mapping task -> ids, got list"),
], ids=["too few", "duplicate", "not a mapping"])
def test_all_reduce_checks_the_ids(one_rank, ids, match):
    acc = ffd.ShardedAccumulator(TinyLM(), dtype=torch.float64, timeout=5)
    acc.update(tiny_batch(3, seed=1))
    with pytest.raises(ValueError, match=match):
        ffd.all_reduce_accumulator(acc.local, ids, timeout=5)


def test_all_reduce_wants_an_accumulator(one_rank):
    with pytest.raises(ValueError, match=r"acc: expected a FisherAccumulator, got dict"):
        ffd.all_reduce_accumulator({}, {})
