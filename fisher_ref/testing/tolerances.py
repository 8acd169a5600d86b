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
