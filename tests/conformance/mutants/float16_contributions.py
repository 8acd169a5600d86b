"""Defect: per-sample contributions stored in float16 to halve the store (a float32
collector): contributions below float16's smallest normal (6e-5) lose their digits or flush
to zero, errors of ~6e-8 that an absolute float32 tolerance of 1e-7 hides.
"""

import torch

from .collector import CollectorAdapter, FisherCollector

DEFECT = "contributions stored in float16"
FAILS = {"contributions_agreement"}
DIAGNOSIS = "float16"


class HalfStoreCollector(FisherCollector):
    def store_contribution(self, sid, grads):
        self.ids.append(sid)
        for n, g in grads.items():
            self.contribs[n].append((g * g).to(torch.float16))

    def contributions(self):
        return list(self.ids), {n: torch.stack(v).float() for n, v in self.contribs.items()}


class Adapter(CollectorAdapter):
    name = "mutant:float16_contributions"
    collector_class = HalfStoreCollector
    dtype = torch.float32
