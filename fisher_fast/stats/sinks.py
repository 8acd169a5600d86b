"""Receivers of per-row gradients during a capture (see ``capture.Capture``).

``PerUnitSink`` keeps every row's gradient (``per_sample_gradients``). ``MomentSink`` keeps
only the chunk's weighted moment states: per element (W, mean, M2), per group of
f_u = R(g_u²), and the micro-batch states of ``batch_squared_gradient``. Nothing is written
anywhere else, so a failed chunk leaves no trace.
"""

from __future__ import annotations

import torch

from ..stats.groups import reduce_squares, reduce_squares_pairs
from ..stats.moments import Moments, SecondMoment


class _Sink:
    def __init__(self):
        self.got: set[str] = set()
        self.w: torch.Tensor | None = None

    def begin(self, weights: torch.Tensor) -> None:
        """Weights of the chunk's units (before its backward)."""
        self.w = weights
        self.got = set()

    def received(self, name: str) -> bool:
        """Whether ``name`` got rows in the current backward pass."""
        return name in self.got

    def add_zero(self, name, p, n):
        """Zero gradients for ``n`` rows of a parameter the loss does not reach."""
        shape = (n, *p.shape)
        self.add(name, torch.zeros(shape, dtype=self.w.dtype, device=self.w.device), 0)


class PerUnitSink(_Sink):
    """Stores ``[n, *shape]`` per parameter of ``params`` (the others are not computed)."""

    def __init__(self, params: dict, n: int, dtype, device):
        super().__init__()
        self.offset = 0  # units before the current chunk
        self.out = {name: torch.empty((n, *p.shape), dtype=dtype, device=device)
                    for name, p in params.items()}

    def wants(self, name):
        """``(full, group spec)``: whether the sink wants ``name``'s per-row gradients, and its groups."""
        return name in self.out, None

    def add(self, name, g, start):
        """Rows ``start, ...`` of ``name``'s per-row gradients, ``g [s, *shape]`` (no copy
        when ``g`` is already those rows, from ``rows_view``).
        """
        at = self.offset + start
        dest = self.out[name][at:at + g.shape[0]]
        if g.data_ptr() != dest.data_ptr() or g.shape != dest.shape:
            dest.copy_(g)
        self.got.add(name)

    def rows_view(self, name, start, n):
        """The stored rows ``start .. start + n`` of ``name`` (to be written in place)."""
        if name not in self.out:
            return None
        at = self.offset + start
        return self.out[name][at:at + n]


class _BlockSums:
    """Bookkeeping shared by the chunk sums: slices of rows arrive whole or as blocks of the
    parameter's first axis (``part``), possibly over several backward passes (MC draws);
    W counts each slice once (with its block that starts at 0), and the first slice of a
    block is told so (it overwrites the block's sums, which therefore need no zeroing).
    """

    def __init__(self, dtype, device):
        self.W = torch.zeros((), dtype=dtype, device=device)
        self.started: set = set()  # blocks (None: the whole) already written

    def _begin(self, w: torch.Tensor, part: slice | None) -> bool:
        key = None if part is None else (part.start, part.stop)
        first = key not in self.started
        self.started.add(key)
        if part is None or not part.start:
            self.W += w.sum()
        return first


def _block(t: torch.Tensor, part: slice | None) -> torch.Tensor:
    return t if part is None else t[part]


class ShiftedSums(_BlockSums):
    """Per-element weighted sums of a chunk, shifted by the chunk's first unit K:
    W = Σ w, S1 = Σ w (g − K), S2 = Σ w (g − K)².

    Adding a slice costs two fused accumulations over the slice (no pass over the whole
    parameter per slice, unlike a Chan merge per slice), and the shift keeps
    ``M2 = S2 − S1² / W`` free of the cancellation of raw sums: |mean − K| is of the order
    of one standard deviation. M2 is clamped at 0 against rounding only. For a block, K is
    the first unit's block.
    """

    def __init__(self, shape, dtype, device):
        super().__init__(dtype, device)
        self.K = torch.empty(shape, dtype=dtype, device=device)
        self.S1 = torch.empty(shape, dtype=dtype, device=device)  # written by the first
        self.S2 = torch.empty(shape, dtype=dtype, device=device)  # rows (beta = 0)

    def add(self, g: torch.Tensor, w: torch.Tensor, part: slice | None = None,
            owned: bool = False) -> None:
        """More rows of the chunk, ``g: [s, *shape]`` (or ``[s, *shape[part]]``), weights
        ``w``. ``owned``: ``g`` may be overwritten (saves a copy).
        """
        K, S1, S2 = _block(self.K, part), _block(self.S1, part), _block(self.S2, part)
        first = self._begin(w, part)
        if first:
            K.copy_(g[0])
        beta = 0 if first else 1  # the first rows overwrite S1, S2 (NaN-safe in torch)
        d = (g.sub_(K) if owned else g - K).reshape(g.shape[0], -1)
        S1.view(-1).addmv_(d.T, w, beta=beta)
        d.square_()
        S2.view(-1).addmv_(d.T, w, beta=beta)

    def moments(self) -> Moments:
        """The chunk's Welford state; consumes the sums (computed in place)."""
        tiny = torch.finfo(self.W.dtype).tiny
        r = self.S1 / self.W.clamp(min=tiny)
        m2 = self.S2.addcmul_(self.S1, r, value=-1).clamp_(min=0)
        return Moments(self.W, self.K.add_(r), m2)


