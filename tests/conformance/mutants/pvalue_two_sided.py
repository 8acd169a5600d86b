"""Defect: a two-sided permutation test, |null - mean| >= |observed - mean|, where the SPEC's
conflict test is one-sided: a strong agreement between the tasks is reported as a conflict.
"""

import numpy as np

from .collector import CollectorAdapter, mean_between_cosine

DEFECT = "two-sided p-value"
FAILS = {"pvalues_direction", "pvalues_agreement"}
DIAGNOSIS = "two-sided"


class Adapter(CollectorAdapter):
    name = "mutant:pvalue_two_sided"

    def pvalue(self, ga, gb, n_permutations, seed):
        rng = np.random.default_rng(seed)
        pooled = np.concatenate([ga, gb])
        observed = mean_between_cosine(ga, gb)
        null = np.array([mean_between_cosine(pooled[p[:len(ga)]], pooled[p[len(ga):]])
                         for p in (rng.permutation(len(pooled)) for _ in range(n_permutations))])
        centre = null.mean()
        return (1 + np.sum(np.abs(null - centre) >= abs(observed - centre))) / (n_permutations + 1)
