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
