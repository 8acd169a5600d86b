"""Seeded label draws for ``mc_fisher`` (docs/architecture.md, followed to the letter).

Row r with sample id s gets its own CPU generator, so the draws do not depend on batch
composition, chunking or split:

``row_seed = (seed * 1_000_003 + zlib.crc32(str(s).encode())) % 2**63``,
``u = torch.rand((T, n_samples), dtype=float64, generator=Generator("cpu").manual_seed(row_seed))``

with T the aligned target length of the call. Draw k at position t is the smallest class c
with ``cumsum(softmax(logits[t].double()))[c] > u[t, k]``, clamped to C − 1.
"""

from __future__ import annotations

import zlib

import torch


def row_seed(seed: int, sample_id) -> int:
    return (seed * 1_000_003 + zlib.crc32(str(sample_id).encode())) % 2**63


def row_uniforms(seed: int, sample_ids: list, T: int, n_samples: int) -> torch.Tensor:
    """``[len(sample_ids), T, n_samples]`` float64 uniforms, one generator per row."""
    out = torch.empty((len(sample_ids), T, n_samples), dtype=torch.float64)
    for i, s in enumerate(sample_ids):  # one generator per row, by definition
        g = torch.Generator("cpu").manual_seed(row_seed(seed, s))
        out[i] = torch.rand((T, n_samples), dtype=torch.float64, generator=g)
    return out


def draw_labels(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: ``logits [..., C]``, ``u [...]`` -> LongTensor ``[...]`` (on CPU)."""
    cdf = torch.softmax(logits.detach().to("cpu", torch.float64), dim=-1).cumsum(dim=-1)
    c = torch.searchsorted(cdf, u.to(torch.float64).unsqueeze(-1), right=True).squeeze(-1)
    return c.clamp(max=logits.shape[-1] - 1)


def draw_label_sets(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Several draws per position at once: ``logits [..., C]``, ``u [..., K]`` -> LongTensor
    ``[..., K]`` (on CPU); element for element the same draws as ``draw_labels`` (one
    softmax and cumsum per position, shared by its K draws)."""
    cdf = torch.softmax(logits.detach().to("cpu", torch.float64), dim=-1).cumsum(dim=-1)
    c = torch.searchsorted(cdf, u.to(torch.float64).contiguous(), right=True)
    return c.clamp(max=logits.shape[-1] - 1)
