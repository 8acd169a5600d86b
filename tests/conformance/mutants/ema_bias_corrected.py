"""Defect: an exponential moving average of per-batch Fisher estimates, initialised to the
first batch's value and then bias-corrected as if it had started at zero (Adam style).
"""

from .collector import CollectorAdapter, FisherCollector

DEFECT = "EMA initialised to x then bias-corrected"
FAILS = {"empirical_fisher_agreement", "micro_batch_invariance", "split_invariance"}
BETA = 0.9


class EmaCollector(FisherCollector):
    """E[g²] as an EMA of per-batch means (the defect); E[g], contributions stay right."""

    def update(self, batch):
        sq = {n: 0 * p for n, p in self.sum_sq.items()}
        n_rows = 0
        for sid, grads in self.sample_gradients(batch):
            self.store_contribution(sid, grads)
            for n, g in grads.items():
                sq[n] = sq[n] + g * g
                self.sum_g[n] += g
            n_rows += 1
        if n_rows == 0:
            return
        self.count += n_rows
        self.steps = getattr(self, "steps", 0) + 1
        for n in sq:
            x = sq[n] / n_rows
            self.sum_sq[n] = x if self.steps == 1 else BETA * self.sum_sq[n] + (1 - BETA) * x

    def fisher(self):
        return {n: s / (1 - BETA ** self.steps) for n, s in self.sum_sq.items()}


class Adapter(CollectorAdapter):
    name = "mutant:ema_bias_corrected"
    collector_class = EmaCollector
