"""Defect: sum the micro-batch's per-sample gradients, then square (one backward per batch)."""

import torch

from .collector import CollectorAdapter, FisherCollector, active_label_counts

DEFECT = "sum micro-batch gradients then square"
FAILS = {"empirical_fisher_agreement", "micro_batch_invariance", "split_invariance",
         "duplication_invariance"}


class BatchGradientCollector(FisherCollector):
    def update(self, batch):
        inputs = {k: v for k, v in batch.items() if k != "sample_ids"}
        n = int((active_label_counts(batch) > 0).sum())
        if n == 0:
            return
        loss = self.loss_fn(self.model, inputs).sum()  # one backward for the whole batch
        grads = torch.autograd.grad(loss, list(self.params.values()), allow_unused=True)
        for (name, p), g in zip(self.params.items(), grads, strict=False):
            g = torch.zeros_like(p) if g is None else g
            self.sum_sq[name] += g.double() ** 2
            self.sum_g[name] += g.double()
        self.count += n


class Adapter(CollectorAdapter):
    name = "mutant:sum_then_square"
    collector_class = BatchGradientCollector
    # One backward per batch: this collector has no per-sample gradients, so it offers only
    # the estimators (and its conflict test, which takes per-sample gradients separately).
    per_sample_contributions = None
    interference = None
