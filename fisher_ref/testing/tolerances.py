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