class SquareSums(_BlockSums):
    r"""Per-element ``W = Σ w`` and ``S = Σ w g²`` of a chunk (``SecondMoment`` states), added
    like ``ShiftedSums``; no shift is needed (the terms are non-negative).

    A weight with one position per row may instead arrive as its square-separable factors
    (``add_separable``: :math:`S \mathrel{+}= (w \odot \delta^2)^	op x^2`). Consecutive
    additions with the same input factor — the backward passes of one chunk's MC draws or
    classes — are folded into one product: their weighted δ² are summed first.
    """

    def __init__(self, shape, dtype, device):
        super().__init__(dtype, device)
        self.S = torch.empty(shape, dtype=dtype, device=device)  # written by the first rows
        self.written = False  # by a separable product
        self.pending = None  # [Σ w δ² [n, d_out], x² [n, d_in], out_axis]: not yet multiplied

    def add(self, g: torch.Tensor, w: torch.Tensor, part: slice | None = None,
            owned: bool = False) -> None:
        """More rows ``g [s, *shape]`` (or of block ``part``) with weights ``w``.

        ``owned``: ``g`` may be overwritten.
        """
        self._flush()
        S = _block(self.S, part)
        beta = 0 if self._begin(w, part) and not self.written else 1
        sq = (g.square_() if owned else g.square()).reshape(g.shape[0], -1)
        S.view(-1).addmv_(sq.T, w, beta=beta)

    def add_separable(self, d2: torch.Tensor, x2: torch.Tensor, w: torch.Tensor,
                      out_axis: int = 0) -> None:
        """Rows with one position: ``d2 = δ² [s, d_out]``, ``x2 = x² [s, d_in]``, weights
        ``w [s]``; ``out_axis``: the weight axis of d_out (1 for an ``[in, out]`` weight).
        ``d2`` may be overwritten.
        """
        self.W += w.sum()
        wd2 = d2.mul_(w[:, None])
        if self.pending is not None and self.pending[1] is x2 and self.pending[2] == out_axis:
            self.pending[0].add_(wd2)
            return
        self._flush()
        self.pending = [wd2, x2, out_axis]

    def _flush(self) -> None:
        if self.pending is None:
            return
        wd2, x2, out_axis = self.pending
        self.pending = None
        beta = 1 if self.written or self.started else 0
        if out_axis == 0:
            self.S.view(wd2.shape[1], x2.shape[1]).addmm_(wd2.T, x2, beta=beta)
        else:
            self.S.view(x2.shape[1], wd2.shape[1]).addmm_(x2.T, wd2, beta=beta)
        self.written = True

    def moments(self) -> SecondMoment:
        """The chunk's state; consumes the sums (computed in place)."""
        self._flush()
        return SecondMoment(self.W, self.S.div_(self.W.clamp(min=torch.finfo(self.W.dtype).tiny)))


