r"""Streaming state of ``batch_squared_gradient(b)``: micro-batches of b consecutive units.

.. math::

    \text{BSG}_b = \frac{1}{W}\sum_m W_m\, \bar g_m^2 = \frac{1}{W}\sum_m
    \frac{(\sum_{u \in m} w_u g_u)^2}{W_m}

The state keeps the closed sum, and the open (last, possibly short) micro-batch's Σw and
Σw·g, so units may arrive in slices of any size as long as they arrive in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _ratio(total: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(Σ w g)² / W_m, or 0 for an empty micro-batch."""
    return torch.where(w > 0, total.square() / torch.where(w > 0, w, torch.ones_like(w)),
                       torch.zeros_like(total))


@dataclass
class MicroBatchState:
    """The streaming state of ``batch_squared_gradient(b)`` for one parameter: the closed
    micro-batches' Σ_m W_m ḡ_m² and the open micro-batch's Σ w g and weight.
    """

    b: int
    closed: torch.Tensor  # Σ over closed micro-batches of (Σ w g)² / W_m
    open_sum: torch.Tensor  # Σ w g of the open micro-batch
    open_w: torch.Tensor  # 0-d
    seen: int = 0  # units so far

    @staticmethod
    def zeros(b: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> MicroBatchState:
        """The state before any unit."""
        z = torch.zeros(shape, dtype=dtype, device=device)
        return MicroBatchState(b, z, z.clone(), torch.zeros((), dtype=dtype, device=device))

    def add(self, g: torch.Tensor, w: torch.Tensor) -> MicroBatchState:
        """A new state with units ``g [s, *shape]`` (weights ``w [s]``) appended."""
        s = g.shape[0]
        closed, open_sum, open_w = self.closed, self.open_sum, self.open_w
        if self.seen % self.b == 0 and self.seen:  # the open micro-batch is full: close it
            closed = closed + _ratio(open_sum, open_w)
            open_sum, open_w = torch.zeros_like(open_sum), torch.zeros_like(open_w)
        pos = torch.arange(self.seen, self.seen + s, device=g.device)
        first = self.seen // self.b
        m = pos // self.b - first  # 0 is the open micro-batch
        M = ((self.seen + s - 1) // self.b - first + 1) if s else 1  # = m[-1] + 1, no sync
        sums = torch.zeros((M, *g.shape[1:]), dtype=g.dtype, device=g.device)
        sums.index_add_(0, m, g * w.reshape(-1, *[1] * (g.dim() - 1)))
        ws = torch.zeros(M, dtype=g.dtype, device=g.device).index_add_(0, m, w)
        sums[0] += open_sum
        ws[0] += open_w
        if M > 1:
            done_w = ws[:-1].reshape(-1, *[1] * (g.dim() - 1))
            closed = closed + (sums[:-1].square() / done_w).sum(0)
        return MicroBatchState(self.b, closed, sums[-1], ws[-1], self.seen + s)

    def value(self, W: torch.Tensor) -> torch.Tensor:
        """Σ_m W_m ḡ_m² / W, the open micro-batch counted as the last one."""
        return (self.closed + _ratio(self.open_sum, self.open_w)) / W

    def tensors(self, prefix: str) -> dict:
        """The state's tensors under ``prefix``-ed names (for state files)."""
        return {f"{prefix}.closed": self.closed, f"{prefix}.open_sum": self.open_sum,
                f"{prefix}.open_w": self.open_w}
