"""Every tolerance the suites use, in one table, each with its reason.

Keys are (what is compared, dtype of the faster path). Look a tolerance up with
``tolerance(kind, dtype)``; never write one inline.
"""

from __future__ import annotations

import torch

# (rtol, atol, reason)
TOLERANCES: dict[tuple[str, torch.dtype], tuple[float, float, str]] = {
    ("float64-paths", torch.float64): (
        1e-9, 1e-14,
        "two float64 computations of the same sum in different orders (batched vs per unit): "
        "error ~ n_terms * 2^-52 relative, far below 1e-9 for the sizes tested",
    ),
    ("float64-float32-norm", torch.float64): (
        1e-5, 1e-13,
        "float64 models whose RMS norms upcast to float32 anyway (HF LlamaRMSNorm and kin): "
        "CPU float32 rsqrt rounds differently in vectorised and tail lanes, so a row's "
        "activations can move by one float32 ulp (6e-8) with the rows that share its forward "
        "(chunking, splits, token expansion). Through <= 2 layers and squaring that stays "
        "< 1e-6 relative; 1e-5 keeps a 10x margin, while an indexing error is O(1)",
    ),
    ("welford", torch.float64): (
        1e-12, 1e-15,
        "Chan's merge is exact in exact arithmetic; float64 rounding over < 1e4 updates",
    ),
    ("float32-fisher", torch.float32): (
        2e-4, 1e-7,
        "float32 forward/backward (eps 1.2e-7) through a few layers, squared and averaged: "
        "per-element relative error grows ~ depth * sqrt(n) * eps; 2e-4 leaves a 100x margin "
        "on tiny models, and the atol covers entries that are exactly zero in float64",
    ),
    ("float32-fisher", torch.bfloat16): (
        5e-2, 1e-4,
        "bf16 model weights and activations (eps 7.8e-3); statistics accumulate in float32",
    ),
    ("bf16-autocast", torch.bfloat16): (
        5e-2, 0.0,
        "norm-relative error, over all parameters, of fisher_fast's bf16 fast path "
        "(autocast=torch.bfloat16: the forward's matmuls in bf16, eps 3.9e-3) against its "
        "float32 path on 2-layer tiny models: measured 0.005-0.014 (GPT-2, LLaMA, BERT, NeoX, "
        "3 seeds each); 5e-2 is > 3x the worst, while a wrong gradient is O(1) off",
    ),
    ("mc-fisher-vs-exact", torch.float64): (
        0.15, 0.0,
        "norm-relative error of mc_fisher (300 seeded draws, 4 near-uniform softmax-regression "
        "units, 3 classes) against exact_fisher: Monte-Carlo error ~ CV / sqrt(n * U), measured "
        "0.02-0.05 over 8 seeds; 0.15 is > 3x the worst. Deterministic for a fixed seed",
    ),
    ("mc-fisher-vs-exact-heavy", torch.float64): (
        0.05, 0.0,
        "norm-relative error of mc_fisher with 4000 draws on a tiny GPT-2 (token units) against "
        "exact_fisher: Monte-Carlo error ~ CV / sqrt(n * U), about 0.01 expected",
    ),
    ("float32-squares-scaled", torch.float32): (
        2e-4, 1e-9,
        "float32 sums of squares (F, group Fisher, contributions, the true Fisher) against the "
        "float64 oracle, the atol a fraction of each tensor's largest value (compare_dicts' "
        "atol_scale): squares carry the relative error of their own gradient, so the rtol of "
        "float32-fisher covers them; measured excess over it <= 1e-16 x max (fisher_fast, "
        "every architecture, 2 layers). 1e-9 x max still catches a 1e-8 ridge on tensors "
        "whose entries stay below 10, and float16 flushing (errors of 6e-8), which an absolute "
        "1e-7 would hide",
    ),
    ("float32-signed-scaled", torch.float32): (
        2e-4, 1e-7,
        "as float32-squares-scaled for (E[g])^2, whose mean gradient cancels across units: an "
        "entry near zero keeps an absolute error ~ eps * max |g|, squared; measured excess over "
        "the rtol <= 1.7e-9 x max (Phi-3, Qwen2); 1e-7 x max is a 60x margin",
    ),
    ("mc-fisher-conformance", torch.float64): (
        30.0, 0.0,
        "bound on R = |F_MC - F_exact|^2 / E|F_MC - F_exact|^2 for 1000 independent draws "
        "per unit from the model (the expectation from the oracle's per-class gradients): "
        "simulated over 29k replicates of 96 classifiers (4 units, 2-5 classes) R <= 13.2; "
        "the argmax label instead of a draw has R >= 68 (its bias does not shrink with n). "
        "Not a rounding tolerance: the first entry is the bound on R",
    ),
    ("signed-interference-terms", torch.float64): (
        0.0, 1e-12,
        "signed interference sums terms C_i / F_hat * g_j of either sign: rounding scales with "
        "the sum of |terms|, i.e. the abs-mode M of the same entry, not with the (cancelled) "
        "result; two float64 orders of < 100 terms differ by ~1e-14 of it, 1e-12 is 100x",
    ),
    ("signed-interference-terms", torch.float32): (
        0.0, 1e-5,
        "as the float64 row for a float32 implementation: float32 gradients (eps 1.2e-7) "
        "through a layer, squared and divided, summed over < 100 slice entries: ~1e-6 of the "
        "abs-mode M; 1e-5 keeps a 10x margin, while a wrong phi or F_hat is O(1) of it",
    ),
    ("pvalue-tie", torch.float32): (
        0.0, 0.1,
        "a float32 implementation's mean cosines of a group whose unit gradients are nearly "
        "parallel move with float32 rounding far more than the gradients do (measured: a Qwen2 "
        "K slice, observed 0.206 in float64, 0.132 in float32): permuted statistics within 0.1 "
        "of the observed one may fall on either side of it. Exact agreement is a float64 check; "
        "pvalues_direction checks the tail of a float32 implementation with any stream",
    ),
    ("pvalue-tie", torch.float64): (
        0.0, 1e-9,
        "a permuted mean cosine within 1e-9 of the observed one may be counted on either side "
        "of it by another summation order (ties: a permutation that reproduces the split, "
        "identical rows); distinct pair sets of float64 cosines differ by far more",
    ),
    ("semantic-check", torch.float64): (
        0.0, 1e-10,
        "an entry outside the slice must leave other heads unchanged up to float64 rounding",
    ),
    ("row-independence", torch.float64): (
        1e-4, 1e-7,
        "fisher_ref's guard that a row's loss in the batched forward equals the row run alone: "
        "the same float64 computation at another batch size differs by BLAS blocking (~1e-16) "
        "and, where HF upcasts to float32 (LLaMA-like RMSNorm, eager softmax), by float32 ulp "
        "flips that deep models amplify (1e-7..1e-5 relative on a token's NLL); dropout or "
        "batch statistics move a loss by 1e-2 or more. A guard, not a measurement",
    ),
    ("float64-ulps", torch.float64): (
        1e-15, 0.0,
        "one float64 value reached by two formulas with a handful of roundings each (a hand-worked "
        "constant such as 0.16 / 3 or 2 ** -0.5, the same q-values recomputed, a sum of <= 12 "
        "squares regrouped): each rounding is <= 2^-53 relative and they partly cancel, so the "
        "results differ by a few ulps; 1e-15 admits ~4. No atol: the values are positive or "
        "exactly zero in both",
    ),
    ("fdr-float64", torch.float64): (
        1e-14, 0.0,
        "step-up q-values (BH/BY) computed by two algorithms, ours and statsmodels' multipletests "
        "or fisher_fast's and fisher_ref's: each q is m p / rank (times BY's harmonic sum, added "
        "in another order) and a running minimum, about 5 roundings, so a few ulps apart; 1e-14 "
        "is ~45 ulps. No atol: q >= p > 0 on every input tested",
    ),
    ("fdr-any-implementation", torch.float64): (
        1e-12, 1e-15,
        "conformance check of an adapter's q-values against statsmodels: any correct step-up "
        "implementation (its own sort, cumulative minimum and BY factor) must pass, so the "
        "relative tolerance allows 100x the few-ulps spread of two implementations; the atol "
        "covers q-values of p drawn as small as 1e-8, where ulp differences are ~1e-24",
    ),
    ("float64-reorder", torch.float64): (
        1e-12, 0.0,
        "two float64 computations of the same small sum in different orders: total weights, "
        "weighted means, sums of squares, and the cosine statistics (mean cosine, null mean, "
        "z-score, tie detection) of one gradient slice taken two ways, whose dot products are "
        "summed in another order: error ~ n_terms * 2^-52, ~1e-14 for the < 100 terms tested; "
        "1e-12 leaves a 100x margin. No atol: the values compared are positive, exactly zero in "
        "both, or seeded cosine statistics no smaller than ~4e-3, where an absolute rounding "
        "error of ~1e-16 is still < 1e-13 relative",
    ),
    ("float64-reorder-signed", torch.float64): (
        1e-12, 1e-12,
        "as float64-reorder, for sums of signed terms (masked sums of N(0, 1) values): such a sum "
        "can cancel to near zero, where relative error is meaningless, so an atol of 1e-12 covers "
        "n_terms * 2^-52 * max |term| for the few dozen O(1) terms summed",
    ),
    ("float64-cast-placement", torch.float64): (
        1e-13, 0.0,
        "one float64 computation from identical float32-representable inputs, with the upcast "
        "done by the caller or inside the function: only the order of a few float64 sums can "
        "differ (~1e-15); 1e-13 leaves a 100x margin, while computing in float32 would be off "
        "by ~1e-7",
    ),
    ("ghost-norm", torch.float64): (
        1e-12, 1e-15,
        "per-row squared gradient norms (or group sums of them) by the Gram identity "
        "sum_t,t' (dy_t . dy_t') (x_t . x_t') against materialised per-row gradients squared: "
        "the Gram sum has signed cross terms over <= 25 token pairs, error ~ T^2 * 2^-52 times "
        "sum |terms|, which is the size of the positive result for random data, so ~1e-14 "
        "relative; 1e-12 leaves a 100x margin and the atol covers entries that are ~0",
    ),
    ("welford-m2", torch.float64): (
        1e-10, 0.0,
        "M2 of columns with mean 50-100 and sd ~1 (cancellation bait) by merged Welford/Chan "
        "states or shifted sums against a two-pass sum of squared deviations: the one-pass forms "
        "lose ~ (mean / sd)^2 * 2^-52 ~ 1e-12 relative; 1e-10 leaves a 100x margin, while a "
        "naive E[x^2] - mean^2 would be off by ~1e-8. No atol: M2 > 0 or exactly 0",
    ),
    ("variance-by-subtraction", torch.float64): (
        1e-10, 1e-12,
        "a variance compared with second moment minus squared mean (or Fisher minus squared mean "
        "gradient): the subtraction cancels, losing ~ (E[x^2] / Var x) * 2^-52 relative, and "
        "entries whose variance is ~0 keep an absolute error ~ 2^-52 * E[x^2], covered by the "
        "atol for the O(1) moments tested",
    ),
    ("float64-scalar", torch.float64): (
        1e-9, 0.0,
        "an O(1) scalar summary (permutation z-score, bootstrap percentile interval, top "
        "interference score against its hand value) from float64 statistics by two paths "
        "(vectorised vs a plain loop; a denominator regularised by eps = 1e-12): ~1e-12 "
        "relative after the cancellation in obs - mean(null); 1e-9 as in float64-paths. No "
        "atol: these scalars are far from zero in the tests that use this row",
    ),
    ("null-summary", torch.float64): (
        1e-9, 1e-12,
        "mean and sd of a permutation null and a bootstrap interval of cosines from two float64 "
        "paths: relative error as float64-paths, and an atol for an sd that is pure rounding "
        "noise (~1e-16) when every permutation gives the same cosine",
    ),
    ("permutation-effect", torch.float64): (
        1e-7, 0.0,
        "effect = (obs - null_mean) / null_sd, compared only where null_sd > 1e-9: cosine "
        "differences of ~1e-16 between two float64 paths are divided by an sd that small, so "
        "~1e-7 relative on the effect",
    ),
    ("semantic-check-bias", torch.float64): (
        0.0, 1e-6,
        "a key bias shifts each attention row by a constant, which softmax ignores, but the "
        "eager attention of LLaMA-like models and GPT-NeoX takes its softmax in float32 even in "
        "float64, so the pattern still moves by float32 rounding (~3e-8 measured); a query bias "
        "entry perturbed by noise of sd 0.5 moves it by > 1e-3 on the tiny models",
    ),
}


def tolerance(kind: str, dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """(rtol, atol) for ``kind`` at ``dtype``; a clear error for an unknown pair."""
    try:
        rtol, atol, _ = TOLERANCES[(kind, dtype)]
    except KeyError:
        known = sorted({k for k, _ in TOLERANCES})
        raise ValueError(
            f"No tolerance for ({kind!r}, {dtype}): expected one of {known} with a listed dtype."
        ) from None
    return rtol, atol
