"""fisher_ref: the float64 oracle of fishercheck (SPEC §0–9).

Plain autograd, one unit at a time, float64 on the CPU. Every quantity here is the
definition that ``fisher_fast`` must reproduce. See docs/definitions.md.
"""

from fisher_ref.gradient_moments import (
    batch_squared_gradient,
    batch_squared_gradient_of,
    empirical_fisher,
    empirical_fisher_of,
    gradient_variance,
    gradient_variance_of,
    mean_gradient,
    mean_gradient_of,
    squared_mean_gradient,
    squared_mean_gradient_of,
)
from fisher_ref.groups import group_fisher, group_fisher_of, group_ids, reduce_groups
from fisher_ref.impact import (
    estimator_impact,
    kendall,
    pruning_mask_jaccard,
    spearman,
    topk_jaccard,
)
from fisher_ref.losses import (
    CausalLMLoss,
    ClassifierLoss,
    MaskedLMLoss,
    SequenceClassificationLoss,
    causal_lm_loss,
    classifier_loss,
    masked_lm_loss,
    sequence_classification_loss,
)
from fisher_ref.mc_fisher import exact_fisher, mc_fisher
from fisher_ref.results import FisherResult, PerUnit
from fisher_ref.units import per_sample_gradients
from fisher_ref.welford import WelfordState, two_pass_moments

__all__ = [
    "CausalLMLoss", "ClassifierLoss", "FisherResult", "MaskedLMLoss", "PerUnit",
    "SequenceClassificationLoss", "WelfordState", "batch_squared_gradient",
    "batch_squared_gradient_of", "causal_lm_loss", "classifier_loss", "empirical_fisher",
    "empirical_fisher_of", "estimator_impact", "exact_fisher",
    "gradient_variance", "gradient_variance_of", "group_fisher", "group_fisher_of", "group_ids",
    "kendall", "masked_lm_loss", "mc_fisher", "mean_gradient", "mean_gradient_of",
    "per_sample_gradients", "pruning_mask_jaccard", "reduce_groups", "sequence_classification_loss",
    "spearman", "squared_mean_gradient", "squared_mean_gradient_of", "topk_jaccard",
    "two_pass_moments",
]

# attention half (SPEC §4–7)
from fisher_ref.conflicts import ConflictResult, conflicts, conflicts_from_gradients  # noqa: E402
from fisher_ref.contributions import contributions_from_gradients, per_sample_contributions  # noqa: E402
from fisher_ref.fdr import bh_qvalues, by_qvalues  # noqa: E402
from fisher_ref.interference import (  # noqa: E402
    InterferenceResult,
    interference,
    interference_from_gradients,
)
from fisher_ref.layouts import AttentionLayout, LayerAttention, attention_layout  # noqa: E402
from fisher_ref.semantic_check import (  # noqa: E402
    SemanticReport,
    SliceCheck,
    check_layout,
    check_masks,
    validate_layout,
)
from fisher_ref.slicing import head_group_ids, qkov_mask  # noqa: E402

__all__ += [
    "AttentionLayout", "ConflictResult", "InterferenceResult", "LayerAttention", "SemanticReport",
    "SliceCheck", "attention_layout", "bh_qvalues", "by_qvalues", "check_layout", "check_masks",
    "conflicts", "conflicts_from_gradients", "contributions_from_gradients", "head_group_ids",
    "interference", "interference_from_gradients", "per_sample_contributions", "qkov_mask",
    "validate_layout",
]
