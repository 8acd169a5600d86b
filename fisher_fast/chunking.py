"""Chunk sizes from a memory budget.

The budget (bytes) defaults to half the free memory of a CUDA device
(``torch.cuda.mem_get_info``) or a quarter of the available RAM on CPU (``MemAvailable``).
Half of it goes to the forward/backward of a chunk, estimated per forward row as

.. math:: 4 \\cdot b \\cdot T \\cdot \\Big(\\sum_{\\text{hooked modules}} (d_\\text{in} +
          d_\\text{out}) + 3\\, C\\Big)

(activations, their gradients and the saved inputs; C the widest output, the logits), with b
the bytes per element. A hook materialises per-row gradients a slice of rows at a time,
the slice holding at most ``min(budget / 4, 1 GiB)`` (``slice_bytes``; three copies of the
slice's gradients are counted: the gradients, their deviations, a product). Slices of a
few rows keep the matmuls large while the peak stays close to a plain forward/backward's.
It is an estimate, not a guarantee: pass ``chunk_size`` to override it.
"""

from __future__ import annotations

import torch


def available_bytes(device: torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def default_budget(device) -> int:
    device = torch.device(device)
    frac = 0.5 if device.type == "cuda" else 0.25
    return int(available_bytes(device) * frac)


def _widths(model) -> tuple[int, int]:
    total, widest = 0, 1
    for m in model.modules():
        w = 0
        if isinstance(m, torch.nn.Linear):
            w, widest = m.in_features + m.out_features, max(widest, m.out_features)
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
            w = m.weight.shape[0] + m.weight.shape[1]
        elif isinstance(m, torch.nn.Embedding):
            w = m.embedding_dim
        total += w
    return max(total, 1), widest


def rows_per_chunk(model, tensors: dict, budget: int, n_units: int) -> int:
    """How many forward rows fit half of ``budget``; at least 1, at most ``n_units``."""
    seq = max((v.shape[1] for v in tensors.values() if v.dim() >= 2), default=1)
    p = next(model.parameters())
    b = max(p.element_size(), 4)
    total, widest = _widths(model)
    per_row = 4 * b * seq * (total + 3 * widest)
    return int(max(1, min(n_units, (budget // 2) // per_row)))


def slice_bytes(budget: int) -> int:
    """Memory for one slice of per-row gradients: ``min(budget // 4, 1 GiB)``."""
    return int(max(1, min(budget // 4, 2**30)))
