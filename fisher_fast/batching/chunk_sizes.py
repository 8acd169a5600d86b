r"""Chunk sizes from a memory budget.

The budget (bytes) defaults to half the free memory of a CUDA device
(``torch.cuda.mem_get_info`` plus the allocator's reserved-but-unused cache, which a chunk
reuses) or a quarter of the available RAM on CPU (``MemAvailable``).
Half of it goes to the forward/backward of a chunk, estimated per forward row as

.. math:: 4 \cdot b \cdot T \cdot \Big(\sum_{\text{hooked modules}} (d_\text{in} +
          d_\text{out}) + 3\, C\Big)

(activations, their gradients and the saved inputs; C the widest output, the logits), with b
the bytes per element, plus :math:`b \cdot N_\text{tied}` for the per-row buffer of every
parameter used more than once (a tied head's per-row gradients are summed over its uses
for the whole chunk before squaring: ``[n, V, d]``).

A hook materialises per-row gradients a slice of rows at a time,
the slice holding at most ``min(budget / 4, 1 GiB)`` (``slice_bytes``; three copies of the
slice's gradients are counted: the gradients, their deviations, a product). Slices of a
few rows keep the matmuls large while the peak stays close to a plain forward/backward's.
It is an estimate, not a guarantee: pass ``chunk_size`` to override it.

What it assumes: activations dominate (true for transformers at T ≳ 32), every hooked
module sees each row's T positions once, and an untied embedding costs O(T d) per row (its
statistics come from (row, token) pairs, ``EmbeddingRule.pairs``). It ignores the
attention scores (``[H, T, T]`` per layer and row, which dominate only when T exceeds
about 12 d / H: 768 for GPT-2 small) and the allocator's fragmentation. The factor 4 is a
margin: on the CPU benchmark shape (GPT-2, L = 2, d = 128, V = 1000, 16 × 64) it predicts
139 MB for the chunk against a measured 55-64 MiB peak of a plain forward/backward (2.1-2.4×);
it has not been measured on a GPU yet.
"""

from __future__ import annotations

import torch


def available_bytes(device: torch.device) -> int:
    """Bytes a chunk may use on ``device``.

    Free CUDA memory plus the allocator's unused cache, or the CPU's ``MemAvailable``.
    """
    device = torch.device(device)
    if device.type == "cuda":  # free, plus what torch's caching allocator holds unused
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def default_budget(device) -> int:
    """The default memory budget: half of ``available_bytes`` on CUDA, a quarter on the CPU."""
    device = torch.device(device)
    frac = 0.5 if device.type == "cuda" else 0.25
    return int(available_bytes(device) * frac)


def _widths(model) -> tuple[int, int, int]:
    """``(Σ (d_in + d_out) of token-wise modules, widest Linear output, Σ (C_in + C_out) of
    the Conv2d layers)``.
    """
    total, widest, channels = 0, 1, 0
    for m in model.modules():
        w = 0
        if isinstance(m, torch.nn.Linear):
            w, widest = m.in_features + m.out_features, max(widest, m.out_features)
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
            w = m.weight.shape[0] + m.weight.shape[1]
        elif isinstance(m, torch.nn.Embedding):
            w = m.embedding_dim
        elif isinstance(m, torch.nn.Conv2d):
            channels += m.in_channels + m.out_channels
        total += w
    return max(total, 1), widest, channels


def _tied_numel(model) -> int:
    seen, tied = set(), 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied += p.numel()
        seen.add(id(p))
    return tied


def row_activations(model, tensors: dict) -> int:
    """Activation elements of one forward row, T (Σ_hooked (d_in + d_out) + 3 C) + HW
    Σ_conv (C_in + C_out): the size of a row's share of a forward/backward pass.

    T is the length of the batch's integer tensors (token ids, labels ``[B, T]``), 1 when it
    has none (a classifier's features ``[B, d]``: one position per row); HW the spatial size
    of its float inputs ``[B, C, H, W]`` (an upper bound for every Conv2d's output), 1 for
    others.
    """
    seq = max((v.shape[1] for v in tensors.values()
               if v.dim() >= 2 and not v.is_floating_point()), default=1)
    spatial = max((v[0, 0].numel() for v in tensors.values()
                   if v.dim() >= 3 and v.is_floating_point()), default=1)
    total, widest, channels = _widths(model)
    return seq * (total + 3 * widest) + spatial * channels


def rows_per_chunk(model, tensors: dict, budget: int, n_units: int) -> int:
    """How many forward rows a chunk takes: at most what fits half of ``budget`` (at least
    1), balanced over the chunks the units need (16 units of which 14 fit: two chunks of
    8, not 14 + 2, whose small tail would run the model at a fraction of its speed).
    """
    b = max(next(model.parameters()).element_size(), 4)
    per_row = 4 * b * row_activations(model, tensors) + b * _tied_numel(model)
    fit = int(max(1, min(n_units, (budget // 2) // per_row)))
    n_chunks = -(-max(n_units, 1) // fit)
    return -(-max(n_units, 1) // n_chunks)


# A backward pass has a fixed cost (Python hooks, autograd nodes, kernel launches) that rows
# amortise once they hold about this many multiply-adds (a few ms on a CPU core; on the tiny
# GPT-2 of docs/benchmarks.md, ~1700 rows, close to the 2^22 activation elements this
# replaced, which gave a 784-512-512-10 MLP's classes 1461-row passes instead of 26).
PASS_MACS = 2**24


def row_macs(model, tensors: dict) -> int:
    """Multiply-adds of one forward row through the weights: T Σ d_in d_out over the
    token-wise Linear/Conv1D layers plus HW Σ C_in C_out k² over the Conv2d layers (T and
    HW as in ``row_activations``).
    """
    seq = max((v.shape[1] for v in tensors.values()
               if v.dim() >= 2 and not v.is_floating_point()), default=1)
    spatial = max((v[0, 0].numel() for v in tensors.values()
                   if v.dim() >= 3 and v.is_floating_point()), default=1)
    macs = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf")):
            macs += seq * m.weight.numel()
        elif isinstance(m, torch.nn.Conv2d):
            macs += spatial * m.weight.numel()
    return max(macs, 1)


def rows_per_pass(model, tensors: dict) -> int:
    """Forward rows a backward pass should hold to amortise its fixed cost (at least 1)."""
    return max(1, -(-PASS_MACS // row_macs(model, tensors)))


def slice_bytes(budget: int) -> int:
    """Memory for one slice of per-row gradients: ``min(budget // 4, 1 GiB)``."""
    return int(max(1, min(budget // 4, 2**30)))
