r"""The main job's memory plan: what each step holds at its peak, against ``--memory-budget``.

The plan fixes, before anything is computed, the rows of a chunk ``c`` (one accumulator
update, one forward/backward, one chunk of task A's contributions) and the rows of a scoring
block ``b`` of task B, and where task A's contributions C_A live while interference is scored:

- ``memory``: computed once and kept (N_A rows of them), when that fits the budget;
- ``store``: filed in ``--store``'s ContributionStore on disk, read back a chunk at a time;
- ``recompute``: no ``--store`` and C_A would not fit: each chunk of C_A is computed again
  for every scoring block of B (``ceil(N_B / b)`` passes over task A instead of one).

Estimates, in bytes, with ``s`` the statistics' bytes per element, ``P`` the model's
parameter elements, ``u = s · |attention weights|`` one unit's interference gradient, ``T``
tokens per row:

.. math::

    \text{chunk}(c) &= c \cdot 4 s_m T \big(\textstyle\sum_\text{Linear, Conv1D, Embedding}
        (d_\text{in} + d_\text{out}) + 3 V\big) \quad\text{(activations, their gradients,
        saved inputs; } s_m \text{ the model's bytes)}\\
    \text{moments}(c) &= 6 P s + \text{chunk}(c) \quad\text{(a task's Welford state, a
        chunk's, their merge)}\\
    \text{interference}(c, b) &= \text{kept} + 3 b u + 2 c u + 2 \cdot 4 c b L H s + u +
        \text{chunk}(c) \quad(\text{kept} = N_A u \text{ in memory mode, else } 0)\\
    \text{conflicts}(n_A, n_B) &= 2 N u + 5 K N^2 \cdot 8 + 2 (P_\pi + 1) N \cdot 8
        + 4 \min(2^{24}, K (P_\pi + 1) N) \cdot 8 + 2 K \cdot 1000 \cdot n_B \cdot 8

with N = n_A + n_B conflict rows, K distinct QK-OV slices, P_π permutations (1000 bootstrap
resamples). These are estimates of the tensors each step holds (the allocator's
fragmentation and Python's own memory are not counted), not guarantees; fisher_fast chooses
the chunks of the conflicts' own gradients itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

CHUNK_ROWS = 32  # rows per chunk unless the budget allows fewer
MODES = ("memory", "store", "recompute")
_SUFFIX = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str, option: str = "--memory-budget") -> int:
    """A byte count such as ``2000000000``, ``512M``, ``4G`` or ``1.5GiB`` (powers of 1024).

    Raises:
        ValueError: not a positive number with an optional K, M, G or T suffix.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    value = int(float(m.group(1)) * _SUFFIX[m.group(2).lower()]) if m else 0
    if value < 1:
        raise ValueError(f"{option}: expected a positive number of bytes with an optional K, M, "
                         f"G or T suffix (powers of 1024, e.g. 512M or 4G), got {text!r}.")
    return value


def default_budget(device: torch.device) -> int:
    """Half the free memory of a CUDA device, or a quarter of the available RAM on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)


def human(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable


@dataclass(frozen=True)
class Sizes:
    """What the plan needs to know of the model and the tasks.

    Attributes:
        n_params: P, elements of every parameter (a tied one counted once).
        unit_bytes: u, bytes of one unit's gradient of the attention weights (in the statistics'
            dtype).
        itemsize: s, bytes per element of the statistics.
        row_bytes: activation bytes of one forward row (see the module docstring).
        rows_a: task A's units for interference (non-empty rows).
        rows_b: task B's units for interference.
        pairs_a: task A's rows for the conflicts' test.
        pairs_b: task B's rows for the conflicts' test.
        layers: L.
        heads: H.
        slices: K, the distinct QK-OV slices of the conflicts' test.
        permutations: P_π.
    """

    n_params: int
    unit_bytes: int
    itemsize: int
    row_bytes: int
    rows_a: int
    rows_b: int
    pairs_a: int
    pairs_b: int
    layers: int
    heads: int
    slices: int
    permutations: int

    def chunk(self, c: int) -> int:
        """One chunk's forward and backward."""
        return c * self.row_bytes

    def moments(self, c: int) -> int:
        """The accumulator of one task, with one update in flight."""
        return 6 * self.n_params * self.itemsize + self.chunk(c)

    def kept(self) -> int:
        """All of task A's contributions C_A (memory mode)."""
        return self.rows_a * self.unit_bytes

    def interference(self, c: int, b: int, keep: bool) -> int:
        """A scoring block of ``b`` rows of B against one chunk of ``c`` rows of A."""
        u, s = self.unit_bytes, self.itemsize
        tile = 2 * 4 * c * b * self.layers * self.heads * s
        return (self.kept() if keep else 0) + 3 * b * u + 2 * c * u + tile + u + self.chunk(c)

    def conflicts(self, n_a: int | None = None, n_b: int | None = None) -> int:
        """fisher_fast.conflicts on ``n_a + n_b`` rows (default: the planned pairs)."""
        n_a = self.pairs_a if n_a is None else n_a
        n_b = self.pairs_b if n_b is None else n_b
        n, k, p = n_a + n_b, self.slices, self.permutations
        return (2 * n * self.unit_bytes + 5 * k * n * n * 8 + 2 * (p + 1) * n * 8
                + 4 * min(2**24, k * (p + 1) * n) * 8 + 2 * k * 1000 * n_b * 8)


