"""Defect (a classic of EWC code): the "true Fisher" with the model's argmax label in place
of a label drawn from its predictive distribution.
"""

import torch

from .collector import CollectorAdapter

DEFECT = "argmax labels in the true Fisher"
FAILS = {"mc_fisher_converges"}
DIAGNOSIS = "argmax"


class Adapter(CollectorAdapter):
    name = "mutant:argmax_labels"

    def draw(self, p, n_samples, gen):
        weights = torch.zeros_like(p)
        weights[int(p.argmax())] = 1.0
        return weights
