"""Defect: a 1e-8 "ridge" added to the Fisher "for numerical safety" (a float32 collector):
no estimator of the SPEC adds an epsilon. Hidden by an absolute float32 tolerance of 1e-7;
caught by the tolerance that scales with each tensor's largest value.
"""

import torch

from .collector import CollectorAdapter, FisherCollector

DEFECT = "F + 1e-8"
FAILS = {"empirical_fisher_agreement"}
DIAGNOSIS = "empirical_fisher + 1e-08"


class RidgeCollector(FisherCollector):
    def fisher(self):
        return {n: v + 1e-8 for n, v in super().fisher().items()}


class Adapter(CollectorAdapter):
    name = "mutant:ridge_1e8"
    collector_class = RidgeCollector
    dtype = torch.float32
