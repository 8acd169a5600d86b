"""Defect: normalise the averaged squared gradient by the number of tokens as well, "so that
long documents do not dominate"; duplicating the data halves F.
"""

from .collector import CollectorAdapter, FisherCollector, active_label_counts

DEFECT = "divide by token count"
FAILS = {"duplication_invariance", "empirical_fisher_agreement"}


class PerTokenCollector(FisherCollector):
    def update(self, batch):
        super().update(batch)
        self.tokens = getattr(self, "tokens", 0) + int(active_label_counts(batch).sum())

    def fisher(self):
        return {n: s / self.count / self.tokens for n, s in self.sum_sq.items()}


class Adapter(CollectorAdapter):
    name = "mutant:token_count_division"
    collector_class = PerTokenCollector
