"""fisher_fast.distributed end to end on 2 (and 3, slow) gloo ranks on localhost: the
all-reduced accumulator and the sharded estimators equal one process on the concatenated
rows, bit-identically on every rank; id clashes, missing ids and an injected failure raise
on every rank, within the timeout.
"""

import pytest
import torch

import fisher_fast as ff
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.tolerances import tolerance
from tests.fisher_fast.distributed import _scenarios as sc
from tests.fisher_fast.distributed._ranks import run_ranks
from tests.fisher_fast.distributed._scenarios import TinyLM

TOL = dict(zip(("rtol", "atol"), tolerance("welford"), strict=True))
TOL32 = dict(zip(("rtol", "atol"), tolerance("float32-fisher", torch.float32), strict=True))
WORLDS = [2, pytest.param(3, marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world={w}")
def accumulated(request, tmp_path_factory):
    world = request.param
    return world, run_ranks(sc.accumulate, world, tmp_path_factory.mktemp(f"acc{world}"))


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world={w}")
def functional(request, tmp_path_factory):
    world = request.param
    return world, run_ranks(sc.functional, world, tmp_path_factory.mktemp(f"fn{world}"))


def _one_process(batch, **kw):
    acc = ff.FisherAccumulator(TinyLM(), dtype=torch.float64, groups="generic", micro_batch_sizes=(2,), **kw)
    acc.update(batch, task="t")
    return sc._estimates(acc, "t")


def _assert_bit_identical(results, key):
    def flat(d, pre=""):
        return {f"{pre}{k}": v for k, x in d.items()
                for k2, v in (flat(x, f"{k}.").items() if isinstance(x, dict) else [(k, x)])}
    first = flat(results[0][key])
    for r, res in enumerate(results[1:], 1):
        other = flat(res[key])
        bad = [k for k in first if isinstance(first[k], torch.Tensor) and not torch.equal(first[k], other[k])]
        assert not bad, f"rank {r} differs from rank 0 in {bad}"


def test_all_reduce_equals_one_process(accumulated):
    world, results = accumulated
    whole = _one_process(sc.all_rows(sc.ROWS[world]))
    got = results[0]["a"]
    assert got["n_units"] == whole["n_units"] == sum(sc.ROWS[world]) - 1
    assert got["empty_ids"] == whole["empty_ids"] == ["a.r0.1"]
    for key in (*sc.ESTIMATORS, "unbiased", "bsg2"):
        assert_dicts_close(got[key], whole[key], **TOL)
    for name, stats in whole["groups"].items():
        assert_dicts_close(got["groups"][name], stats, **TOL)
    assert [r["local_units"] for r in results] == [4, 0, 3][:1] + [0] * (world - 2) + [3]


def test_every_rank_holds_the_same_bits(accumulated):
    _, results = accumulated
    for key in ("a", "b", "f32"):
        _assert_bit_identical(results, key)


def test_a_task_on_one_rank_only(accumulated):
    _, results = accumulated
    whole = _one_process(sc.all_rows((2,), seed=30, task="b"))
    assert_dicts_close(results[0]["b"]["empirical_fisher"], whole["empirical_fisher"], **TOL)
    assert results[0]["b"]["n_units"] == 2


def test_float32_within_the_float32_tolerance(accumulated):
    world, results = accumulated
    model = TinyLM().float()
    one = ff.FisherAccumulator(model)
    one.update(sc.all_rows(sc.ROWS[world]))
    assert_dicts_close(results[0]["f32"], {k: v.cpu() for k, v in one.empirical_fisher().items()}, **TOL32)


def test_clashing_ids_raise_on_every_rank(accumulated):
    _, results = accumulated
    for r in results:
        assert r["clash"].startswith("EveryRankError: sample_ids: expected ids unique across ranks")
        assert "'same' on rank 0 and on rank 1" in r["clash"]


def test_default_ids_are_refused_across_ranks(accumulated):
    world, results = accumulated
    for r in results:
        assert r["no_ids"] == (f"ValueError: sample_ids: expected explicit ids on each of the {world} "
                               "ranks (the default ids 0..B-1 would repeat across ranks), got none.")


def test_an_injected_failure_raises_on_every_rank(accumulated):
    world, results = accumulated
    for r in results:
        assert r["failure"].startswith("RankFailure: ")
        assert f"rank {sc.FAILED_RANK} of {world} failed: rank {sc.FAILED_RANK}: " \
               "RuntimeError: injected failure" in r["failure"]
        assert r["failure_s"] < 30  # well within the timeout: nobody waited for the failed rank


def test_functional_estimators_equal_one_process(functional):
    world, results = functional
    batch, kw = sc.all_rows(sc.ROWS[world]), dict(dtype=torch.float64)
    model = TinyLM()
    expected = {
        "mean_gradient": ff.mean_gradient(model, batch, **kw),
        "empirical_fisher": ff.empirical_fisher(model, batch, **kw),
        "squared_mean_gradient": ff.squared_mean_gradient(model, batch, **kw),
        "gradient_variance": ff.gradient_variance(model, batch, unbiased=True, **kw),
        "batch_squared_gradient": ff.batch_squared_gradient(model, batch, micro_batch_size=2, **kw),
        "mc_fisher": ff.mc_fisher(model, batch, n_samples=2, seed=3, **kw),
        "token_units": ff.empirical_fisher(model, batch, unit="token", **kw),
    }
    for name, want in expected.items():
        assert_dicts_close(results[0][name], want, **TOL)
    for name, stats in ff.group_fisher(model, batch, **kw).items():
        assert_dicts_close(results[0]["group_fisher"][name], stats, **TOL)
    _assert_bit_identical(results, "mc_fisher")


def test_a_rank_without_rows_contributes_nothing(functional):
    world, results = functional
    whole = ff.gradient_variance(TinyLM(), sc.all_rows(sc.EMPTY_FIRST[world]), dtype=torch.float64)
    for res in results:
        assert_dicts_close(res["empty_rank_0"], whole, **TOL)