class MomentSink(_Sink):
    """Chunk moment states.

    Args:
        full: parameter names whose per-element moments are wanted.
        groups: ``{name: GroupSpec}`` whose group moments are wanted.
        micro: ``{b: {name: MicroBatchState}}`` to continue (states of the units before).
    """

    def __init__(self, full: set, groups: dict, micro: dict | None = None,
                 second_only: bool = False):
        super().__init__()
        self.full, self.groups = set(full), dict(groups)
        self.second_only = second_only  # per-element SecondMoment states instead of Moments
        self.sums: dict = {}  # name -> ShiftedSums (or SquareSums)
        self.pair_moments: dict = {}  # name -> Moments (or SecondMoment)
        self.group_moments: dict[str, Moments] = {}
        self.micro = {b: dict(states) for b, states in (micro or {}).items()}

    def take_moments(self) -> dict[str, Moments]:
        """Per-element Welford states of the chunk (from the shifted sums and the pairs),
        computed in the sums' tensors: call once, at the end of the chunk.
        """
        out = {name: sums.moments() for name, sums in self.sums.items()}
        self.sums = {}
        for name, m in self.pair_moments.items():
            out[name] = out[name].merge(m) if name in out else m
        return out

    def takes_pairs(self, name) -> bool:
        """Sparse (row, index) pairs serve per-element and group moments, not the
        micro-batch states of ``batch_squared_gradient`` (those need dense rows).
        """
        return not any(name in st for st in self.micro.values())

    def add_pairs(self, name, rows, cols, values, shape):
        """The whole chunk's per-row gradients of ``name`` as distinct (row, index) pairs
        (zero elsewhere): ``Moments.of_pairs`` and ``reduce_squares_pairs``.
        """
        w = self.w.to(values.dtype)
        self.got.add(name)
        if name in self.full:
            m = (SecondMoment if self.second_only else Moments).of_pairs(w, rows, cols, values,
                                                                         shape)
            store = self.pair_moments
            store[name] = store[name].merge(m) if name in store else m
        if name in self.groups:
            f = reduce_squares_pairs(self.groups[name], rows, cols, values, w.shape[0], shape)
            self._merge_groups(name, f, w)

    def wants(self, name):
        """``(full, group spec)``: whether the sink wants ``name``'s per-row gradients, and its groups."""
        return name in self.full or any(name in st for st in self.micro.values()), \
            self.groups.get(name)

    def add(self, name, g, start):
        """Rows ``start, ...`` of ``name``'s per-row gradients, ``g [s, *shape]``."""
        w = self.w[start:start + g.shape[0]].to(g.dtype)
        self.got.add(name)
        if name in self.full:
            self._sums(name, g.shape[1:], g).add(g, w)
        for states in self.micro.values():
            if name in states:
                states[name] = states[name].add(g, w)
        if name in self.groups:
            self._merge_groups(name, reduce_squares(self.groups[name], g), w)

    def takes_separable(self, name) -> bool:
        """The square-separable factors of a weight (``add_separable``) serve its E[g²]
        alone (``second_only``): not the Welford mean and M2 (the shifted sums need each
        row's gradient), nor ``batch_squared_gradient``'s states. Its groups come
        separately (``add_groups``).
        """
        return (self.second_only and name in self.full
                and not any(name in st for st in self.micro.values()))

    def add_separable(self, name, d2, x2, shape, start: int = 0, out_axis: int = 0):
        """The E[g²] of rows ``start, ...`` of a weight of ``shape`` with one position per
        row, as the factors ``d2 = δ² [s, d_out]`` (overwritten) and ``x2 = x² [s, d_in]``
        (``SquareSums.add_separable``).
        """
        w = self.w[start:start + d2.shape[0]].to(d2.dtype)
        self.got.add(name)
        self._sums(name, shape, d2).add_separable(d2, x2, w, out_axis)

    def takes_parts(self, name) -> bool:
        """Blocks of a parameter's first axis (``add_part``) serve its per-element moments
        only: not its groups, nor ``batch_squared_gradient``'s states.
        """
        return (name in self.full and name not in self.groups
                and not any(name in st for st in self.micro.values()))

    def add_part(self, name, g, start, part: slice, shape):
        """Rows ``start, ...`` of block ``part`` of the first axis of a parameter of
        ``shape``; ``g`` (``[s, *shape[part]]``) is the caller's and is overwritten.
        """
        w = self.w[start:start + g.shape[0]].to(g.dtype)
        self.got.add(name)
        self._sums(name, shape, g).add(g, w, part, owned=True)

    def _sums(self, name, shape, like) -> ShiftedSums | SquareSums:
        if name not in self.sums:
            kind = SquareSums if self.second_only else ShiftedSums
            self.sums[name] = kind(tuple(shape), like.dtype, like.device)
        return self.sums[name]

    def add_groups(self, name, f, start):
        """Rows ``start, ...`` of ``name``'s group values f = R(g²), ``[s, n_groups]``."""
        w = self.w[start:start + f.shape[0]].to(f.dtype)
        self.got.add(name)
        self._merge_groups(name, f, w)

    def _merge_groups(self, name, f, w):
        m = Moments.of(f, w)
        store = self.group_moments
        store[name] = store[name].merge(m) if name in store else m
