"""Defect: the permutation p-value counts the upper tail, #{null >= observed}: a small p for
gradients that *agree* across tasks, a large one for a conflict.
"""

import numpy as np

from .collector import CollectorAdapter, mean_between_cosine

DEFECT = "p-value in the wrong tail"
FAILS = {"pvalues_direction", "pvalues_agreement"}
DIAGNOSIS = "the upper tail"


class Adapter(CollectorAdapter):
    name = "mutant:pvalue_wrong_tail"

    def pvalue(self, ga, gb, n_permutations, seed):
        rng = np.random.default_rng(seed)
        pooled = np.concatenate([ga, gb])
        observed = mean_between_cosine(ga, gb)
        null = [mean_between_cosine(pooled[p[:len(ga)]], pooled[p[len(ga):]])
                for p in (rng.permutation(len(pooled)) for _ in range(n_permutations))]
        return (1 + sum(v >= observed for v in null)) / (n_permutations + 1)
