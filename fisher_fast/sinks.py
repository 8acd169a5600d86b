"""Receivers of per-row gradients during a capture (see ``capture.Capture``).

``PerUnitSink`` keeps every row's gradient (``per_sample_gradients``). ``MomentSink`` keeps
only the chunk's weighted moment states: per element (W, mean, M2), per group of
f_u = R(g_u²), and the micro-batch states of ``batch_squared_gradient``. Nothing is written
anywhere else, so a failed chunk leaves no trace.
"""

from __future__ import annotations

import torch

from .group_specs import reduce_squares, reduce_squares_pairs
from .micro_batches import MicroBatchState
from .moments import Moments


class _Sink:
    def __init__(self):
        self.got: set[str] = set()
        self.w: torch.Tensor | None = None

    def begin(self, weights: torch.Tensor) -> None:
        """Weights of the chunk's units (before its backward)."""
        self.w = weights
        self.got = set()

    def received(self, name: str) -> bool:
        return name in self.got

    def add_zero(self, name, p, n):
        shape = (n, *p.shape)
        self.add(name, torch.zeros(shape, dtype=self.w.dtype, device=self.w.device), 0)


class PerUnitSink(_Sink):
    """Stores ``[n, *shape]`` per parameter."""

    def __init__(self, params: dict, n: int, dtype, device):
        super().__init__()
        self.offset = 0  # units before the current chunk
        self.out = {name: torch.empty((n, *p.shape), dtype=dtype, device=device)
                    for name, p in params.items()}

    def wants(self, name):
        return True, None

    def add(self, name, g, start):
        at = self.offset + start
        self.out[name][at:at + g.shape[0]] = g
        self.got.add(name)


class ShiftedSums:
    """Per-element weighted sums of a chunk, shifted by the chunk's first unit K:
    W = Σ w, S1 = Σ w (g − K), S2 = Σ w (g − K)².

    Adding a slice costs two fused accumulations over the slice (no pass over the whole
    parameter per slice, unlike a Chan merge per slice), and the shift keeps
    ``M2 = S2 − S1² / W`` free of the cancellation of raw sums: |mean − K| is of the order
    of one standard deviation. M2 is clamped at 0 against rounding only.
    """

    def __init__(self, first: torch.Tensor):
        self.K = first.clone()
        self.W = torch.zeros((), dtype=first.dtype, device=first.device)
        self.S1 = torch.zeros_like(first)
        self.S2 = torch.zeros_like(first)

    def add(self, g: torch.Tensor, w: torch.Tensor) -> None:
        d = (g - self.K).reshape(g.shape[0], -1)
        self.W += w.sum()
        self.S1.view(-1).addmv_(d.T, w)
        d.square_()
        self.S2.view(-1).addmv_(d.T, w)

    def moments(self) -> Moments:
        tiny = torch.finfo(self.W.dtype).tiny
        r = self.S1 / self.W.clamp(min=tiny)
        return Moments(self.W, self.K + r, (self.S2 - self.S1 * r).clamp(min=0))


class MomentSink(_Sink):
    """Chunk moment states.

    Args:
        full: parameter names whose per-element moments are wanted.
        groups: ``{name: GroupSpec}`` whose group moments are wanted.
        micro: ``{b: {name: MicroBatchState}}`` to continue (states of the units before).
    """

    def __init__(self, full: set, groups: dict, micro: dict | None = None):
        super().__init__()
        self.full, self.groups = set(full), dict(groups)
        self.sums: dict[str, ShiftedSums] = {}
        self.pair_moments: dict[str, Moments] = {}
        self.group_moments: dict[str, Moments] = {}
        self.micro = {b: dict(states) for b, states in (micro or {}).items()}

    @property
    def moments(self) -> dict[str, Moments]:
        """Per-element Welford states of the chunk (from the shifted sums and the pairs)."""
        out = {name: sums.moments() for name, sums in self.sums.items()}
        for name, m in self.pair_moments.items():
            out[name] = out[name].merge(m) if name in out else m
        return out

    def takes_pairs(self, name) -> bool:
        """Sparse (row, index) pairs serve per-element and group moments, not the
        micro-batch states of ``batch_squared_gradient`` (those need dense rows)."""
        return not any(name in st for st in self.micro.values())

    def add_pairs(self, name, rows, cols, values, shape):
        """The whole chunk's per-row gradients of ``name`` as distinct (row, index) pairs
        (zero elsewhere): ``Moments.of_pairs`` and ``reduce_squares_pairs``."""
        w = self.w.to(values.dtype)
        self.got.add(name)
        if name in self.full:
            m = Moments.of_pairs(w, rows, cols, values, shape)
            store = self.pair_moments
            store[name] = store[name].merge(m) if name in store else m
        if name in self.groups:
            f = reduce_squares_pairs(self.groups[name], rows, cols, values, w.shape[0], shape)
            self._merge_groups(name, f, w)

    def wants(self, name):
        return name in self.full or any(name in st for st in self.micro.values()), \
            self.groups.get(name)

    def add(self, name, g, start):
        w = self.w[start:start + g.shape[0]].to(g.dtype)
        self.got.add(name)
        if name in self.full:
            if name not in self.sums:
                self.sums[name] = ShiftedSums(g[0])
            self.sums[name].add(g, w)
        for states in self.micro.values():
            if name in states:
                states[name] = states[name].add(g, w)
        if name in self.groups:
            self._merge_groups(name, reduce_squares(self.groups[name], g), w)

    def add_groups(self, name, f, start):
        w = self.w[start:start + f.shape[0]].to(f.dtype)
        self.got.add(name)
        self._merge_groups(name, f, w)

    def _merge_groups(self, name, f, w):
        m = Moments.of(f, w)
        store = self.group_moments
        store[name] = store[name].merge(m) if name in store else m
