"""False discovery rate q-values: Benjamini–Hochberg and Benjamini–Yekutieli (SPEC §7).

Both equal ``statsmodels.stats.multitest.multipletests(p, method="fdr_bh" | "fdr_by")[1]``;
written out in numpy so the step-up is visible.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def bh_qvalues(p: ArrayLike) -> np.ndarray:
    r"""Benjamini–Hochberg q-values, in the order of ``p``.

    With p sorted ascending, :math:`p_{(1)} \le \dots \le p_{(m)}`,

    .. math:: q_{(i)} = \min\Big(1, \min_{k \ge i} \frac{m}{k} p_{(k)}\Big).

    Args:
        p: 1-D p-values in [0, 1] (tensor, array or list).

    Returns:
        float64 array of q-values, same order as ``p``; q is monotone in p.
    """
    return _step_up(p, correction=1.0)


def by_qvalues(p: ArrayLike) -> np.ndarray:
    r"""Benjamini–Yekutieli q-values (valid under any dependence), in the order of ``p``.

    .. math:: q_{(i)} = \min\Big(1, \min_{k \ge i} \frac{m\, c_m}{k} p_{(k)}\Big),
        \quad c_m = \sum_{j=1}^{m} 1/j.
    """
    m = np.asarray(p).size
    return _step_up(p, correction=float(np.sum(1.0 / np.arange(1, m + 1))) if m else 1.0)


def _step_up(p, correction: float) -> np.ndarray:
    pt = np.asarray(p, dtype=np.float64)
    if pt.ndim != 1:
        raise ValueError(f"p-values: expected a 1-D sequence, got shape {pt.shape}.")
    bad = np.isnan(pt) | (pt < 0) | (pt > 1)
    if bad.any():
        raise ValueError(f"p-values: expected values in [0, 1], got {pt[bad][0]} "
                         f"(nan present: {bool(np.isnan(pt).any())}).")
    m = pt.size
    if m == 0:
        return pt.copy()
    order = np.argsort(pt, kind="stable")
    scaled = pt[order] * (m * correction) / np.arange(1, m + 1, dtype=np.float64)
    q_sorted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)  # running min from the top
    q = np.empty(m)
    q[order] = q_sorted
    return q
