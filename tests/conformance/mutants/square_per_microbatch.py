"""Defect: square the mean gradient of micro-batches of b = 2 (the legacy batch-squared
estimator presented as the empirical Fisher).
"""

import torch

from .collector import CollectorAdapter, FisherCollector

DEFECT = "square per micro-batch of b > 1"
FAILS = {"empirical_fisher_agreement", "micro_batch_invariance"}
MICRO_BATCH = 2


class MicroBatchCollector(FisherCollector):
    def update(self, batch):
        per_sample = list(self.sample_gradients(batch))
        for sid, g in per_sample:  # contributions and E[g] stay per sample: only F is wrong
            self.store_contribution(sid, g)
            for name in self.params:
                self.sum_g[name] += g[name]
            self.n_samples = getattr(self, "n_samples", 0) + 1
        grads = [g for _, g in per_sample]
        for start in range(0, len(grads), MICRO_BATCH):
            chunk = grads[start:start + MICRO_BATCH]
            for name in self.params:
                mean = torch.stack([g[name] for g in chunk]).mean(0)
                self.sum_sq[name] += mean ** 2
            self.count += 1

    def squared_mean(self):
        return {n: (s / self.n_samples) ** 2 for n, s in self.sum_g.items()}


class Adapter(CollectorAdapter):
    name = "mutant:square_per_microbatch"
    collector_class = MicroBatchCollector
