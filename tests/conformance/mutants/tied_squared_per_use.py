"""Defect: a tied weight (GPT-2's wte = lm_head) is handled per module, as a hook-based
collector sees it: each use's per-sample gradient is squared separately and the squares are
added, instead of summing the uses' gradients and then squaring.
"""

import torch

from .collector import LM_ARCHITECTURES, CollectorAdapter, FisherCollector

DEFECT = "tied weights squared per use"
FAILS = {"empirical_fisher_agreement"}


class PerModuleCollector(FisherCollector):
    def update(self, batch):
        head = self.model.get_output_embeddings()
        tied = head is not None and head.weight is self.model.get_input_embeddings().weight
        if not tied:
            return super().update(batch)
        shared = head.weight
        name = next(n for n, p in self.params.items() if p is shared)
        head.weight = torch.nn.Parameter(shared.detach().clone())  # a second copy for the head
        self.split_head = True
        try:
            for sid, grads in self.sample_gradients(batch):
                g_head = grads.pop("__head__")
                for n, g in grads.items():
                    self.sum_sq[n] += g * g + (g_head * g_head if n == name else 0)
                    self.sum_g[n] += g + (g_head if n == name else 0)
                self.store_contribution(sid, grads)
                self.count += 1
        finally:
            head.weight = shared
            self.split_head = False

    def sample_gradients(self, batch):
        if not getattr(self, "split_head", False):
            yield from super().sample_gradients(batch)
            return
        head = self.model.get_output_embeddings()
        params = list(self.params.values()) + [head.weight]
        inputs = {k: v for k, v in batch.items() if k != "sample_ids"}
        losses = self.loss_fn(self.model, inputs)
        for i, sid in enumerate(batch["sample_ids"]):
            if (batch["labels"][i, 1:] != -100).any():
                gs = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
                out = {n: (torch.zeros_like(p) if g is None else g).double()
                       for (n, p), g in zip(self.params.items(), gs, strict=False)}
                out["__head__"] = gs[-1].double()
                yield sid, out


class Adapter(CollectorAdapter):
    name = "mutant:tied_squared_per_use"
    families = ("causal_lm",)
    architectures = LM_ARCHITECTURES
    collector_class = PerModuleCollector

    per_sample_contributions = None  # this collector only provides the estimators
    interference = None
    conflict_pvalues = None
