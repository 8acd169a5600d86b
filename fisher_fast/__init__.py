"""fisher_fast: batched, streaming diagonal Fisher estimators equal to the fisher_ref oracle.

See docs/fisher_fast.md. Never imports fisher_ref.
"""

from . import distributed  # noqa: F401 - fisher_fast.distributed: data parallel (docs/distributed.md)
from .accumulator import FisherAccumulator
from .capture.plan import capture_plan
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
from .results import FisherResult, PerUnit

__all__ = [
    "CausalLMLoss", "ClassifierLoss", "FisherAccumulator", "FisherResult", "MaskedLMLoss",
    "PerUnit", "SequenceClassificationLoss", "batch_squared_gradient", "capture_plan",
    "causal_lm_loss", "classifier_loss",
    "empirical_fisher", "exact_fisher", "gradient_variance", "group_fisher", "masked_lm_loss",
    "iter_unit_gradients", "mc_fisher", "mean_gradient", "per_sample_gradients",
    "sequence_classification_loss", "squared_mean_gradient",
]

# --- attention half (layouts, slicing, contributions, interference, conflicts, fdr) -------
from .attention.layouts import AttentionLayout, LayerAttention, attention_layout  # noqa: E402
from .attention.slicing import head_group_ids, qkov_mask  # noqa: E402
from .conflicts import ConflictResult, conflicts  # noqa: E402
from .contributions import per_sample_contributions  # noqa: E402
from .cross_task import CrossTaskResult, cross_task  # noqa: E402
from .fdr import bh_qvalues, by_qvalues  # noqa: E402
from .interference import InterferenceResult, interference  # noqa: E402
from .store.contribution_store import ContributionStore  # noqa: E402

__all__ += [
    "AttentionLayout", "ConflictResult", "ContributionStore", "CrossTaskResult",
    "InterferenceResult", "LayerAttention", "attention_layout", "bh_qvalues", "by_qvalues",
    "conflicts", "cross_task",
    "head_group_ids", "interference", "per_sample_contributions", "qkov_mask",
]
# --- end attention half ---------------------------------------------------------------------
