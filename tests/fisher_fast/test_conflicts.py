"""fisher_fast.conflicts: hand-worked statistics, the permutation/bootstrap conventions against
a plain loop, opposed gradients, exact ties, GQA-shared slices, q-values, bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fisher_fast.attention.layouts import AttentionLayout, LayerAttention
from fisher_fast.conflicts import conflicts_from_units
from fisher_fast.fdr import bh_qvalues, by_qvalues
from fisher_fast.results import PerUnit
from fisher_ref.testing.tolerances import tolerance

RTOL, ATOL = tolerance("float64-paths")
REORDER_RTOL, REORDER_ATOL = tolerance("float64-reorder")
SCALAR_RTOL, SCALAR_ATOL = tolerance("float64-scalar")
ULPS_RTOL, ULPS_ATOL = tolerance("float64-ulps")


def _units(tensors: dict, ids=None):
    t = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in tensors.items()}
    n = next(iter(t.values())).shape[0]
    return PerUnit(t, list(range(n)) if ids is None else list(ids), torch.ones(n, dtype=torch.float64))


def _loop_reference(xa, xb, P, seed, n_boot):
    """The conventions of docs/architecture.md, one permutation at a time."""
    pooled = np.concatenate([xa, xb])
    na, n = len(xa), len(xa) + len(xb)

    def cos(u, v):
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        return 0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv))

    def stat(ia, ib):
        return np.mean([[cos(pooled[i], pooled[j]) for j in ib] for i in ia])

    obs = stat(range(na), range(na, n))
    rng = np.random.Generator(np.random.PCG64(seed))
    null = []
    for _ in range(P):
        perm = rng.permutation(n)
        null.append(stat(perm[:na], perm[na:]))
    null = np.array(null)
    boot = np.random.Generator(np.random.PCG64(seed + 1))
    bs = []
    for _ in range(n_boot):
        ia = boot.integers(0, na, na)
        ib = boot.integers(0, len(xb), len(xb))
        bs.append(stat(ia, na + ib))
    return obs, null, np.percentile(bs, [2.5, 97.5])


def test_matches_a_plain_loop():
    g = np.random.default_rng(0)
    xa, xb = g.normal(size=(3, 4)), g.normal(size=(4, 4)) + 0.5
    res = conflicts_from_units(_units({"w": xa}), _units({"w": xb}), groups="parameters",
                               n_permutations=60, seed=3, n_bootstrap=40)["w"]
    obs, null, interval = _loop_reference(xa, xb, 60, 3, 40)
    assert res["mean_cosine"] == pytest.approx(obs, rel=RTOL, abs=ATOL)
    tie = np.isclose(null, obs, rtol=REORDER_RTOL, atol=REORDER_ATOL)
    assert res["p"] == (1 + int(np.sum((null <= obs) | tie))) / 61
    assert res["effect"] == pytest.approx((obs - null.mean()) / null.std(ddof=1),
                                          rel=SCALAR_RTOL, abs=SCALAR_ATOL)
    assert res["interval"] == pytest.approx(tuple(interval), rel=SCALAR_RTOL, abs=SCALAR_ATOL)


def test_hand_worked_single_pair_and_zero_norm():
    # one unit each: cos([1, 0], [1, 1]) = 1/sqrt(2); both labellings give the same pairs
    res = conflicts_from_units(_units({"w": [[1.0, 0.0]], "z": [[0.0, 0.0]]}),
                               _units({"w": [[1.0, 1.0]], "z": [[3.0, 4.0]]}),
                               groups="parameters", n_permutations=9, n_bootstrap=5)
    assert res["w"]["mean_cosine"] == pytest.approx(2 ** -0.5, rel=ULPS_RTOL, abs=ULPS_ATOL)
    assert res["w"]["p"] == 1.0 and np.isnan(res["w"]["effect"])
    assert res["z"]["mean_cosine"] == 0.0  # a zero-norm unit has cosine 0


def test_opposed_gradients_conflict():
    g = np.random.default_rng(1)
    base = g.normal(size=(1, 6))
    xa = base + 0.05 * g.normal(size=(5, 6))
    xb = -base + 0.05 * g.normal(size=(5, 6))
    res = conflicts_from_units(_units({"w": xa}), _units({"w": xb}), groups="parameters",
                               n_permutations=200, n_bootstrap=50)["w"]
    assert res["mean_cosine"] < -0.9
    # only the split itself and its mirror (2 of 252 labellings) reach the observed value
    assert res["p"] < 0.05 and res["effect"] < -2
    assert res["interval"][1] < 0


def test_split_and_mirror_tie_exactly():
    g = np.random.default_rng(2)
    x = g.normal(size=(4, 3))
    res = conflicts_from_units(_units({"w": x[:2]}), _units({"w": x[2:]}), groups="parameters",
                               n_permutations=300, n_bootstrap=5)
    null, obs = res.nulls["w"], res["w"]["mean_cosine"]
    rng = np.random.Generator(np.random.PCG64(0))
    splits = [frozenset(rng.permutation(4)[:2]) for _ in range(300)]
    same = np.array([s in (frozenset({0, 1}), frozenset({2, 3})) for s in splits])
    assert same.any() and np.all(null[same] == obs)
    assert 0 < res["w"]["p"] <= 1


def _gqa_layout():
    la = LayerAttention(index=0, module="m", o_module="m.o", kind="declared", packing="separate",
                        orientation="linear", q="q", k="k", v="v", o="o", q_bias=None,
                        k_bias=None, v_bias=None, o_bias=None, num_heads=2, num_kv_heads=1,
                        head_dim=1)
    return AttentionLayout(kind="declared", layers=(la,))


def _gqa_units(seed, n):
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (2, 3), "k": (1, 3), "v": (1, 3), "o": (3, 2)}
    return _units({k: torch.randn(n, *s, generator=g, dtype=torch.float64) for k, s in shapes.items()})


@pytest.mark.parametrize("fdr,fn", [("bh", bh_qvalues), ("by", by_qvalues)])
def test_heads_groups_share_kv_slices_and_q_counts_them_once(fdr, fn):
    res = conflicts_from_units(_gqa_units(0, 3), _gqa_units(1, 3), groups="heads",
                               layout=_gqa_layout(), n_permutations=30, n_bootstrap=10, fdr=fdr)
    assert list(res) == [f"L0.H{h}.{b}" for h in range(2) for b in "QKVO"]
    assert res["L0.H0.K"] == res["L0.H1.K"] and res["L0.H0.V"] == res["L0.H1.V"]
    distinct = ["L0.H0.Q", "L0.H0.K", "L0.H0.V", "L0.H0.O", "L0.H1.Q", "L0.H1.O"]
    q = fn([res[k]["p"] for k in distinct])
    assert [res[k]["q"] for k in distinct] == pytest.approx(list(q), rel=ULPS_RTOL, abs=ULPS_ATOL)


def test_head_slice_equals_the_restricted_parameter():
    ga, gb = _gqa_units(2, 3), _gqa_units(3, 2)
    heads = conflicts_from_units(ga, gb, layout=_gqa_layout(), n_permutations=20, n_bootstrap=10)
    q1 = {"w": ga.tensors["q"][:, 1]}, {"w": gb.tensors["q"][:, 1]}
    ref = conflicts_from_units(_units(q1[0]), _units(q1[1]), groups="parameters",
                               n_permutations=20, n_bootstrap=10)["w"]
    for key in ("mean_cosine", "p", "effect", "null_mean"):
        assert heads["L0.H1.Q"][key] == pytest.approx(ref[key], rel=REORDER_RTOL, abs=REORDER_ATOL)


GA, GB = _units({"w": [[1.0, 0.0], [0.0, 1.0]]}), _units({"w": [[1.0, 1.0]]})
BAD = [
    pytest.param(dict(groups="layers"), "groups: expected one of", id="groups"),
    pytest.param(dict(n_permutations=0), "n_permutations: expected a positive int", id="n-perm"),
    pytest.param(dict(n_bootstrap=True), "n_bootstrap", id="n-boot-bool"),
    pytest.param(dict(seed=-1), "seed: expected an int >= 0", id="seed"),
    pytest.param(dict(fdr="holm"), "fdr: expected 'bh' or 'by'", id="fdr"),
    pytest.param(dict(groups="heads"), "expected an attention layout", id="heads-without-layout"),
    pytest.param(dict(gb=_units({"v": [[1.0, 1.0]]})), "tasks measured on different models", id="models"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_input(kwargs, message):
    kwargs = {"groups": "parameters", **kwargs}
    with pytest.raises(ValueError) as err:
        conflicts_from_units(GA, kwargs.pop("gb", GB), **kwargs)
    assert message in str(err.value)


def test_model_heads_group_is_the_masked_gradient():
    from fisher_fast.attention.slicing import qkov_mask
    from fisher_fast.conflicts import conflicts
    from fisher_fast.per_sample import per_sample_gradients
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch="phi3", num_heads=4, num_kv_heads=2, head_dim=2), dtype=torch.float64)
    a = random_batch(vocab_size=11, batch_size=3, seq_len=5, seed=3, sample_ids=["a_1", "a_2", "a_3"])
    b = random_batch(vocab_size=11, batch_size=2, seq_len=5, seed=4)
    res = conflicts(model, a, b, n_permutations=25, n_bootstrap=10, dtype=torch.float64)
    assert len(res) == 2 * 4 * 4 and res.ids_a == ["a_1", "a_2", "a_3"]
    (name, mask), = qkov_mask(model, 1, 3, "K").items()       # fused qkv: one tensor
    ga, gb = (per_sample_gradients(model, x, dtype=torch.float64) for x in (a, b))
    ref = conflicts_from_units(_units({"w": ga.tensors[name][:, mask]}),
                               _units({"w": gb.tensors[name][:, mask]}),
                               groups="parameters", n_permutations=25, n_bootstrap=10)["w"]
    for key in ("mean_cosine", "p", "effect", "null_sd"):
        assert res["L1.H3.K"][key] == pytest.approx(ref[key], rel=REORDER_RTOL,
                                                          abs=REORDER_ATOL)


def test_numpy_integers_are_accepted_for_counts_and_seed():
    import numpy as np

    want = conflicts_from_units(GA, GB, groups="parameters", n_permutations=20, seed=3, n_bootstrap=10)
    got = conflicts_from_units(GA, GB, groups="parameters", n_permutations=np.int64(20),
                               seed=np.int64(3), n_bootstrap=np.int32(10))
    assert got.n_permutations == 20 and type(got.seed) is int
    assert all(got[g]["p"] == want[g]["p"] for g in want)


@pytest.mark.parametrize("n_a, n_b, n_permutations, want", [
    (2, 2, 1000, 2 / 6),  # C(4, 2) = 6 labellings; a split and its mirror have the same pairs
    (3, 4, 1000, 1 / 35),  # C(7, 3) = 35
    (4, 4, 1000, 2 / 70),
    (32, 32, 99, 1 / 100),  # labellings enough: the Monte Carlo floor 1 / (P + 1)
    (1, 1, 10, 1.0),  # one distinct split: nothing can be tested
])
def test_min_attainable_p(n_a, n_b, n_permutations, want):
    from fisher_fast.conflicts import min_attainable_p

    assert min_attainable_p(n_a, n_b, n_permutations) == pytest.approx(want, rel=1e-15)


def test_the_result_names_its_hypothesis_and_too_few_units_stay_above_the_floor():
    g = np.random.default_rng(1)
    xa, xb = g.normal(size=(2, 5)) + 3.0, g.normal(size=(2, 5)) - 3.0  # opposed tasks
    res = conflicts_from_units(_units({"w": xa}), _units({"w": xb}), groups="parameters",
                               n_permutations=999, seed=0, n_bootstrap=10)
    assert "exchangeable" in res.hypothesis and "relabelling" in res.hypothesis
    assert res.min_attainable_p == pytest.approx(1 / 3)
    assert res["w"]["mean_cosine"] < -0.5  # clearly opposed, yet with 2 + 2 units a third of
    assert res["w"]["p"] > 0.25  # the labellings tie with the observed split
