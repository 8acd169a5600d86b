"""Defect: Benjamini-Hochberg q-values computed as p * m / rank without the step-up
(running minimum from the largest p down), so q-values are not monotone in p.
"""

import numpy as np

from .collector import CollectorAdapter

DEFECT = "wrong BH q-values"
FAILS = {"qvalues_statsmodels"}


class Adapter(CollectorAdapter):
    name = "mutant:wrong_bh"

    def fdr_qvalues(self, pvalues, *, method="bh"):
        if method != "bh":
            raise NotImplementedError(method)
        p = np.asarray(pvalues, dtype=float)
        ranks = np.argsort(np.argsort(p)) + 1
        return np.minimum(p * len(p) / ranks, 1.0)
