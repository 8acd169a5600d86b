"""Defect: squared gradients accumulated in a float16 buffer (to halve memory); small
squares underflow to 0 and sums lose all but three digits.
"""

import torch

from .collector import CollectorAdapter, FisherCollector

DEFECT = "float16 accumulation that underflows"
FAILS = {"empirical_fisher_agreement", "loss_scaling"}


class HalfCollector(FisherCollector):
    def __init__(self, model, loss_fn):
        super().__init__(model, loss_fn)
        self.sum_sq = {n: torch.zeros_like(p, dtype=torch.float16) for n, p in self.params.items()}

    def accumulate(self, grads):
        for n, g in grads.items():
            self.sum_sq[n] += (g * g).half()
            self.sum_g[n] += g

    def fisher(self):
        return {n: s.double() / self.count for n, s in self.sum_sq.items()}


class Adapter(CollectorAdapter):
    name = "mutant:float16_accumulation"
    collector_class = HalfCollector
