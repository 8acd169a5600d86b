"""The loop over chunks: forward, check, backward with capture, hand the sink over.

``run_chunks`` never loops over samples: each chunk of units is one batched forward and one
backward of ``losses.sum()``. TF32 is switched off for the run (``allow_tf32=True`` keeps
the global setting) and restored afterwards.
"""

from __future__ import annotations

import contextlib

import torch

from .capture import Capture
from .chunking import default_budget, rows_per_chunk, slice_bytes
from .unit_losses import chunk_losses, chunk_rows


def model_device(model) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("model: expected at least one parameter, got none.")
    return p.device


def check_dtype(dtype) -> torch.dtype:
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}.")
    return dtype


@contextlib.contextmanager
def tf32(allow: bool):
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if not allow:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _check_losses(losses: torch.Tensor, units, n: int) -> None:
    if losses.dim() != 1 or losses.shape[0] != n:
        raise ValueError(f"loss_fn: expected one loss per row, shape ({n},), got "
                         f"{tuple(losses.shape)}.")
    bad = ~torch.isfinite(losses.detach())
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0])
        value = float(losses[j].detach())
        raise ValueError(f"non-finite loss: expected finite losses, got {value} for unit "
                         f"{units.ids[j]!r}.")


def run_chunks(model, plan, loss, tensors, units, *, dtype, chunk_size=None, memory_budget=None,
               uniforms=None, new_sink, allow_tf32=False):
    """For each chunk of ``units``: ``sink = new_sink(start, n)``, forward, backward into the
    sink, then ``yield (start, chunk_units, sink)``."""
    device = model_device(model)
    budget = default_budget(device) if memory_budget is None else int(memory_budget)
    U = len(units)
    if chunk_size is None:
        chunk_size = rows_per_chunk(model, tensors, budget, U)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}.")
    with tf32(allow_tf32):
        for start in range(0, U, chunk_size):
            part = units.take(start, min(start + chunk_size, U))
            n = len(part)
            sink = new_sink(start, n)
            sub = chunk_rows(tensors, part.rows, device)
            with Capture(plan, n, dtype, sink, slice_bytes(budget)) as cap:
                losses, weights = chunk_losses(model, loss, sub, part, uniforms)
                _check_losses(losses, part, n)
                sink.begin(weights.to(device=device, dtype=dtype))
                cap.backward(losses)
            yield start, part, sink
