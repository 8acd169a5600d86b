"""The mutant zoo: conformance adapters that each reproduce one classic defect.

Every module defines ``Adapter`` (a subclass of ``collector.CollectorAdapter``, a correct
collector), ``DEFECT`` (the defect in words) and ``FAILS`` (the named properties of which at
least one must fail).
"""

MUTANTS = (
    "sum_then_square", "square_per_microbatch", "token_count_division", "ema_bias_corrected",
    "batch_contribution", "grouped_contributions", "gpt2_o_columns", "fused_gqa_v_offset",
    "head_dim_from_hidden", "units_confused", "hf_batch_mean_loss", "tied_squared_per_use",
    "float16_accumulation", "permutation_unchanged", "wrong_bh", "p_zero",
    "ids_split_underscore", "interference_signed",
)
