"""Defect: permutation p-value #{null <= observed} / P, which is 0 when no permutation
reaches the observed statistic (instead of (1 + #) / (P + 1)).
"""

import numpy as np

from .collector import CollectorAdapter, mean_between_cosine

DEFECT = "p = 0 allowed"
FAILS = {"pvalues_positive"}


class Adapter(CollectorAdapter):
    name = "mutant:p_zero"

    def pvalue(self, ga, gb, n_permutations, seed):
        rng = np.random.default_rng(seed)
        pooled = np.concatenate([ga, gb])
        observed = mean_between_cosine(ga, gb)
        count = 0
        for _ in range(n_permutations):
            perm = rng.permutation(len(pooled))
            count += mean_between_cosine(pooled[perm[:len(ga)]], pooled[perm[len(ga):]]) <= observed
        return count / n_permutations
