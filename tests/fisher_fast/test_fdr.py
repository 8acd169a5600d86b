"""bh_qvalues / by_qvalues: a hand-worked example, statsmodels agreement, monotonicity, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from fisher_fast.fdr import bh_qvalues, by_qvalues
from fisher_ref.testing.tolerances import tolerance

ULPS = dict(zip(("rtol", "atol"), tolerance("float64-ulps")))
FDR = dict(zip(("rtol", "atol"), tolerance("fdr-float64")))


def test_hand_worked_bh_and_by():
    p = [0.01, 0.04, 0.03, 0.5]
    # sorted 0.01, 0.03, 0.04, 0.5 -> m p / k = 0.04, 0.06, 0.0533.., 0.5 -> running min from the top
    bh = [0.04, 0.16 / 3, 0.16 / 3, 0.5]
    c = 1 + 1 / 2 + 1 / 3 + 1 / 4
    by = [min(1.0, c * x) for x in bh]
    np.testing.assert_allclose(bh_qvalues(p), bh, **ULPS)
    np.testing.assert_allclose(by_qvalues(p), by, **ULPS)


@pytest.mark.parametrize("seed", range(5))
def test_equal_statsmodels_with_ties_and_ones(seed):
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=23) ** 2
    p[[1, 5, 9]] = p[3]          # ties
    p[[0, 11]] = 1.0             # ones
    for fn, method in ((bh_qvalues, "fdr_bh"), (by_qvalues, "fdr_by")):
        want = multipletests(p, method=method)[1]
        np.testing.assert_allclose(fn(p), want, **FDR)


def test_q_is_monotone_in_p():
    p = np.random.default_rng(7).uniform(size=50)
    q = bh_qvalues(p)
    order = np.argsort(p)
    assert np.all(np.diff(q[order]) >= 0) and np.all(q >= p)


def test_empty_input():
    assert bh_qvalues([]).size == 0


BAD = [
    pytest.param(bh_qvalues, [[0.1, 0.2]], "expected a 1-D sequence", id="2d"),
    pytest.param(bh_qvalues, [0.1, 1.5], "got 1.5", id="above-one"),
    pytest.param(by_qvalues, [0.1, float("nan")], "nan present: True", id="nan"),
    pytest.param(by_qvalues, [-0.1], "expected values in [0, 1]", id="negative"),
]


@pytest.mark.parametrize("fn,p,message", BAD)
def test_bad_input(fn, p, message):
    with pytest.raises(ValueError) as err:
        fn(p)
    assert message in str(err.value)
