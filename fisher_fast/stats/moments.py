r"""Weighted Welford/Chan moment states (W, mean, M2) that merge exactly (SPEC §8).

A state summarises weighted values x_u (a per-element gradient, or a group's f_u):

.. math::

    W = \sum_u w_u, \qquad \bar x = \frac{1}{W}\sum_u w_u x_u, \qquad
    M_2 = \sum_u w_u (x_u - \bar x)^2

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
    """Weighted Welford/Chan state per element: total weight W (0-d), mean and M2."""

    W: torch.Tensor  # 0-d
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def zeros(shape, dtype, device) -> Moments:
        """The state of no units."""
        z = torch.zeros(shape, dtype=dtype, device=device)
        return Moments(torch.zeros((), dtype=dtype, device=device), z, z.clone())

    @staticmethod
    def of(values: torch.Tensor, w: torch.Tensor) -> Moments:
        """Two-pass moments of ``values [s, *shape]`` with weights ``w [s]``."""
        W = w.sum()
        tiny = torch.finfo(W.dtype).tiny  # W = 0 only when every w is 0, then Σ w x = 0 too
        mean = torch.tensordot(w, values, dims=1) / W.clamp(min=tiny)
        dev = values - mean
        dev.square_()
        return Moments(W, mean, torch.tensordot(w, dev, dims=1))

    @staticmethod
    def of_pairs(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                 shape) -> Moments:
        r"""Two-pass moments of s per-unit tensors ``[s, *shape]`` that are zero except along
        axis 0 at the pairs (unit ``rows[p]``, index ``cols[p]``) with ``values[p]``
        (distinct pairs; the sparse per-row gradients of an embedding).

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

    def merge(self, other: Moments) -> Moments:
        """Chan's merge of two states (a new state)."""
        W = self.W + other.W
        r = other.W / W.clamp(min=torch.finfo(W.dtype).tiny)  # 0 when both are empty
        delta = other.mean - self.mean
        return Moments(W, self.mean + delta * r, self.m2 + other.m2 + delta.square() * self.W * r)

    def merge_(self, other: Moments) -> Moments:
        """``merge`` computed in ``self``'s tensors (which must be owned by the caller)."""
        W = self.W + other.W
        r = other.W / W.clamp(min=torch.finfo(W.dtype).tiny)
        delta = other.mean - self.mean
        self.mean.addcmul_(delta, r)
        self.m2.add_(other.m2).addcmul_(delta.square_(), self.W * r)
        self.W = W
        return self

    def arrays(self) -> tuple:
        """The per-element arrays of the state (for checks)."""
        return (self.mean, self.m2)

    def to(self, device) -> Moments:
        """The state on ``device``."""
        return Moments(self.W.to(device), self.mean.to(device), self.m2.to(device))

    def second_moment(self) -> torch.Tensor:
        """Weighted mean of x²: ``M2 / W + mean²``."""
        return torch.addcmul(self.m2 / self.W, self.mean, self.mean)

    def variance(self) -> torch.Tensor:
        """Weighted population variance ``M2 / W``."""
        return self.m2 / self.W

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state's tensors under ``prefix``-ed names (for state files)."""
        return {f"{prefix}.W": self.W, f"{prefix}.mean": self.mean, f"{prefix}.m2": self.m2}

    @staticmethod
    def from_tensors(d: dict, prefix: str) -> Moments:
        """The inverse of ``tensors``."""
        return Moments(d[f"{prefix}.W"], d[f"{prefix}.mean"], d[f"{prefix}.m2"])


@dataclass
class SecondMoment:
    """The weighted mean of x² alone, ``f = Σ_u w_u x_u² / W``: the state of an estimator that
    wants E[g²] only (``empirical_fisher``, ``mc_fisher``, ``exact_fisher``). A sum of
    non-negative terms, so it needs no shift and cancels nothing; it costs one array per
    parameter instead of ``Moments``' two (and the shifted sums' three), and a chunk adds
    its slices with one square and one sum each instead of a shift, a square and two sums.
    Merging: ``f = (W_a f_a + W_b f_b) / W``.
    """

    W: torch.Tensor  # 0-d
    f: torch.Tensor

    @staticmethod
    def of_pairs(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                 shape) -> SecondMoment:
        """As ``Moments.of_pairs``: ``f_v = Σ_{p: c_p = v} w_{r_p} x_p² / W`` (units that
        miss v add 0).
        """
        W = w.sum()
        wp = w[rows].reshape(-1, *([1] * (values.dim() - 1)))
        f = torch.zeros(shape, dtype=values.dtype, device=values.device)
        f.index_add_(0, cols, values.square().mul_(wp))
        return SecondMoment(W, f.div_(W.clamp(min=torch.finfo(W.dtype).tiny)))

    def merge(self, other: SecondMoment) -> SecondMoment:
        """The weighted mean of two E[x²] states (a new state)."""
        W = self.W + other.W
        tiny = torch.finfo(W.dtype).tiny
        return SecondMoment(W, (self.f * self.W + other.f * other.W) / W.clamp(min=tiny))

    def merge_(self, other: SecondMoment) -> SecondMoment:
        """``merge`` computed in ``self.f`` (which must be owned by the caller)."""
        W = self.W + other.W
        r = other.W / W.clamp(min=torch.finfo(W.dtype).tiny)
        self.f.lerp_(other.f, r)  # f + r (f_b - f), no temporary
        self.W = W
        return self

    def second_moment(self, copy: bool = True) -> torch.Tensor:
        """``f`` (``copy=False``: ``f`` itself, for a state that is being discarded)."""
        return self.f.clone() if copy else self.f

    def arrays(self) -> tuple:
        """The per-element arrays (for finiteness checks)."""
        return (self.f,)

    def to(self, device) -> SecondMoment:
        """The state on ``device``."""
        return SecondMoment(self.W.to(device), self.f.to(device))
