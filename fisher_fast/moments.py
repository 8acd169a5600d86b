"""Weighted Welford/Chan moment states (W, mean, M2) that merge exactly (SPEC §8).

A state summarises weighted values x_u (a per-element gradient, or a group's f_u):

.. math::

    W = \\sum_u w_u, \\qquad \\bar x = \\frac{1}{W}\\sum_u w_u x_u, \\qquad
    M_2 = \\sum_u w_u (x_u - \\bar x)^2

and two states merge by Chan's formula
``mean = mean_a + δ W_b / W``, ``M2 = M2_a + M2_b + δ² W_a W_b / W`` (δ = mean_b − mean_a),
so any split of the units gives the two-pass result up to rounding. From a state,
``E[x²] = M2 / W + mean²`` adds two non-negative terms (no cancellation) and the variance
``M2 / W`` is a sum of squares (never negative, no clamp needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    W: torch.Tensor  # 0-d
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def zeros(shape, dtype, device) -> "Moments":
        z = torch.zeros(shape, dtype=dtype, device=device)
        return Moments(torch.zeros((), dtype=dtype, device=device), z, z.clone())

    @staticmethod
    def of(values: torch.Tensor, w: torch.Tensor) -> "Moments":
        """Two-pass moments of ``values [s, *shape]`` with weights ``w [s]``."""
        W = w.sum()
        tiny = torch.finfo(W.dtype).tiny  # W = 0 only when every w is 0, then Σ w x = 0 too
        mean = torch.tensordot(w, values, dims=1) / W.clamp(min=tiny)
        dev = values - mean
        dev.square_()
        return Moments(W, mean, torch.tensordot(w, dev, dims=1))

    @staticmethod
    def of_pairs(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                 shape) -> "Moments":
        r"""Two-pass moments of s per-unit tensors ``[s, *shape]`` that are zero except along
        axis 0 at the pairs (unit ``rows[p]``, index ``cols[p]``) with ``values[p]``
        (distinct pairs; the sparse per-row gradients of an embedding):

        .. math::

            \bar x_v = \frac{1}{W}\sum_{p:\ c_p = v} w_{r_p} x_p, \qquad
            M_{2,v} = \sum_{p:\ c_p = v} w_{r_p} (x_p - \bar x_v)^2
                      + \Big(\sum_{u \text{ not at } v} w_u\Big)\, \bar x_v^2

        Every term is non-negative (the units that miss v contribute (0 − x̄)² each), so
        nothing cancels; cost O(P · row size + s · shape[0]).
        """
        s, V = w.shape[0], shape[0]
        W = w.sum()
        tiny = torch.finfo(W.dtype).tiny
        # only the indices some unit touches get non-zero moments: work on those (U ≤ P
        # rows, e.g. the tokens of a batch against a 50257-token vocabulary), then scatter
        touched, at = torch.unique(cols, return_inverse=True)
        wp = w[rows].reshape(-1, *([1] * (values.dim() - 1)))
        mean_t = torch.zeros((touched.shape[0], *shape[1:]), dtype=values.dtype,
                             device=values.device)
        mean_t.index_add_(0, at, values * wp)
        mean_t /= W.clamp(min=tiny)
        dev = values - mean_t[at]
        dev.square_()
        m2_t = torch.zeros_like(mean_t).index_add_(0, at, dev.mul_(wp))
        missing = torch.ones(s * V, dtype=w.dtype, device=w.device)
        missing.index_fill_(0, rows * V + cols, 0)
        w_missing = w @ missing.view(s, V)[:, touched]  # weight of the units that miss v
        m2_t.addcmul_(w_missing.reshape(-1, *([1] * (values.dim() - 1))) * mean_t, mean_t)
        mean = torch.zeros(shape, dtype=values.dtype, device=values.device)
        m2 = torch.zeros_like(mean)
        mean[touched], m2[touched] = mean_t, m2_t
        return Moments(W, mean, m2)

    def merge(self, other: "Moments") -> "Moments":
        W = self.W + other.W
        r = other.W / W.clamp(min=torch.finfo(W.dtype).tiny)  # 0 when both are empty
        delta = other.mean - self.mean
        return Moments(W, self.mean + delta * r, self.m2 + other.m2 + delta.square() * self.W * r)

    def merge_(self, other: "Moments") -> "Moments":
        """``merge`` computed in ``self``'s tensors (which must be owned by the caller)."""
        W = self.W + other.W
        r = other.W / W.clamp(min=torch.finfo(W.dtype).tiny)
        delta = other.mean - self.mean
        self.mean.addcmul_(delta, r)
        self.m2.add_(other.m2).addcmul_(delta.square_(), self.W * r)
        self.W = W
        return self

    def second_moment(self) -> torch.Tensor:
        """Weighted mean of x²: ``M2 / W + mean²``."""
        return torch.addcmul(self.m2 / self.W, self.mean, self.mean)

    def variance(self) -> torch.Tensor:
        """Weighted population variance ``M2 / W``."""
        return self.m2 / self.W

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.W": self.W, f"{prefix}.mean": self.mean, f"{prefix}.m2": self.m2}

    @staticmethod
    def from_tensors(d: dict, prefix: str) -> "Moments":
        return Moments(d[f"{prefix}.W"], d[f"{prefix}.mean"], d[f"{prefix}.m2"])
