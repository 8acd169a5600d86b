"""Conflicts: permutation p-values, their RNG convention, calibration, BH across groups."""

import numpy as np
import pytest
import torch

from fisher_ref.conflicts import TIE_ATOL, conflicts, conflicts_from_gradients, parameter_groups
from fisher_ref.fdr import bh_qvalues
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance

RTOL, ATOL = tolerance("float64-paths")
SCALAR_RTOL, SCALAR_ATOL = tolerance("float64-scalar")


def _task(n, mean, seed, dim=5, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.tensor(mean, dtype=torch.float64) + noise * torch.randn(n, dim, generator=g,
                                                                            dtype=torch.float64)}


def _run(a, b, **kw):
    kw = {"n_permutations": 199, "n_bootstrap": 50} | kw
    return conflicts_from_gradients(a, b, parameter_groups(["w"]), **kw)["w"]


def _cos(x, y):
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    return 0.0 if nx == 0 or ny == 0 else float(x @ y / (nx * ny))


def test_statistic_null_and_interval_follow_the_documented_recipe():
    a, b = _task(4, [1, 0, 0, 0, 0], 0), _task(3, [0, 1, 0, 0, 0], 1)
    r = conflicts_from_gradients(a, b, parameter_groups(["w"]), n_permutations=30, seed=5, n_bootstrap=40)
    pooled = np.concatenate([a["w"].numpy(), b["w"].numpy()])

    def cbar(ia, ib):
        return np.mean([_cos(pooled[i], pooled[j]) for i in ia for j in ib])

    rng = np.random.Generator(np.random.PCG64(5))
    perms = [rng.permutation(7) for _ in range(30)]
    null = [cbar(p[:4], p[4:]) for p in perms]
    boot = np.random.Generator(np.random.PCG64(6))
    stats = []
    for _ in range(40):
        ia = boot.integers(0, 4, 4)
        stats.append(cbar(ia, 4 + boot.integers(0, 3, 3)))
    obs = cbar(range(4), range(4, 7))
    g = r["w"]
    assert g["mean_cosine"] == pytest.approx(obs, rel=RTOL)
    np.testing.assert_allclose(r.nulls["w"], null, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g["interval"], np.percentile(stats, [2.5, 97.5]), rtol=RTOL, atol=ATOL)
    assert g["effect"] == pytest.approx((obs - np.mean(null)) / np.std(null, ddof=1), rel=SCALAR_RTOL,
                                       abs=SCALAR_ATOL)
    # a permutation that reproduces the split ties the observation exactly, and counts
    same = [k for k, p in enumerate(perms) if set(p[:4]) == {0, 1, 2, 3}]
    assert same and all(r.nulls["w"][k] == g["mean_cosine"] for k in same)
    assert g["p"] == (1 + sum(v <= obs + TIE_ATOL for v in null)) / 31


@pytest.mark.parametrize("seed", range(4))
def test_p_in_open_unit_interval_and_null_has_spread(seed):
    g = _run(_task(5, [1, 1, 0, 0, 0], seed), _task(4, [1, 1, 0, 0, 0], seed + 10), seed=seed)
    assert 1 / 200 <= g["p"] <= 1
    assert g["null_sd"] > 0


def test_extreme_observation_gets_the_smallest_p_not_zero():
    a, b = _task(6, [3, 0, 0, 0, 0], 0, noise=0.1), _task(6, [-3, 0, 0, 0, 0], 1, noise=0.1)
    g = _run(a, b)
    assert g["mean_cosine"] < -0.9
    # only permutations reproducing the split (or its swap) tie; C(12, 6) = 924 splits
    assert 1 / 200 <= g["p"] < 0.05 and g["effect"] < -3
    assert g["interval"][1] < 0


def test_p_is_roughly_uniform_under_the_null():
    ps = np.array([_run(_task(5, [1, 0.5, 0, 0, 0], 2 * s), _task(5, [1, 0.5, 0, 0, 0], 2 * s + 1),
                        n_permutations=99, n_bootstrap=1, seed=s)["p"] for s in range(200)])
    assert 0.4 < ps.mean() < 0.6
    assert 0.04 < np.mean(ps <= 0.1) < 0.18
    assert 0.35 < np.mean(ps <= 0.5) < 0.65


def test_identical_directions_give_a_constant_null_and_nan_effect():
    a = {"w": torch.ones(3, 4, dtype=torch.float64)}
    g = _run(a, {"w": 2 * torch.ones(2, 4, dtype=torch.float64)})
    assert g["mean_cosine"] == pytest.approx(1.0) and g["p"] == 1.0 and np.isnan(g["effect"])


def test_zero_gradients_have_zero_cosine():
    a = {"w": torch.zeros(2, 3, dtype=torch.float64)}
    g = _run(a, {"w": torch.ones(2, 3, dtype=torch.float64)})
    assert g["mean_cosine"] == 0.0


