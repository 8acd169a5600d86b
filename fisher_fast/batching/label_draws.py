"""Seeded label draws for ``mc_fisher`` (docs/architecture.md, followed to the letter).

Row r with sample id s gets its own CPU generator, so the draws do not depend on batch
composition, chunking or split:

``row_seed = (seed * 1_000_003 + zlib.crc32(str(s).encode())) % 2**63``,
``u = torch.rand((T, n_samples), dtype=float64, generator=Generator("cpu").manual_seed(row_seed))``

with T the aligned target length of the call. Draw k at position t is the smallest class c
with ``cumsum(softmax(logits[t].double()))[c] > u[t, k]``, clamped to C − 1.

The uniforms are generated on the CPU (they are small: ``[T, n_samples]`` per row) and moved
to the logits' device; the float64 softmax, its cumsum and the ``searchsorted`` run there,
at the active positions only, a slice of positions at a time (``slice_bytes`` bounds one
float64 ``[positions, C]`` slice), so the logits never leave the device and no float64
``[rows, T, C]`` tensor is formed. On the CPU the kernels are the oracle's, so the draws are
bit-identical; on a GPU the float64 cdf can differ from the CPU's by rounding only, so a
draw can differ only when its u lies within that rounding distance of a cdf boundary.
"""

from __future__ import annotations

import zlib

import torch

# one float64 [positions, C] slice of the cdf at most (the softmax and its cumsum: two alive)
SLICE_BYTES = 1 << 27


def row_seed(seed: int, sample_id: object) -> int:
    """The seed of one row's generator (docs/architecture.md, ``mc_fisher``)."""
    return (seed * 1_000_003 + zlib.crc32(str(sample_id).encode())) % 2**63


def row_uniforms(seed: int, sample_ids: list, T: int, n_samples: int) -> torch.Tensor:
    """``[len(sample_ids), T, n_samples]`` float64 uniforms on the CPU, one generator per row."""
    out = torch.empty((len(sample_ids), T, n_samples), dtype=torch.float64)
    for i, s in enumerate(sample_ids):  # one generator per row, by definition
        g = torch.Generator("cpu").manual_seed(row_seed(seed, s))
        out[i] = torch.rand((T, n_samples), dtype=torch.float64, generator=g)
    return out


def draw_label_sets(logits: torch.Tensor, u: torch.Tensor, active: torch.Tensor | None = None,
                    *, fill: int = 0, slice_bytes: int = SLICE_BYTES) -> torch.Tensor:
    """Several inverse-CDF draws per position: ``logits [..., C]``, ``u [..., K]`` (any
    device; moved to the logits'), ``active [...]`` (bool, default all) -> LongTensor
    ``[..., K]`` on the logits' device, ``fill`` at inactive positions.

    At each active position: ``cdf = cumsum(softmax(logits.double()))`` once for its K draws,
    draw k = the smallest c with ``cdf[c] > u[k]`` (``searchsorted(right=True)``), clamped
    to C − 1. Positions are processed ``slice_bytes // (8 C)`` at a time; the result does
    not depend on the slicing, on the logits' dtype being float32 or float64 (the upcast is
    exact) or on which other positions are present (softmax and cumsum are per position).
    """
    z = logits.detach()
    C, K = z.shape[-1], u.shape[-1]
    lead = tuple(z.shape[:-1])
    if tuple(u.shape[:-1]) != lead:
        raise ValueError(f"u: expected shape {lead + (K,)}, got {tuple(u.shape)}.")
    u = u.to(device=z.device, dtype=torch.float64)
    out = torch.full(lead + (K,), fill, dtype=torch.long, device=z.device)
    if active is None:
        where = None
        P = 1
        for d in lead:
            P *= d
        z2, u2, out2 = z.reshape(-1, C), u.reshape(-1, K), out.view(-1, K)
    else:
        where = torch.nonzero(active.to(z.device).reshape(lead), as_tuple=True)  # one sync
        P = int(where[0].numel())
    step = max(1, int(slice_bytes) // (8 * C))
    for s in range(0, P, step):
        if where is None:
            zs, us = z2[s:s + step], u2[s:s + step]
        else:
            at = tuple(i[s:s + step] for i in where)
            zs, us = z[at], u[at]
        cdf = torch.softmax(zs.to(torch.float64), dim=-1).cumsum(dim=-1)  # [S, C] float64
        c = torch.searchsorted(cdf, us.contiguous(), right=True).clamp_(max=C - 1)
        del cdf
        if where is None:
            out2[s:s + step] = c
        else:
            out[at] = c
    return out


def draw_labels(logits: torch.Tensor, u: torch.Tensor, active: torch.Tensor | None = None,
                *, fill: int = 0, slice_bytes: int = SLICE_BYTES) -> torch.Tensor:
    """One draw per position: ``logits [..., C]``, ``u [...]`` -> LongTensor ``[...]`` on
    the logits' device (``draw_label_sets`` with K = 1).
    """
    return draw_label_sets(logits, u.unsqueeze(-1), active, fill=fill,
                           slice_bytes=slice_bytes).squeeze(-1)
