"""Defect: the collector silently keeps only the first 8 samples it sees (a buffer sized
for a debugging run). Invisible on the tiny cases (at most 4 rows); the scale profile's
16-24 rows catch it.
"""

from .collector import CollectorAdapter, FisherCollector

DEFECT = "keeps only the first 8 samples"
FAILS = {"empirical_fisher_agreement"}
PROFILE = "scale"
DIAGNOSIS = "the first 8 units"
MAX_SAMPLES = 8


class FirstSamplesCollector(FisherCollector):
    def update(self, batch):
        for sid, grads in self.sample_gradients(batch):
            if self.count >= MAX_SAMPLES:
                return
            self.accumulate(grads)
            self.store_contribution(sid, grads)
            self.count += 1


class Adapter(CollectorAdapter):
    name = "mutant:first_8_samples"
    collector_class = FirstSamplesCollector
    families = ("classifier",)
    architectures = ("mlp", "ln_gelu")
