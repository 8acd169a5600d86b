"""The options every fisher_fast call shares, checked once and carried to the chunk loop.

A public call (an estimator, ``FisherAccumulator``, ``per_sample_gradients``, interference,
conflicts) turns its keyword arguments into one ``Options`` with ``Options.of``, which checks
every field and says what was expected; everything below it (the chunk loop, the capture)
reads the fields without checking them again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..batching.checks import resolve_loss

DTYPES = (torch.float32, torch.float64)
AUTOCAST = (None, torch.bfloat16)


@dataclass(frozen=True)
class Options:
    """How one call computes its per-unit gradients (docs/architecture.md, SPEC §1).

    Attributes:
        loss: the per-row loss ``loss(model, batch) -> Tensor[rows]`` (``causal_lm_loss``
            when the call was given none).
        unit: ``"sample"`` (one unit per non-empty row) or ``"token"`` (one per active
            target position).
        weighting: ``"sample"`` (w_u = 1) or ``"token"`` (w_u = K_i for sample units).
        dtype: the statistics dtype, ``torch.float32`` or ``torch.float64``.
        chunk_size: forward rows per chunk, or ``None`` (from ``memory_budget``).
        memory_budget: bytes, or ``None`` (a fraction of the free device memory).
        allow_tf32: let CUDA matmuls use TF32 (off by default).
        autocast: ``None`` or ``torch.bfloat16`` (each chunk's forward under autocast).
    """

    loss: Callable
    unit: str = "sample"
    weighting: str = "sample"
    dtype: torch.dtype = torch.float32
    chunk_size: int | None = None
    memory_budget: int | float | None = None
    allow_tf32: bool = False
    autocast: torch.dtype | None = None

    @classmethod
    def of(cls, loss_fn: Callable | None = None, unit: str = "sample", weighting: str = "sample",
           dtype: torch.dtype | None = None, chunk_size: int | None = None,
           memory_budget: int | float | None = None, allow_tf32: bool = False,
           autocast: torch.dtype | None = None, *, needs_protocol: str | None = None) -> Options:
        """The checked options of a public call, from its keyword arguments (same order).

        Args:
            loss_fn: the per-row loss, or ``None`` (``causal_lm_loss``).
            unit: ``"sample"`` or ``"token"``.
            weighting: ``"sample"`` or ``"token"``.
            dtype: ``torch.float32`` (``None``) or ``torch.float64``.
            chunk_size: ``None`` or a positive number of forward rows.
            memory_budget: ``None`` or a number of bytes >= 1.
            allow_tf32: a bool.
            autocast: ``None`` or ``torch.bfloat16``.
            needs_protocol: the name of what needs a loss with the token-loss protocol
                (e.g. ``"mc_fisher"``), if anything beyond ``unit``/``weighting`` does.

        Raises:
            ValueError: naming the first argument that is not what it should be.
        """
        loss = resolve_loss(loss_fn, unit=unit, weighting=weighting, needs_protocol=needs_protocol)
        return cls(loss, unit, weighting, check_dtype(dtype), check_chunk_size(chunk_size),
                   check_memory_budget(memory_budget), check_flag("allow_tf32", allow_tf32),
                   check_autocast(autocast))


def check_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The statistics dtype: float32 (``None``) or float64."""
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in DTYPES:
        got = repr(dtype) if isinstance(dtype, torch.dtype) else f"{dtype!r} ({type(dtype).__name__})"
        raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {got}.")
    return dtype


def check_autocast(autocast: torch.dtype | None) -> torch.dtype | None:
    """``None`` or ``torch.bfloat16`` (the bf16 fast path)."""
    if autocast not in AUTOCAST:
        raise ValueError(f"autocast: expected None or torch.bfloat16, got {autocast!r} "
                         "(float16 would need loss scaling against underflow; not offered).")
    return autocast


def check_chunk_size(chunk_size: int | None) -> int | None:
    """``None`` or a positive int of forward rows."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or a positive int, got {chunk_size!r}.")
    return chunk_size


def check_memory_budget(memory_budget: int | float | None) -> int | float | None:
    """``None`` (a fraction of free memory) or a number of bytes >= 1."""
    if memory_budget is not None and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
            or not memory_budget >= 1):
        raise ValueError(f"memory_budget: expected None or a number of bytes >= 1, got "
                         f"{memory_budget!r}.")
    return memory_budget


def check_flag(name: str, value: bool) -> bool:
    """A bool (not a truthy stand-in such as ``1`` or ``"yes"``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}.")
    return value


def check_device(device: str | torch.device) -> torch.device:
    """A device this process can use: a CUDA device only where CUDA is available (and its
    index exists), so that a wrong device fails at construction, not after a batch.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got "
                         f"{device!r} ({e}).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: expected an available device, got {str(dev)!r} "
                             "(CUDA is not available here; use 'cpu').")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: expected one of the {torch.cuda.device_count()} CUDA "
                             f"devices, got {str(dev)!r}.")
    elif dev.type not in ("cpu", "meta", "mps", "xpu"):
        raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {str(dev)!r}.")
    return dev
