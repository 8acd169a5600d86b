"""Defect: the contribution of a sample is taken from the batch's gradient (one backward
per batch), so every sample of a batch gets the whole batch's squared gradient.
"""

import torch

from .collector import CollectorAdapter, FisherCollector, active_label_counts

DEFECT = "whole batch's squared gradient stored as one sample's contribution"
FAILS = {"contributions_agreement"}


class BatchContributionCollector(FisherCollector):
    def update(self, batch):
        for _, g in self.sample_gradients(batch):  # F and S stay right: only contributions are wrong
            self.accumulate(g)
            self.count += 1
        keep = active_label_counts(batch) > 0
        if not keep.any():
            return
        inputs = {k: v for k, v in batch.items() if k != "sample_ids"}
        loss = self.loss_fn(self.model, inputs)[keep].mean()
        grads = torch.autograd.grad(loss, list(self.params.values()), allow_unused=True)
        grads = {n: (torch.zeros_like(p) if g is None else g).double()
                 for (n, p), g in zip(self.params.items(), grads, strict=False)}
        for sid, k in zip(batch["sample_ids"], keep, strict=False):
            if k:
                self.store_contribution(sid, grads)


class Adapter(CollectorAdapter):
    name = "mutant:batch_contribution"
    collector_class = BatchContributionCollector
