"""Defect: per-token and per-sequence units confused: asked for per-sample units, the
collector takes one gradient per token (of its NLL) and averages their squares.
"""

import torch

from .collector import LM_ARCHITECTURES, CollectorAdapter, FisherCollector

DEFECT = "per-token and per-sequence units confused"
FAILS = {"empirical_fisher_agreement"}


class TokenUnitCollector(FisherCollector):
    def sample_gradients(self, batch):
        inputs = {k: v for k, v in batch.items() if k not in ("sample_ids", "labels")}
        logits = self.model(**inputs).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits, -1)
        for i, sid in enumerate(batch["sample_ids"]):
            for t in range(targets.shape[1]):
                if targets[i, t] != -100:
                    nll = -logp[i, t, targets[i, t]]
                    grads = torch.autograd.grad(nll, list(self.params.values()), retain_graph=True,
                                                allow_unused=True)
                    yield (sid, t), {n: (torch.zeros_like(p) if g is None else g).double()
                                     for (n, p), g in zip(self.params.items(), grads, strict=False)}


class Adapter(CollectorAdapter):
    name = "mutant:units_confused"
    families = ("causal_lm",)
    architectures = LM_ARCHITECTURES
    collector_class = TokenUnitCollector
