"""fisher_fast: batched, streaming diagonal Fisher estimators equal to the fisher_ref oracle.

One public module per quantity (docs/fisher_fast.md, "Files"); how they are computed lives
in the subpackages ``run``, ``capture``, ``stats``, ``batching``, ``attention`` and ``store``
(docs/architecture.md, "fisher_fast's layers"). ``fisher_fast.distributed`` runs them data
parallel (docs/distributed.md). Never imports fisher_ref.
"""

from . import distributed
from .accumulator import FisherAccumulator
from .attention.layouts import AttentionLayout, LayerAttention, attention_layout
from .attention.slicing import head_group_ids, qkov_mask
from .capture.plan import capture_plan
from .conflicts import ConflictResult, conflicts
from .contributions import per_sample_contributions
from .cross_task import CrossTaskResult, cross_task
from .estimators import (
    batch_squared_gradient,
    empirical_fisher,
    exact_fisher,
    gradient_variance,
    group_fisher,
    mc_fisher,
    mean_gradient,
    squared_mean_gradient,
)
from .fdr import bh_qvalues, by_qvalues
from .interference import InterferenceResult, interference
from .losses import (
    CausalLMLoss,
    ClassifierLoss,
    MaskedLMLoss,
    SequenceClassificationLoss,
    causal_lm_loss,
    classifier_loss,
    masked_lm_loss,
    sequence_classification_loss,
)
from .per_sample import iter_unit_gradients, per_sample_gradients
from .progress import show_progress
from .results import FisherResult, PerUnit
from .store.contribution_store import ContributionStore

__all__ = [
    # estimators (SPEC §1–3, §8, §10) and their results
    "FisherAccumulator", "FisherResult", "PerUnit", "batch_squared_gradient", "capture_plan",
    "empirical_fisher", "exact_fisher", "gradient_variance", "group_fisher",
    "iter_unit_gradients", "mc_fisher", "mean_gradient", "per_sample_gradients",
    "squared_mean_gradient",
    # losses
    "CausalLMLoss", "ClassifierLoss", "MaskedLMLoss", "SequenceClassificationLoss",
    "causal_lm_loss", "classifier_loss", "masked_lm_loss", "sequence_classification_loss",
    # attention half (SPEC §4–7)
    "AttentionLayout", "ConflictResult", "ContributionStore", "CrossTaskResult",
    "InterferenceResult", "LayerAttention", "attention_layout", "bh_qvalues", "by_qvalues",
    "conflicts", "cross_task", "head_group_ids", "interference", "per_sample_contributions",
    "qkov_mask",
    # data parallel, progress bars
    "distributed", "show_progress",
]
