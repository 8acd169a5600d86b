"""Welford/Chan states: any split merges to the two-pass weighted moments."""

import torch

from fisher_fast.stats.moments import Moments
from fisher_ref.testing.tolerances import tolerance

REORDER = dict(zip(("rtol", "atol"), tolerance("float64-reorder")))
M2 = dict(zip(("rtol", "atol"), tolerance("welford-m2")))


def _two_pass(x, w):
    W = w.sum()
    mean = (w[:, None] * x).sum(0) / W
    return W, mean, (w[:, None] * (x - mean) ** 2).sum(0)


def test_merge_of_any_split_equals_two_pass():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64) + 100.0  # large mean: cancellation bait
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    state = Moments.zeros((3,), torch.float64, "cpu")
    for a, b in [(0, 2), (2, 3), (3, 9)]:
        state = state.merge(Moments.of(x[a:b], w[a:b]))
    W, mean, m2 = _two_pass(x, w)
    torch.testing.assert_close(state.W, W, **REORDER)
    torch.testing.assert_close(state.mean, mean, **REORDER)
    torch.testing.assert_close(state.m2, m2, **M2)


def test_second_moment_and_variance_by_hand():
    # values 1 and 3 with weights 1 and 3: W = 4, mean = 2.5, E[x^2] = (1 + 27) / 4 = 7
    s = Moments.of(torch.tensor([[1.0], [3.0]], dtype=torch.float64),
                   torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert float(s.second_moment()) == 7.0
    assert float(s.variance()) == 7.0 - 2.5 ** 2


def test_empty_state_merges_as_identity():
    x = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    one = Moments.of(x, torch.ones(1, dtype=torch.float64))
    merged = Moments.zeros((2,), torch.float64, "cpu").merge(one)
    assert torch.equal(merged.mean, one.mean) and torch.equal(merged.m2, one.m2)


def test_shifted_chunk_sums_equal_two_pass_moments():
    from fisher_fast.stats.sinks import ShiftedSums

    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 2, 3, generator=g, dtype=torch.float64) + 50.0
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    sums = ShiftedSums((2, 3), torch.float64, "cpu")
    for a, b in [(0, 3), (3, 4), (4, 7)]:
        sums.add(x[a:b], w[a:b])
    got = sums.moments()
    W, mean, m2 = _two_pass(x.reshape(7, -1), w)
    torch.testing.assert_close(got.W, W, **REORDER)
    torch.testing.assert_close(got.mean.reshape(-1), mean, **REORDER)
    torch.testing.assert_close(got.m2.reshape(-1), m2, **M2)