@pytest.fixture(scope="module")
def gqa_result():
    model = build_model(TinyConfig(arch="qwen2", num_layers=1, num_heads=4, num_kv_heads=2))
    ba = random_batch(batch_size=3, seed=1, sample_ids=["a_0", "a_1", "a_2"])
    bb = random_batch(batch_size=3, seed=2)
    return model, conflicts(model, ba, bb, n_permutations=50, n_bootstrap=20)


def test_head_groups_share_kv_slices_and_bh_counts_each_slice_once(gqa_result):
    _, r = gqa_result
    assert list(r)[:5] == ["L0.H0.Q", "L0.H0.K", "L0.H0.V", "L0.H0.O", "L0.H1.Q"]
    assert len(r) == 16 and r.ids_a == ["a_0", "a_1", "a_2"]
    for block in ("K", "V"):
        assert r[f"L0.H0.{block}"] == r[f"L0.H1.{block}"]
    distinct = ([f"L0.H{h}.{b}" for h in range(4) for b in "QO"]
                + [f"L0.H{h}.{b}" for h in (0, 2) for b in "KV"])
    q = bh_qvalues([r[n]["p"] for n in distinct])
    np.testing.assert_allclose([r[n]["q"] for n in distinct], q, rtol=0, atol=0)


def test_parameter_groups_are_named_by_parameter():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    r = conflicts(model, random_batch(batch_size=2, seed=1), random_batch(batch_size=2, seed=2),
                  groups="parameters", n_permutations=5, n_bootstrap=5)
    assert list(r) == [n for n, _ in model.named_parameters()]
    assert all(0 < g["p"] <= 1 and 0 < g["q"] <= 1 for g in r.values())


A = _task(3, [1, 0, 0, 0, 0], 0)
BAD = [
    pytest.param(lambda: conflicts_from_gradients(A, {"v": A["w"]}, parameter_groups(["w"])),
                 "tasks measured on different models", id="different-names"),
    pytest.param(lambda: conflicts_from_gradients(A, {"w": torch.ones(2, 4)}, parameter_groups(["w"])),
                 "expected 'w' of shape (5,) in both, got (4,)", id="different-shapes"),
    pytest.param(lambda: conflicts_from_gradients(A, A, {"g": {"w": torch.ones(4, dtype=torch.bool)}}),
                 "expected a mask of shape (5,)", id="mask-shape"),
    pytest.param(lambda: conflicts_from_gradients(A, A, {"g": {"u": None}}),
                 "expected parameter names of the gradients, got 'u'", id="unknown-parameter"),
    pytest.param(lambda: conflicts_from_gradients(A, A, parameter_groups(["w"]), n_permutations=0),
                 "n_permutations: expected an integer >= 1", id="no-permutations"),
    pytest.param(lambda: conflicts_from_gradients(A, A, parameter_groups(["w"]), seed=-1),
                 "seed: expected an integer >= 0", id="negative-seed"),
    pytest.param(lambda: conflicts_from_gradients(A, A, parameter_groups(["w"]), fdr="holm"),
                 "fdr: expected 'bh' or 'by'", id="unknown-fdr"),
    pytest.param(lambda: conflicts(build_model(TinyConfig(arch="gpt2", num_layers=1)), random_batch(),
                                   random_batch(), groups="layers"),
                 "groups: expected 'heads' or 'parameters'", id="unknown-groups"),
]


@pytest.mark.parametrize("call, message", BAD)
def test_bad_input(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_split_and_its_mirror_tie_the_observation_exactly():
    a, b = _task(3, [1, 0, 0, 0, 0], 3), _task(3, [0, 1, 0, 0, 0], 4)
    r = conflicts_from_gradients(a, b, parameter_groups(["w"]), n_permutations=100, n_bootstrap=1)
    rng = np.random.Generator(np.random.PCG64(0))
    splits = [frozenset(rng.permutation(6)[:3]) for _ in range(100)]
    ties = [k for k, s in enumerate(splits) if s in ({0, 1, 2}, {3, 4, 5})]
    assert {splits[k] for k in ties} == {frozenset({0, 1, 2}), frozenset({3, 4, 5})}
    assert all(r.nulls["w"][k] == r["w"]["mean_cosine"] for k in ties)


def test_float32_gradients_are_computed_in_float64():
    a, b = _task(4, [1, 0, 0, 0, 0], 7), _task(3, [0, 1, 0, 0, 0], 8)
    a32, b32 = ({"w": t["w"].float()} for t in (a, b))
    a64, b64 = ({"w": t["w"].double()} for t in (a32, b32))
    got, want = _run(a32, b32), _run(a64, b64)
    assert got["mean_cosine"] == want["mean_cosine"] and got["p"] == want["p"]
    assert got["interval"] == want["interval"]
