"""Defect: group Fisher kept per batch and overwritten by each update, so the result is the
last batch's (a streaming collector that forgets to accumulate).
"""

import torch

from .collector import CollectorAdapter, FisherCollector

DEFECT = "group Fisher of the last batch only"
FAILS = {"group_fisher_invariance"}
DIAGNOSIS = "the last batch's empirical_fisher"


def role_groups(model) -> dict:
    """Per parameter a function full-shape tensor -> group sums: rows of Linear weights,
    elements of biases and norm weights, one group for anything else (SPEC §3 roles).
    """
    out = {}
    for mname, module in model.named_modules():
        for local, _ in module.named_parameters(recurse=False):
            name = f"{mname}.{local}" if mname else local
            if isinstance(module, torch.nn.Linear) and local == "weight":
                out[name] = lambda t: t.sum(dim=1)
            elif local == "bias" or "Norm" in type(module).__name__:
                out[name] = lambda t: t.reshape(-1)
            else:
                out[name] = lambda t: t.sum().reshape(1)
    return out


class LastBatchCollector(FisherCollector):
    def update(self, batch):
        self.sum_sq = {n: torch.zeros_like(v) for n, v in self.sum_sq.items()}  # the defect
        self.count = 0
        super().update(batch)


class Adapter(CollectorAdapter):
    name = "mutant:group_fisher_last_batch"
    collector_class = LastBatchCollector
    families = ("classifier",)
    architectures = ("mlp", "cnn", "ln_gelu")
    empirical_fisher = None  # its F has the same defect; only group Fisher is offered
    squared_mean_gradient = None
    per_sample_contributions = None

    def group_fisher(self, model, batches, *, loss_fn):
        fisher = self._collect(model, batches, loss_fn).fisher()
        return {n: reduce(fisher[n]) for n, reduce in role_groups(model).items()}
