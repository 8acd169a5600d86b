"""cross_task on 2 (and 3, slow, one rank without A rows) gloo ranks: conflicts and
interference of sharded tasks equal one process on the concatenated rows, with the same
permutation stream and p-values.
"""

import pytest

import fisher_fast as ff
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.tolerances import tolerance
from tests.fisher_fast.distributed import _scenarios as sc
from tests.fisher_fast.distributed._ranks import run_ranks

RTOL, ATOL = tolerance("float64-paths")


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)],
                ids=lambda w: f"world={w}")
def ranks(request, tmp_path_factory):
    world = request.param
    return world, run_ranks(sc.cross_task, world, tmp_path_factory.mktemp(f"cross{world}"))


def _rows(world):
    rows_a, rows_b = sc.CROSS_ROWS[world]
    return sc.all_rows(rows_a, seed=40, task="a"), sc.all_rows(rows_b, seed=50, task="b")


@pytest.mark.parametrize("groups", ["heads", "parameters"])
def test_conflicts_equal_one_process(ranks, groups):
    world, results = ranks
    a, b = _rows(world)
    want = ff.conflicts(sc.TinyAttnLM(), a, b, groups=groups, **sc.CONFLICT_OPTS)
    for r, res in enumerate(results):
        got = res[groups]
        assert got["ids"] == (want.ids_a, want.ids_b)
        assert list(got["result"]) == list(want)
        for name, stats in want.items():
            g = got["result"][name]
            same = ("p", "q", "n_a", "n_b")  # counts: equal, not close
            assert [g[k] for k in same] == [stats[k] for k in same], f"rank {r}, {name}"
            for key in ("mean_cosine", "effect", "null_mean", "null_sd"):
                assert g[key] == pytest.approx(stats[key], rel=RTOL, abs=ATOL), f"rank {r}, {name}, {key}"
            assert g["interval"] == pytest.approx(stats["interval"], rel=RTOL, abs=ATOL)
            assert got["nulls"][name] == pytest.approx(want.nulls[name], rel=RTOL, abs=ATOL)


def test_interference_equals_one_process(ranks):
    world, results = ranks
    a, b = _rows(world)
    want = ff.interference(sc.TinyAttnLM(), a, b, **sc.INTERFERENCE_OPTS)
    for res in results:
        got = res["interference"]
        assert got["ids"] == (want.ids_a, want.ids_b)
        assert_dicts_close(got["blocks"], {k: v.cpu() for k, v in want.items()}, rtol=RTOL, atol=ATOL)
        assert [(t["id_a"], t["id_b"], t["layer"], t["head"], t["block"]) for t in got["top"]] == \
            [(t["id_a"], t["id_b"], t["layer"], t["head"], t["block"]) for t in want.top_k]


def test_an_id_on_two_ranks_is_refused_on_every_rank(ranks):
    _, results = ranks
    for res in results:
        assert res["clash"] == ("EveryRankError: sample_ids of task 'a': expected ids unique across "
                                "ranks, got 'c.same' on rank 0 and on rank 1.")
