r"""Impact of the estimator choice on group importances (SPEC §9).

Given two importance vectors a and b over the same groups (tensors, arrays, or dicts of
them concatenated in key order of ``a``), compare their rankings: Spearman ρ, Kendall τ
(scipy, tau-b), top-k Jaccard :math:`|A \cap B| / |A \cup B|` of the k largest entries at
k = ⌈10 %·n⌉ and ⌈20 %·n⌉, and the Jaccard of the pruning masks (the ⌊s·n⌋ smallest
entries) at sparsity s. Ties are broken by position (lower index first) in both rankings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import scipy.stats
import torch
from numpy.typing import ArrayLike

#: An importance vector: a tensor, an array or a sequence of numbers, or a dict of them
#: (e.g. parameter name -> ``Tensor[n_groups]``), concatenated in key order.
Importance = ArrayLike | Mapping[str, ArrayLike]


def _vector(x) -> np.ndarray:
    if isinstance(x, dict):
        parts = [_vector(v) for v in x.values()]
        return np.concatenate(parts) if parts else np.zeros(0)
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            raise ValueError(f"impact: expected the same keys, got {sorted(a)} and {sorted(b)}.")
        b = {k: b[k] for k in a}
    va, vb = _vector(a), _vector(b)
    if va.shape != vb.shape:
        raise ValueError(f"impact: expected vectors of one length, got {va.size} and {vb.size}.")
    if va.size < 2:
        raise ValueError(f"impact: expected at least 2 entries, got {va.size}.")
    return va, vb


def _jaccard(x: set, y: set) -> float:
    return 1.0 if not x and not y else len(x & y) / len(x | y)


def _order(v: np.ndarray, descending: bool) -> np.ndarray:
    return np.argsort(-v if descending else v, kind="stable")


def spearman(a: Importance, b: Importance) -> float:
    """Spearman rank correlation ρ (``scipy.stats.spearmanr``).

    Args:
        a: importances over n >= 2 groups (a dict is taken in its own key order).
        b: importances over the same groups (a dict is taken in ``a``'s key order).
    """
    va, vb = _pair(a, b)
    return float(scipy.stats.spearmanr(va, vb).statistic)


def kendall(a: Importance, b: Importance) -> float:
    """Kendall τ-b (``scipy.stats.kendalltau``).

    Args:
        a: importances over n >= 2 groups (a dict is taken in its own key order).
        b: importances over the same groups (a dict is taken in ``a``'s key order).
    """
    va, vb = _pair(a, b)
    return float(scipy.stats.kendalltau(va, vb).statistic)


def topk_jaccard(a: Importance, b: Importance, fraction: float = 0.1) -> float:
    r"""Jaccard of the top-k sets, :math:`k = \max(1, \lceil \text{fraction}\cdot n \rceil)`.

    Args:
        a: importances over n >= 2 groups (a dict is taken in its own key order).
        b: importances over the same groups (a dict is taken in ``a``'s key order).
        fraction: in (0, 1], the share of the groups in each top-k set.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}.")
    va, vb = _pair(a, b)
    k = max(1, math.ceil(fraction * va.size - 1e-9))
    return _jaccard(set(_order(va, True)[:k].tolist()), set(_order(vb, True)[:k].tolist()))


def pruning_mask_jaccard(a: Importance, b: Importance, sparsity: float = 0.5) -> float:
    r"""Jaccard of the pruned sets: the :math:`\lfloor s \cdot n \rfloor` least important entries
    (1.0 when nothing is pruned).

    Args:
        a: importances over n >= 2 groups (a dict is taken in its own key order).
        b: importances over the same groups (a dict is taken in ``a``'s key order).
        sparsity: s in [0, 1], the share of the groups pruned.
    """
    if not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity: expected a number in [0, 1], got {sparsity!r}.")
    va, vb = _pair(a, b)
    k = math.floor(sparsity * va.size + 1e-9)
    return _jaccard(set(_order(va, False)[:k].tolist()), set(_order(vb, False)[:k].tolist()))


def estimator_impact(a: Importance, b: Importance, *, sparsity: float = 0.5) -> dict[str, float]:
    """All §9 metrics: ``spearman``, ``kendall``, ``topk_jaccard_10``, ``topk_jaccard_20``,
    ``pruning_mask_jaccard``.

    Args:
        a: importances over n >= 2 groups, e.g. R(F).
        b: importances over the same groups, e.g. R(S).
        sparsity: the sparsity of the pruning masks.
    """
    return {
        "spearman": spearman(a, b),
        "kendall": kendall(a, b),
        "topk_jaccard_10": topk_jaccard(a, b, 0.1),
        "topk_jaccard_20": topk_jaccard(a, b, 0.2),
        "pruning_mask_jaccard": pruning_mask_jaccard(a, b, sparsity),
    }
