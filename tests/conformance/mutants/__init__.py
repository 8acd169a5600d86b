"""The mutant zoo: conformance adapters that each reproduce one classic defect.

Every module defines ``Adapter`` (a subclass of ``collector.CollectorAdapter``, a correct
collector), ``DEFECT`` (the defect in words) and ``FAILS`` (the named properties of which at
least one must fail); a mutant of a blind spot of the first edition also defines
``DIAGNOSIS``, text its failure's diagnosis line must contain, and ``PROFILE`` when only
the ``scale`` profile can catch it.
"""

MUTANTS = (
    "sum_then_square", "square_per_microbatch", "token_count_division", "ema_bias_corrected",
    "batch_contribution", "grouped_contributions", "gpt2_o_columns", "fused_gqa_v_offset",
    "head_dim_from_hidden", "units_confused", "hf_batch_mean_loss", "tied_squared_per_use",
    "float16_accumulation", "permutation_unchanged", "wrong_bh", "p_zero",
    "ids_split_underscore", "interference_signed",
    # one per blind spot of the first edition (#10)
    "pvalue_wrong_tail", "pvalue_two_sided", "squared_mean_over_tokens", "ridge_1e8",
    "float16_contributions", "first_8_samples", "layer_substring", "signed_ignored",
    "neox_blocks", "group_fisher_last_batch", "ignores_loss_fn", "classifier_batch_mean_loss",
    "argmax_labels",
)
