"""fisher_ref: the float64 oracle of fishercheck (SPEC §0–9).

Plain autograd, one unit at a time, float64 on the CPU. Every quantity here is the
definition that ``fisher_fast`` must reproduce. See docs/definitions.md.
"""

from fisher_ref.gradient_moments import (
    batch_squared_gradient, batch_squared_gradient_of, empirical_fisher, empirical_fisher_of,
    gradient_variance, gradient_variance_of, mean_gradient, mean_gradient_of,
    squared_mean_gradient, squared_mean_gradient_of,
)
from fisher_ref.groups import group_fisher, group_fisher_of, group_ids, reduce_groups
from fisher_ref.impact import (
    estimator_impact, kendall, pruning_mask_jaccard, spearman, topk_jaccard,
)
from fisher_ref.losses import (
    CausalLMLoss, MaskedLMLoss, SequenceClassificationLoss, causal_lm_loss, masked_lm_loss,
    sequence_classification_loss,
)
from fisher_ref.mc_fisher import exact_fisher, mc_fisher
from fisher_ref.results import FisherResult, PerUnit
from fisher_ref.units import per_sample_gradients
from fisher_ref.welford import WelfordState, two_pass_moments

__all__ = [
    "CausalLMLoss", "FisherResult", "MaskedLMLoss", "PerUnit", "SequenceClassificationLoss",
    "WelfordState", "batch_squared_gradient", "batch_squared_gradient_of", "causal_lm_loss",
    "empirical_fisher", "empirical_fisher_of", "estimator_impact", "exact_fisher",
    "gradient_variance", "gradient_variance_of", "group_fisher", "group_fisher_of", "group_ids",
    "kendall", "masked_lm_loss", "mc_fisher", "mean_gradient", "mean_gradient_of",
    "per_sample_gradients", "pruning_mask_jaccard", "reduce_groups", "sequence_classification_loss",
    "spearman", "squared_mean_gradient", "squared_mean_gradient_of", "topk_jaccard",
    "two_pass_moments",
]

# ---------------------------------------------------------------------------------------
# attention half (SPEC §4–7): the lead adds the exports of fisher_ref.slicing,
# contributions, interference and conflicts here, and extends __all__:
#   attention_layout, qkov_mask, per_sample_contributions, interference, conflicts,
#   bh_qvalues, by_qvalues
# ---------------------------------------------------------------------------------------
