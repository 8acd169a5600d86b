"""Defect: the permutation test shuffles a copy of the labels but recomputes the statistic
on the original split, so every permuted statistic equals the observed one and p = 1.
"""

import numpy as np

from .collector import CollectorAdapter, mean_between_cosine

DEFECT = "a permutation statistic the permutation leaves unchanged"
FAILS = {"pvalues_calibrated"}


class Adapter(CollectorAdapter):
    name = "mutant:permutation_unchanged"

    def pvalue(self, ga, gb, n_permutations, seed):
        rng = np.random.default_rng(seed)
        labels = np.array([0] * len(ga) + [1] * len(gb))
        observed = mean_between_cosine(ga, gb)
        null = []
        for _ in range(n_permutations):
            shuffled = rng.permutation(labels)  # noqa: F841 - never used: the bug
            null.append(mean_between_cosine(ga, gb))
        return (1 + sum(v <= observed for v in null)) / (n_permutations + 1)
