"""The loop over chunks: forward, check, backward with capture, hand the sink over.

``run_chunks`` never loops over samples: each chunk of units is one batched forward and one
backward of ``losses.sum()``. TF32 is switched off for each chunk's own work
(``allow_tf32=True`` keeps the global setting) and restored before the chunk is handed
over. ``autocast=torch.bfloat16`` runs each chunk's forward under ``torch.autocast`` (the
bf16 fast path; the backward follows the forward's dtypes, per-row products and statistics
stay in the statistics dtype).
"""

from __future__ import annotations

import contextlib

import torch

from ..batching.chunk_sizes import default_budget, rows_per_chunk, rows_per_pass, slice_bytes
from ..batching.row_losses import chunk_losses, chunk_rows
from ..batching.units import draw_layout
from ..capture.hooks import Capture
from ..progress import unit_bar
from .options import Options


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (a model without any is an error)."""
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("model: expected at least one parameter, got none.")
    return p.device


def forward_context(device: torch.device, autocast):
    """A fresh context for one forward: ``torch.autocast`` with ``autocast`` (the bf16 fast
    path) or nothing.
    """
    return torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()


@contextlib.contextmanager
def tf32(allow: bool):
    """TF32 off for CUDA matmuls and convolutions inside (unless ``allow``), restored after."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if not allow:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _check_shape(losses: torch.Tensor, units, n: int) -> None:
    if not isinstance(losses, torch.Tensor):
        raise ValueError(f"loss_fn: expected a tensor of one loss per row, got "
                         f"{type(losses).__name__}.")
    if not losses.requires_grad:
        raise ValueError("loss_fn: expected losses that depend on the trainable parameters, "
                         "got a tensor without a graph (detached, computed under no_grad, or "
                         "no parameter requires grad).")
    shape = (n, units.n_draws) if units.n_draws else (n,)
    if tuple(losses.shape) != shape:
        raise ValueError(f"loss_fn: expected one loss per row, shape {shape}, got "
                         f"{tuple(losses.shape)}.")


def _check_finite(losses: torch.Tensor, bad: torch.Tensor, units, n: int) -> None:
    """Raise on a non-finite loss. Called after the backward, so that reading the flag (a
    host sync) does not stall the device between the forward and the backward; a failed
    chunk's statistics are discarded anyway.
    """
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0][0])
        value = float(losses.detach().reshape(n, -1)[j].min())
        raise ValueError(f"non-finite loss: expected finite losses, got {value} for unit "
                         f"{units.ids[j]!r}.")


def run_chunks(model: torch.nn.Module, plan, tensors: dict, units, opts: Options, *, new_sink,
               uniforms: torch.Tensor | None = None):
    """For each chunk of ``units``: ``sink = new_sink(start, n)``, forward, backward into the
    sink, then ``yield (start, chunk_units, sink)``.

    ``opts`` (checked by the public call) gives the loss, the statistics dtype, the chunk
    size or the memory budget it follows, TF32 and autocast. Label draws (mc_fisher,
    ``units.total_draws = K``) are laid out on forward rows once the chunk size is known
    (``units.draw_layout``); a row carrying q draws has its chunk's forward run once and the
    graph kept for q backward passes, one per draw, each delivering the rows' gradients
    under that draw to the same sink.
    """
    device = model_device(model)
    budget = default_budget(device) if opts.memory_budget is None else int(opts.memory_budget)
    U = len(units)
    chunk_size = opts.chunk_size or rows_per_chunk(model, tensors, budget,
                                                   U * max(units.total_draws, 1))
    if units.total_draws and units.draw is None:
        units = draw_layout(units, chunk_size, rows_per_pass(model, tensors))
        U = len(units)
    with unit_bar(U) as bar:  # drawn only under fisher_fast.show_progress()
        for start in range(0, U, chunk_size):
            part = units.take(start, min(start + chunk_size, U))
            sink = new_sink(start, len(part))
            with tf32(opts.allow_tf32):  # per chunk: the caller's setting holds between chunks
                _run_chunk(model, plan, tensors, part, sink, opts, device=device,
                           slice_limit=slice_bytes(budget), uniforms=uniforms)
            bar.update(len(part))
            yield start, part, sink


def _run_chunk(model, plan, tensors, part, sink, opts: Options, *, device, slice_limit,
               uniforms) -> None:
    """One chunk's forward and backward(s) into ``sink``; every hook and reference the
    capture took is released when this returns or raises.
    """
    n = len(part)
    sub = chunk_rows(tensors, part.rows, device)
    # host-to-device copy of the weights before the forward is queued: a pageable
    # copy waits for the stream, and would otherwise wait for the forward
    dtype = opts.dtype
    unit_weights = part.draw_weights().to(device=device, dtype=dtype)
    with Capture(plan, n, dtype, sink, slice_limit) as cap:
        with forward_context(device, opts.autocast):
            losses, weights = chunk_losses(model, opts.loss, sub, part, uniforms)
        _check_shape(losses, part, n)
        bad = ~torch.isfinite(losses.detach())
        weights = unit_weights if weights is part.weights else \
            weights.to(device=device, dtype=dtype)  # exact_fisher: w p_c
        columns = losses.unbind(1) if part.n_draws else (losses,)
        w_columns = weights.unbind(1) if part.n_draws else (weights,)
        for k, (column, w) in enumerate(zip(columns, w_columns, strict=True)):
            sink.begin(w)
            cap.backward(column, retain_graph=k + 1 < len(columns))
        _check_finite(losses, bad, part, n)
