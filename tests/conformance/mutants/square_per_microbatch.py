"""Defect: square the mean gradient of micro-batches of b = 2 (the legacy batch-squared
estimator presented as the empirical Fisher)."""

import torch

from .collector import CollectorAdapter, FisherCollector

DEFECT = "square per micro-batch of b > 1"
FAILS = {"empirical_fisher_agreement", "micro_batch_invariance"}
MICRO_BATCH = 2


class MicroBatchCollector(FisherCollector):
    def update(self, batch):
        grads = [g for _, g in self.sample_gradients(batch)]
        for start in range(0, len(grads), MICRO_BATCH):
            chunk = grads[start:start + MICRO_BATCH]
            for name in self.params:
                mean = torch.stack([g[name] for g in chunk]).mean(0)
                self.sum_sq[name] += mean ** 2
                self.sum_g[name] += mean
            self.count += 1


class Adapter(CollectorAdapter):
    name = "mutant:square_per_microbatch"
    collector_class = MicroBatchCollector
