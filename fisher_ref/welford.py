r"""Streaming weighted moments: Welford updates and Chan's exact merge (SPEC §8).

A state holds the total weight :math:`W`, the weighted mean :math:`\mu` and
:math:`M_2 = \sum_u w_u (x_u - \mu)^2`. Any split of the units into batches, in any
order, merged in any tree, gives the two-pass result up to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def two_pass_moments(x: torch.Tensor,
                     weights: torch.Tensor | None = None) -> tuple[float, torch.Tensor, torch.Tensor]:
    r"""Reference ``(W, mean, M2)`` of the rows of ``x`` in two float64 passes.

    .. math:: W = \sum_u w_u,\quad \mu = \frac{1}{W}\sum_u w_u x_u,\quad
       M_2 = \sum_u w_u (x_u - \mu)^2 .

    Args:
        x: ``Tensor[units, *shape]``.
        weights: ``Tensor[units]``, w_u (None: all 1).

    Returns:
        ``(W, mean Tensor[*shape], M2 Tensor[*shape])``, float64.
    """
    x = x.to(torch.float64)
    w = torch.ones(x.shape[0], dtype=torch.float64) if weights is None else weights.to(torch.float64)
    wb = w.reshape(-1, *[1] * (x.dim() - 1))
    W = w.sum()
    mean = (wb * x).sum(0) / W
    return float(W), mean, (wb * (x - mean).square()).sum(0)


@dataclass
class WelfordState:
    r"""Weighted running moments ``(W, mean, M2)`` of tensors of one shape.

    Attributes:
        W: the total weight.
        mean: the weighted mean, ``Tensor[*shape]``.
        M2: :math:`\sum_u w_u (x_u - \mu)^2`, ``Tensor[*shape]``.
    """

    W: float
    mean: torch.Tensor
    M2: torch.Tensor

    @classmethod
    def empty(cls, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> WelfordState:
        """The state of no values: W = 0, zero mean and M2 of ``shape``."""
        return cls(0.0, torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))

    @classmethod
    def from_tensors(cls, x: torch.Tensor, weights: torch.Tensor | None = None) -> WelfordState:
        """The state of the rows of ``x``, ``Tensor[units, *shape]`` (float64), by two passes."""
        if x.shape[0] == 0:
            raise ValueError("from_tensors: expected at least one row, got 0.")
        return cls(*two_pass_moments(x, weights))

    def update(self, x: torch.Tensor, weight: float = 1.0) -> WelfordState:
        r"""Add one value ``x: Tensor[*shape]`` with weight w (West's weighted Welford step), in place.

        .. math:: W' = W + w,\ \delta = x - \mu,\ \mu' = \mu + \frac{w}{W'}\delta,\
           M_2' = M_2 + w\,\delta\,(x - \mu').
        """
        if not weight > 0:
            raise ValueError(f"weight: expected a positive number, got {weight!r}.")
        x = x.to(torch.float64)
        W = self.W + float(weight)
        delta = x - self.mean
        mean = self.mean + (weight / W) * delta
        self.M2 = self.M2 + weight * delta * (x - mean)
        self.W, self.mean = W, mean
        return self

    def merge(self, other: WelfordState) -> WelfordState:
        r"""Chan's parallel merge, returning a new state.

        .. math:: W = W_a + W_b,\ \delta = \mu_b - \mu_a,\ \mu = \mu_a + \delta\,W_b/W,\
           M_2 = M_{2,a} + M_{2,b} + \delta^2 W_a W_b / W.
        """
        if other.W == 0:
            return WelfordState(self.W, self.mean.clone(), self.M2.clone())
        if self.W == 0:
            return WelfordState(other.W, other.mean.clone(), other.M2.clone())
        W = self.W + other.W
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.W / W)
        M2 = self.M2 + other.M2 + delta.square() * (self.W * other.W / W)
        return WelfordState(W, mean, M2)

    def variance(self) -> torch.Tensor:
        r"""Weighted population variance :math:`M_2 / W`."""
        if self.W == 0:
            raise ValueError("variance: expected a state with positive weight, got W = 0.")
        return self.M2 / self.W

    def second_moment(self) -> torch.Tensor:
        r""":math:`\frac{1}{W}\sum_u w_u x_u^2 = M_2/W + \mu^2` (the empirical Fisher for gradients)."""
        return self.variance() + self.mean.square()
