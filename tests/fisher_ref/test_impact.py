"""Estimator-impact metrics (SPEC §9) on hand-worked cases."""

import pytest
import torch

from fisher_ref.impact import (
    estimator_impact,
    kendall,
    pruning_mask_jaccard,
    spearman,
    topk_jaccard,
)

A = torch.arange(1.0, 11.0)  # 1..10


def test_identical_rankings_score_one():
    assert estimator_impact(A, 2 * A + 1) == {
        "spearman": pytest.approx(1.0), "kendall": pytest.approx(1.0), "topk_jaccard_10": 1.0,
        "topk_jaccard_20": 1.0, "pruning_mask_jaccard": 1.0}


def test_reversed_rankings():
    B = -A
    assert spearman(A, B) == pytest.approx(-1.0) and kendall(A, B) == pytest.approx(-1.0)
    assert topk_jaccard(A, B, 0.1) == 0.0  # {index 9} vs {index 0}
    assert pruning_mask_jaccard(A, B, 0.5) == 0.0  # {0..4} vs {5..9}


def test_one_adjacent_swap_at_the_top():
    B = A.clone()
    B[8], B[9] = A[9], A[8]  # ranks of the two largest swapped
    # Spearman: 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 990
    assert spearman(A, B) == pytest.approx(1 - 12 / 990)
    # Kendall: one discordant pair of 45: (44 - 1) / 45
    assert kendall(A, B) == pytest.approx(43 / 45)
    assert topk_jaccard(A, B, 0.1) == 0.0  # top-1: {9} vs {8}
    assert topk_jaccard(A, B, 0.2) == 1.0  # top-2: {8, 9} both
    assert pruning_mask_jaccard(A, B, 0.3) == 1.0


def test_partial_overlap_of_pruning_masks():
    B = torch.tensor([1.0, 2, 9, 4, 5, 6, 7, 8, 3, 10])  # entry 2 is now large, entry 8 small
    # sparsity 0.3 prunes 3: A -> {0, 1, 2}, B -> {0, 1, 8}: |{0,1}| / |{0,1,2,8}|
    assert pruning_mask_jaccard(A, B, 0.3) == pytest.approx(0.5)
    # top 20 %: A -> {8, 9}, B -> {9, 2}: 1/3
    assert topk_jaccard(A, B, 0.2) == pytest.approx(1 / 3)


def test_dicts_are_concatenated_in_key_order():
    a = {"x": A[:4], "y": A[4:]}
    b = {"y": A[4:], "x": A[:4]}  # same entries, keys in another order
    assert spearman(a, b) == pytest.approx(1.0)
