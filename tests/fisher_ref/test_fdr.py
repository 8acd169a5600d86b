"""bh_qvalues / by_qvalues against statsmodels, with ties and ones; monotone in p."""

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from fisher_ref.fdr import bh_qvalues, by_qvalues
from fisher_ref.testing.tolerances import tolerance

FDR = dict(zip(("rtol", "atol"), tolerance("fdr-float64"), strict=True))


def _pvalues(seed, m):
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=m) ** 2
    p[rng.integers(0, m, m // 4)] = 1.0  # ones
    p[: m // 3] = np.round(p[: m // 3], 1)  # ties
    return rng.permutation(p)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ours, method", [(bh_qvalues, "fdr_bh"), (by_qvalues, "fdr_by")],
                         ids=["bh", "by"])
def test_equals_statsmodels(seed, ours, method):
    p = _pvalues(seed, m=5 + 7 * seed)
    np.testing.assert_allclose(ours(p), multipletests(p, method=method)[1], **FDR)


def test_hand_worked_bh():
    # sorted p = .01, .02, .03, .5; m = 4: raw m p / rank = .04, .04, .04, .5
    np.testing.assert_allclose(bh_qvalues([0.5, 0.01, 0.03, 0.02]), [0.5, 0.04, 0.04, 0.04])


@pytest.mark.parametrize("fn", [bh_qvalues, by_qvalues])
def test_monotone_in_p_and_capped(fn):
    p = _pvalues(11, 40)
    q = fn(p)
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(q[order]) >= 0)
    assert np.all((q >= p) & (q <= 1))


def test_empty_input():
    assert bh_qvalues([]).shape == (0,)


@pytest.mark.parametrize("p, message", [
    pytest.param([0.1, np.nan], "got nan", id="nan"),
    pytest.param([0.1, 1.5], "got 1.5", id="above-one"),
    pytest.param([-0.1], "got -0.1", id="negative"),
    pytest.param([[0.1]], "1-D sequence", id="2-D"),
])
def test_bad_input(p, message):
    with pytest.raises(ValueError, match=message):
        bh_qvalues(p)
