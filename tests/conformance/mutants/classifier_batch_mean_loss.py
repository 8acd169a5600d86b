"""Defect (EWC-style code): per-sample gradients taken of each sample's term of the
batch-mean loss, l_i / B, so F comes out divided by B^2 (and S likewise).
"""

from .collector import CollectorAdapter, FisherCollector, active_label_counts

DEFECT = "per-sample gradients of the batch-mean loss's terms (F / B^2)"
FAILS = {"empirical_fisher_agreement"}
DIAGNOSIS = "empirical_fisher / n_units²"


class BatchMeanCollector(FisherCollector):
    def sample_gradients(self, batch):
        n = int((active_label_counts(batch) > 0).sum())
        for sid, grads in super().sample_gradients(batch):
            yield sid, {k: g / n for k, g in grads.items()}


class Adapter(CollectorAdapter):
    name = "mutant:classifier_batch_mean_loss"
    collector_class = BatchMeanCollector
    families = ("classifier",)
    architectures = ("mlp", "cnn", "ln_gelu")
