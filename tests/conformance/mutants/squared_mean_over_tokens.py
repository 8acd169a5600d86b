"""Defect: "the Fisher" returned as the squared mean gradient divided by the token count,
(E[g])^2 / T: two defects at once. On one row (E[g])^2 = E[g^2], so a counterexample shrunk
to one row shows only the / T; distinct_rows_agreement keeps two rows, and the diagnosis
names both.
"""

from .collector import CollectorAdapter, FisherCollector, active_label_counts

DEFECT = "(E[g])^2 / n_tokens as F"
FAILS = {"distinct_rows_agreement", "empirical_fisher_agreement"}
DIAGNOSIS = "squared_mean_gradient / n_tokens"


class SquaredMeanCollector(FisherCollector):
    def update(self, batch):
        super().update(batch)
        self.tokens = getattr(self, "tokens", 0) + int(active_label_counts(batch).sum())

    def fisher(self):
        return {n: v / self.tokens for n, v in self.squared_mean().items()}


class Adapter(CollectorAdapter):
    name = "mutant:squared_mean_over_tokens"
    collector_class = SquaredMeanCollector
    families = ("causal_lm",)
    architectures = ("gpt2", "llama", "mistral", "qwen2", "phi3", "gpt_neox")
