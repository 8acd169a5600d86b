"""Units of docs/architecture.md: which batch row each unit comes from, its weight and id.

``unit="sample"``: one unit per non-empty row, in row order, id = sample id,
w = 1 (``weighting="sample"``) or K_i (``weighting="token"``).
``unit="token"``: one unit per active aligned target position, row-major, id =
``(sample_id, position)``, w = 1. A token unit becomes its own forward row (its row of the
batch, repeated), whose loss is that token's NLL, so token units need no other machinery.

``with_shared_draws`` and ``draw_layout`` let each forward row of ``mc_fisher`` carry a
block of its unit's label draws (one forward, one backward per draw in the block);
``with_shared_classes`` does the same for the C classes that ``exact_fisher`` enumerates
(draw k is class k, weighted by its probability at run time). ``with_draws`` and
``with_classes`` expand units instead: one forward row per label draw or class (tiny
models, where a backward pass is cheap only when it holds many rows; locating a non-finite
gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..losses import IGNORE_INDEX, has_token_protocol


@dataclass
class Units:
    """The units of one batch (or chunk): the forward row of each, weight, id, draws."""

    unit: str  # "sample" | "token"
    rows: torch.Tensor  # [U] row of the batch each unit's forward row copies
    weights: torch.Tensor  # [U] float64
    ids: list
    empty_ids: list
    pos: torch.Tensor | None = None  # [U] aligned target position (token units)
    draw: torch.Tensor | None = None  # [U] the row's label draw, or its first (mc_fisher)
    cls: torch.Tensor | None = None  # [U] enumerated class (exact_fisher)
    total_draws: int = 0  # K label draws per unit (mc_fisher)
    n_draws: int = 0  # > 0: each row carries draws draw .. draw + n_draws - 1 (those < K)
    classes: bool = False  # the K "draws" are the K classes, enumerated (exact_fisher)

    def draw_weights(self) -> torch.Tensor:
        """Each row's weight ``[U]``, or ``[U, n_draws]`` per carried draw (0 for a draw
        index past K, which a row's block of draws may reach at its unit's end).
        """
        if not self.n_draws:
            return self.weights
        valid = (self.draw[:, None] + torch.arange(self.n_draws)) < self.total_draws
        return self.weights[:, None] * valid

    def __len__(self) -> int:
        return int(self.rows.numel())

    def take(self, start: int, stop: int) -> Units:
        """Units ``start:stop``."""
        def cut(t):
            return None if t is None else t[start:stop]
        return replace(self, rows=self.rows[start:stop], weights=self.weights[start:stop],
                       ids=self.ids[start:stop], pos=cut(self.pos), draw=cut(self.draw),
                       cls=cut(self.cls))


def aligned_targets(loss, model, tensors: dict) -> torch.Tensor:
    """The loss's aligned targets ``[B, T]``: from the labels when the loss says how,
    otherwise from a no-grad ``logits_and_targets`` call.
    """
    if hasattr(loss, "targets"):
        return loss.targets(tensors)
    with torch.no_grad():
        return loss.logits_and_targets(model, tensors)[1]


def plan_units(model, tensors: dict, ids: list, loss, unit: str, weighting: str,
               allow_empty: bool = False) -> Units:
    """The units of a batch; empty rows are dropped and listed; no unit left is an error
    (unless ``allow_empty``: a streaming update may consist of empty rows only).
    """
    B = len(ids)
    if has_token_protocol(loss):
        counts = loss.token_counts(tensors).to("cpu").long()
    else:
        counts = torch.ones(B, dtype=torch.long)
    empty = [ids[i] for i, c in enumerate(counts.tolist()) if c == 0]  # lists: no per-element tensors
    if unit == "sample":
        rows = torch.nonzero(counts > 0).flatten()
        w = counts[rows].double() if weighting == "token" else torch.ones(len(rows), dtype=torch.float64)
        out = Units("sample", rows, w, [ids[r] for r in rows.tolist()], empty)
    else:
        targets = aligned_targets(loss, model, tensors).to("cpu")
        rows, pos = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
        out = Units("token", rows, torch.ones(len(rows), dtype=torch.float64),
                    [(ids[r], t) for r, t in zip(rows.tolist(), pos.tolist(), strict=True)], empty, pos=pos)
    if len(out) == 0 and not allow_empty:
        raise ValueError(f"batch: expected at least one non-empty row, got {B} empty rows "
                         f"(ids {empty}).")
    return out


def with_draws(units: Units, n_samples: int) -> Units:
    """Each unit repeated ``n_samples`` times (unit-major), tagged with its draw index."""
    k = torch.arange(n_samples).repeat(len(units))
    rep = lambda t: None if t is None else t.repeat_interleave(n_samples)  # noqa: E731
    return replace(units, rows=rep(units.rows), weights=rep(units.weights),
                   ids=[i for i in units.ids for _ in range(n_samples)], pos=rep(units.pos),
                   draw=k)


def with_shared_draws(units: Units, n_samples: int) -> Units:
    """Ask for ``n_samples`` label draws per unit, laid out on forward rows by the engine
    (``draw_layout``) once it knows how many rows a chunk holds.
    """
    return replace(units, total_draws=n_samples)


def with_shared_classes(units: Units, n_classes: int) -> Units:
    """Ask for each token unit's ``n_classes`` classes as draws 0 .. C − 1 (exact_fisher),
    laid out on forward rows like label draws (``draw_layout``).
    """
    return replace(units, total_draws=n_classes, classes=True)


def draw_layout(units: Units, rows_per_chunk: int, rows_per_pass: int = 1) -> Units:
    r"""Forward rows for the K draws of U units, given that a chunk holds at most c rows and
    that a backward pass should hold at least m rows to amortise its fixed cost.

    Each unit becomes r = max(1, min(K, ⌈m / U⌉, ⌊c / U⌋)) rows, each carrying a block of
    q = ⌈K / r⌉ consecutive draws: one forward per row, then q backward passes. Sharing a
    forward saves work (K − 1 forwards per unit when r = 1), but each extra backward pass
    costs its fixed overhead, so rows are replicated only until a pass holds m rows (tiny
    models: every draw its own row, ``with_draws``; real models: r = 1).
    """
    K, U = units.total_draws, len(units)
    r = max(1, min(K, -(-rows_per_pass // max(U, 1)), rows_per_chunk // max(U, 1)))
    q = -(-K // r)
    if q == 1:
        flat = replace(units, total_draws=0, classes=False)
        return with_classes(flat, K) if units.classes else with_draws(flat, K)
    r = -(-K // q)
    rep = lambda t: None if t is None else t.repeat_interleave(r)  # noqa: E731
    return replace(units, rows=rep(units.rows), weights=rep(units.weights),
                   ids=[i for i in units.ids for _ in range(r)], pos=rep(units.pos),
                   draw=torch.arange(r).repeat(U) * q, n_draws=q)


def unshared(units: Units) -> Units:
    """The same draws as one forward row per (unit, draw), in order (``with_draws``)."""
    if not units.n_draws:
        return units
    q, n = units.n_draws, len(units)
    d = units.draw.repeat_interleave(q) + torch.arange(q).repeat(n)
    keep = d < units.total_draws
    idx = torch.arange(n).repeat_interleave(q)[keep]
    take = lambda t: None if t is None else t[idx]  # noqa: E731
    draw, cls = (None, d[keep]) if units.classes else (d[keep], take(units.cls))
    return replace(units, rows=take(units.rows), weights=take(units.weights),
                   ids=[units.ids[i] for i in idx.tolist()], pos=take(units.pos),
                   draw=draw, cls=cls, n_draws=0, total_draws=0, classes=False)


def with_classes(units: Units, n_classes: int) -> Units:
    """Each token unit repeated once per class c (unit-major); weights are scaled by p_c at
    run time.
    """
    c = torch.arange(n_classes).repeat(len(units))
    rep = lambda t: None if t is None else t.repeat_interleave(n_classes)  # noqa: E731
    return replace(units, rows=rep(units.rows), weights=rep(units.weights),
                   ids=[i for i in units.ids for _ in range(n_classes)], pos=rep(units.pos),
                   cls=c)
