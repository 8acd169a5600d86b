r"""False discovery rate q-values, by hand: Benjamini–Hochberg and Benjamini–Yekutieli.

With the m p-values sorted, :math:`p_{(1)} \le \dots \le p_{(m)}`,

.. math::

    q_{(i)} = \min\Big(1,\ \min_{j \ge i} \frac{c(m)\, m\, p_{(j)}}{j}\Big),
    \qquad c(m) = 1 \text{ (BH)}, \quad c(m) = \sum_{k=1}^m 1/k \text{ (BY)},

returned in the original order. Tied p-values get equal q-values; q is monotone in p.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _as_pvalues(p) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"p: expected a 1-D sequence of p-values, got shape {arr.shape}.")
    if np.isnan(arr).any() or (arr < 0).any() or (arr > 1).any():
        bad = arr[np.isnan(arr) | (arr < 0) | (arr > 1)][0]
        raise ValueError(f"p: expected p-values in [0, 1], got {bad}.")
    return arr


def _step_up(p, factor: float) -> np.ndarray:
    arr = _as_pvalues(p)
    m = arr.size
    if m == 0:
        return arr.copy()
    order = np.argsort(arr, kind="stable")
    ranks = np.arange(1, m + 1, dtype=np.float64)
    raw = arr[order] * m * factor / ranks
    stepped = np.minimum.accumulate(raw[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(stepped, 1.0)
    return q


def bh_qvalues(p: ArrayLike) -> np.ndarray:
    """Benjamini–Hochberg q-values of ``p`` (same order), as ``multipletests(method="fdr_bh")``.

    Args:
        p: m p-values in [0, 1], a 1-D sequence.

    Returns:
        ``ndarray[m]`` float64, the q-values in the order of ``p``.

    Raises:
        ValueError: ``p`` is not 1-D, or holds nan or a value outside [0, 1].
    """
    return _step_up(p, 1.0)


def by_qvalues(p: ArrayLike) -> np.ndarray:
    """Benjamini–Yekutieli q-values of ``p`` (same order), as ``multipletests(method="fdr_by")``.

    Args:
        p: m p-values in [0, 1], a 1-D sequence.

    Returns:
        ``ndarray[m]`` float64, the q-values in the order of ``p``.

    Raises:
        ValueError: ``p`` is not 1-D, or holds nan or a value outside [0, 1].
    """
    m = np.asarray(p).size
    return _step_up(p, float(np.sum(1.0 / np.arange(1, m + 1))) if m else 1.0)
