"""Welford/Chan states: any split, order and merge tree gives the two-pass moments."""

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from fisher_ref.testing.tolerances import tolerance
from fisher_ref.welford import WelfordState, two_pass_moments

RTOL, ATOL = tolerance("welford")
VARIANCE = dict(zip(("rtol", "atol"), tolerance("variance-by-subtraction"), strict=True))


def _data(seed, n, weighted):
    g = torch.Generator().manual_seed(seed)
    x = 3.0 + torch.randn(n, 2, 3, generator=g, dtype=torch.float64)
    w = torch.randint(1, 5, (n,), generator=g).double() if weighted else None
    return x, w


def _assert_state(state, x, w):
    W, mean, M2 = two_pass_moments(x, w)
    assert abs(state.W - W) <= RTOL * W
    torch.testing.assert_close(state.mean, mean, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(state.M2, M2, rtol=RTOL, atol=ATOL)


def test_two_pass_by_hand():
    x = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    W, mean, M2 = two_pass_moments(x, torch.tensor([1.0, 2.0, 1.0]))
    # mean = (1 + 4 + 4) / 4 = 2.25; M2 = 1.5625 + 2 * 0.0625 + 3.0625 = 4.75
    assert W == 4.0 and mean.item() == 2.25 and abs(M2.item() - 4.75) < 1e-15


@given(seed=st.integers(0, 10**6), n=st.integers(1, 40), weighted=st.booleans())
def test_sequential_updates_equal_two_pass(seed, n, weighted):
    x, w = _data(seed, n, weighted)
    state = WelfordState.empty((2, 3))
    for i in range(n):
        state.update(x[i], 1.0 if w is None else float(w[i]))
    _assert_state(state, x, w)


@given(seed=st.integers(0, 10**6), n=st.integers(2, 40), weighted=st.booleans(),
       data=st.data())
def test_any_split_order_and_merge_tree_equal_two_pass(seed, n, weighted, data):
    x, w = _data(seed, n, weighted)
    perm = data.draw(st.permutations(range(n)))
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=6)))
    chunks = np.split(np.array(perm), cuts)
    states = [WelfordState.from_tensors(x[c], None if w is None else w[c]) for c in chunks]
    while len(states) > 1:  # merge a random adjacent-or-not pair until one is left
        i = data.draw(st.integers(0, len(states) - 1))
        j = data.draw(st.integers(0, len(states) - 2))
        a = states.pop(i)
        b = states.pop(j)
        states.append(a.merge(b) if data.draw(st.booleans()) else b.merge(a))
    _assert_state(states[0], x, w)


def test_merge_with_empty_state_is_identity():
    x, _ = _data(0, 5, False)
    s = WelfordState.from_tensors(x)
    _assert_state(s.merge(WelfordState.empty((2, 3))), x, None)
    _assert_state(WelfordState.empty((2, 3)).merge(s), x, None)


def test_variance_and_second_moment():
    x, w = _data(1, 7, True)
    s = WelfordState.from_tensors(x, w)
    wb = w[:, None, None]
    torch.testing.assert_close(s.second_moment(), (wb * x**2).sum(0) / w.sum(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(s.variance(), s.second_moment() - s.mean**2, **VARIANCE)
