"""Defect: the collector ignores the loss_fn it is given and takes the built-in loss of the
batch's own labels (as code calling ``model(**batch).loss`` does). Its Fisher agrees on the
default loss; the caller's other loss shows it.
"""

from fisher_ref.losses import CausalLMLoss, ClassifierLoss

from .collector import CollectorAdapter, FisherCollector

DEFECT = "the caller's loss_fn ignored"
FAILS = {"uses_callers_loss", "loss_scaling"}
DIAGNOSIS = "the caller's loss_fn is ignored"


class OwnLossCollector(FisherCollector):
    def __init__(self, model, loss_fn):
        own = CausalLMLoss("mean") if hasattr(model, "config") else ClassifierLoss("mean")
        super().__init__(model, own)


class Adapter(CollectorAdapter):
    name = "mutant:ignores_loss_fn"
    collector_class = OwnLossCollector
    row_reductions = ("mean",)