def _fed_by_blocks(kind, seed, offset, split):
    """Chunk sums of ``kind`` fed x [2 passes, 7 rows, 5, 3] by row slices (0-4, 4-7) and
    blocks of axis 0 (the later block first), as the capture does for MC draws.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, 5, 3, generator=g, dtype=torch.float64) + offset
    w = torch.rand(2, 7, generator=g, dtype=torch.float64) + 0.1
    sums = kind((5, 3), torch.float64, "cpu")
    for p in range(2):
        for a, b in [(0, 4), (4, 7)]:
            for part in (slice(split, 5), slice(0, split)):
                sums.add(x[p, a:b, part].clone(), w[p, a:b], part, owned=True)
    return x, w, sums.moments()


def test_shifted_sums_by_blocks_of_the_first_axis_and_several_passes():
    # blocks of axis 0 in any order, row slices within each, and a second backward pass
    # over the same rows (MC draws share a sink): the two-pass moments of all 14 values
    from fisher_fast.stats.sinks import ShiftedSums

    x, w, got = _fed_by_blocks(ShiftedSums, seed=5, offset=30.0, split=3)
    W, mean, m2 = _two_pass(x.reshape(14, -1), w.reshape(14))
    torch.testing.assert_close(got.W, W, **REORDER)
    torch.testing.assert_close(got.mean.reshape(-1), mean, **REORDER)
    torch.testing.assert_close(got.m2.reshape(-1), m2, **M2)


def test_in_place_merge_equals_merge_and_leaves_the_other_state_alone():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64) + 10.0
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.1
    a, b = Moments.of(x[:5], w[:5]), Moments.of(x[5:], w[5:])
    b_mean, b_m2 = b.mean.clone(), b.m2.clone()
    expected = a.merge(b)
    got = Moments(a.W.clone(), a.mean.clone(), a.m2.clone()).merge_(b)
    for t, e in ((got.W, expected.W), (got.mean, expected.mean), (got.m2, expected.m2)):
        torch.testing.assert_close(t, e, **REORDER)
    assert torch.equal(b.mean, b_mean) and torch.equal(b.m2, b_m2)


def test_moments_of_pairs_equal_two_pass_of_the_dense_tensors():
    # 3 units over a [4, 2] table: row 0 touched by every unit (cancellation bait), row 2
    # by none, rows 1 and 3 by some; dense x is zero outside the pairs
    rows, cols = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 3, 0, 1])
    g = torch.Generator().manual_seed(4)
    values = torch.randn(6, 2, generator=g, dtype=torch.float64)
    values[cols == 0, 0] += 50.0
    w = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    dense = torch.zeros(3, 4, 2, dtype=torch.float64)
    dense[rows, cols] = values
    got = Moments.of_pairs(w, rows, cols, values, (4, 2))
    W, mean, m2 = _two_pass(dense.reshape(3, -1), w)
    torch.testing.assert_close(got.W, W, **REORDER)
    torch.testing.assert_close(got.mean, mean.reshape(4, 2), **REORDER)
    torch.testing.assert_close(got.m2, m2.reshape(4, 2), **M2)
    assert torch.count_nonzero(got.m2[2]) == 0 and torch.count_nonzero(got.mean[2]) == 0


def test_moments_of_pairs_by_hand():
    # one column, two units of weight 1: unit 0 has x = 2 at row 0, unit 1 misses row 0.
    # mean = 1, M2 = (2 - 1)^2 + (0 - 1)^2 = 2
    m = Moments.of_pairs(torch.ones(2, dtype=torch.float64), torch.tensor([0]), torch.tensor([0]),
                         torch.tensor([[2.0]], dtype=torch.float64), (1, 1))
    assert float(m.mean) == 1.0 and float(m.m2) == 2.0


def test_second_moment_states_by_hand_and_by_blocks_and_pairs():
    from fisher_fast.stats.moments import SecondMoment
    from fisher_fast.stats.sinks import SquareSums

    # by hand: values 1 and 3 with weights 1 and 3 -> (1 + 27) / 4 = 7
    sums = SquareSums((1,), torch.float64, "cpu")
    sums.add(torch.tensor([[1.0], [3.0]], dtype=torch.float64),
             torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert float(sums.moments().second_moment()) == 7.0
    # blocks of axis 0, row slices, two passes, then merges (copying and in place): the
    # weighted mean of all the squares
    x, w, got = _fed_by_blocks(SquareSums, seed=8, offset=0.0, split=2)
    want = (w.reshape(14, 1, 1) * x.reshape(14, 5, 3).square()).sum(0) / w.sum()
    torch.testing.assert_close(got.second_moment(), want, **REORDER)
    half = SecondMoment(torch.tensor(2.0, dtype=torch.float64), torch.full((5, 3), 4.0,
                                                                          dtype=torch.float64))
    for merged in (got.merge(half), SecondMoment(got.W.clone(), got.f.clone()).merge_(half)):
        torch.testing.assert_close(merged.f, (want * w.sum() + 8.0) / (w.sum() + 2.0), **REORDER)
    # pairs: 3 units over a [4, 2] table, zero outside the pairs
    rows, cols = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 3, 0, 1])
    values = torch.randn(4, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    wu = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    dense = torch.zeros(3, 4, 2, dtype=torch.float64)
    dense[rows, cols] = values
    got = SecondMoment.of_pairs(wu, rows, cols, values, (4, 2))
    torch.testing.assert_close(got.f, (wu[:, None, None] * dense.square()).sum(0) / wu.sum(),
                               **REORDER)