def row_bytes(model: torch.nn.Module, seq_len: int) -> int:
    """Activation bytes of one forward row of ``seq_len`` tokens (see the module docstring)."""
    widths, widest = 0, 1
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            widths += m.in_features + m.out_features
            widest = max(widest, m.out_features)
        elif type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None:
            widths += sum(m.weight.shape)
        elif isinstance(m, torch.nn.Embedding):
            widths += m.embedding_dim
            widest = max(widest, m.num_embeddings)  # a tied head's logits
    size = max(next(model.parameters()).element_size(), 4)
    return 4 * size * seq_len * (widths + 3 * widest)


@dataclass(frozen=True)
class Plan:
    """The chunks, the scoring blocks and where C_A lives, with each step's estimated peak.

    Attributes:
        budget: the budget in bytes.
        mode: ``"memory"``, ``"store"`` or ``"recompute"`` (module docstring).
        chunk_rows: c.
        block_rows: b.
        peaks: ``{step: estimated bytes}`` for ``moments``, ``interference``, ``conflicts``.
    """

    budget: int
    mode: str
    chunk_rows: int
    block_rows: int
    peaks: dict

    def numbers(self) -> dict:
        """What changes the results' rounding (the chunks and blocks), for a run's fingerprint."""
        return {"chunk_rows": self.chunk_rows, "block_rows": self.block_rows}

    def describe(self) -> dict:
        """The plan as JSON-able data (the report's ``settings.memory``)."""
        return {"budget_bytes": self.budget, "mode": self.mode, "chunk_rows": self.chunk_rows,
                "block_rows": self.block_rows, "peaks_bytes": dict(self.peaks)}


def _too_small(what: str, need: int, budget: int, advice: str) -> ValueError:
    return ValueError(f"--memory-budget: expected at least {need} bytes ({human(need)}) for "
                      f"{what}, got {budget} ({human(budget)}); {advice}.")


def make_plan(sizes: Sizes, budget: int, *, store: bool, chunk_rows: int = CHUNK_ROWS,
              fixed: dict | None = None) -> Plan:
    """The plan for ``sizes`` within ``budget`` bytes.

    Args:
        sizes: the model's and tasks' sizes.
        budget: bytes.
        store: task A's contributions go to a ``--store`` (mode ``"store"``).
        chunk_rows: the largest chunk wanted.
        fixed: ``{"chunk_rows", "block_rows"}`` of an earlier run to keep (a resumed run
            must chunk as the interrupted one did); refused if they no longer fit.

    Raises:
        ValueError: a step that does not fit even at one row per chunk and block, the
            conflicts' test on ``--pairs`` rows, or (``fixed``) the earlier run's chunks.
    """
    n_max = max(sizes.rows_a, sizes.rows_b, sizes.pairs_a, sizes.pairs_b, 1)
    if fixed is not None:
        c, b = int(fixed["chunk_rows"]), int(fixed["block_rows"])
    else:
        c = min(chunk_rows, n_max)
        while c > 1 and (sizes.moments(c) > budget or sizes.interference(c, 1, False) > budget):
            c //= 2
        if sizes.moments(c) > budget:
            raise _too_small(f"the accumulator's states of {sizes.n_params} parameters and "
                             "one row's forward and backward", sizes.moments(c), budget,
                             "raise it")
        b = 0
    keep = not store and sizes.interference(c, 1, True) <= budget
    if fixed is None:
        b = _largest(lambda r: sizes.interference(c, r, keep) <= budget, max(sizes.rows_b, 1))
        if b < 1:
            raise _too_small(f"scoring one row of task B against a chunk of {c} rows of task A",
                             sizes.interference(c, 1, False), budget, "raise it")
    mode = "store" if store else ("memory" if keep else "recompute")
    peaks = {"moments": sizes.moments(c), "interference": sizes.interference(c, b, keep),
             "conflicts": sizes.conflicts()}
    if fixed is not None and max(peaks["moments"], peaks["interference"]) > budget:
        need = max(peaks["moments"], peaks["interference"])
        raise _too_small(f"the chunks of {c} rows and scoring blocks of {b} rows the run in "
                         "--store was started with", need, budget,
                         "resume with the budget it was started with, or use a new --store")
    if peaks["conflicts"] > budget:
        fit = _largest(lambda r: sizes.conflicts(min(r, sizes.pairs_a), min(r, sizes.pairs_b))
                       <= budget, max(sizes.pairs_a, sizes.pairs_b))
        advice = (f"use --pairs {fit} or fewer, or raise it" if fit >= 1 else
                  "lower --permutations, or raise it")
        raise _too_small(f"the conflicts' test on {sizes.pairs_a} + {sizes.pairs_b} rows with "
                         f"{sizes.permutations} permutations (--pairs)", peaks["conflicts"],
                         budget, advice)
    return Plan(budget, mode, c, b, peaks)


def _largest(fits, upper: int) -> int:
    """The largest r in [1, upper] with ``fits(r)`` (``fits`` monotone decreasing), else 0."""
    if upper < 1 or not fits(1):
        return 0
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
