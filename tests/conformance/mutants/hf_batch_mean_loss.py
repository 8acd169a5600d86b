"""Defect: per-sample gradients read off the HF batch-mean loss (sum of all token NLLs over
the batch's token count, counted from the attention mask, i.e. without the shift) and
rescaled by the batch size: row i gets weight B * K_i / sum_j T_j instead of 1.
"""

import torch

from .collector import LM_ARCHITECTURES, CollectorAdapter, FisherCollector, active_label_counts

DEFECT = "per-sample gradients from the HF batch-mean loss"
FAILS = {"empirical_fisher_agreement"}


class HFLossCollector(FisherCollector):
    def sample_gradients(self, batch):
        inputs = {k: v for k, v in batch.items() if k not in ("sample_ids", "labels")}
        logits = self.model(**inputs).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0),
                                                reduction="none") * (targets != -100)
        n_tokens = batch["attention_mask"].sum()  # T_i, not the T_i - 1 shifted labels
        B = len(batch["sample_ids"])
        keep = active_label_counts(batch) > 0
        for i, sid in enumerate(batch["sample_ids"]):
            if keep[i]:
                row = B * nll[i].sum() / n_tokens
                grads = torch.autograd.grad(row, list(self.params.values()), retain_graph=True,
                                            allow_unused=True)
                yield sid, {n: (torch.zeros_like(p) if g is None else g).double()
                            for (n, p), g in zip(self.params.items(), grads, strict=False)}


class Adapter(CollectorAdapter):
    name = "mutant:hf_batch_mean_loss"
    families = ("causal_lm",)
    architectures = LM_ARCHITECTURES
    collector_class = HFLossCollector
