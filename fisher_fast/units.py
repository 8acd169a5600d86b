"""Units of docs/architecture.md: which batch row each unit comes from, its weight and id.

``unit="sample"``: one unit per non-empty row, in row order, id = sample id,
w = 1 (``weighting="sample"``) or K_i (``weighting="token"``).
``unit="token"``: one unit per active aligned target position, row-major, id =
``(sample_id, position)``, w = 1. A token unit becomes its own forward row (its row of the
batch, repeated), whose loss is that token's NLL, so token units need no other machinery.

``with_draws`` and ``with_classes`` expand units further for ``mc_fisher`` (one unit per
label draw) and ``exact_fisher`` (one unit per vocabulary class, weighted by its probability
at run time).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .losses import IGNORE_INDEX, has_token_protocol


@dataclass
class Units:
    unit: str  # "sample" | "token"
    rows: torch.Tensor  # [U] row of the batch each unit's forward row copies
    weights: torch.Tensor  # [U] float64
    ids: list
    empty_ids: list
    pos: torch.Tensor | None = None  # [U] aligned target position (token units)
    draw: torch.Tensor | None = None  # [U] index of the label draw (mc_fisher)
    cls: torch.Tensor | None = None  # [U] enumerated class (exact_fisher)

    def __len__(self) -> int:
        return int(self.rows.numel())

    def take(self, start: int, stop: int) -> "Units":
        cut = (lambda t: None if t is None else t[start:stop])
        return replace(self, rows=self.rows[start:stop], weights=self.weights[start:stop],
                       ids=self.ids[start:stop], pos=cut(self.pos), draw=cut(self.draw),
                       cls=cut(self.cls))


def aligned_targets(loss, model, tensors: dict) -> torch.Tensor:
    """The loss's aligned targets ``[B, T]``: from the labels when the loss says how,
    otherwise from a no-grad ``logits_and_targets`` call."""
    if hasattr(loss, "targets"):
        return loss.targets(tensors)
    with torch.no_grad():
        return loss.logits_and_targets(model, tensors)[1]


def plan_units(model, tensors: dict, ids: list, loss, unit: str, weighting: str,
               allow_empty: bool = False) -> Units:
    """The units of a batch; empty rows are dropped and listed; no unit left is an error
    (unless ``allow_empty``: a streaming update may consist of empty rows only)."""
    B = len(ids)
    if has_token_protocol(loss):
        counts = loss.token_counts(tensors).to("cpu").long()
    else:
        counts = torch.ones(B, dtype=torch.long)
    empty = [ids[i] for i in range(B) if counts[i] == 0]
    if unit == "sample":
        rows = torch.nonzero(counts > 0).flatten()
        w = counts[rows].double() if weighting == "token" else torch.ones(len(rows), dtype=torch.float64)
        out = Units("sample", rows, w, [ids[int(r)] for r in rows], empty)
    else:
        targets = aligned_targets(loss, model, tensors).to("cpu")
        rows, pos = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
        out = Units("token", rows, torch.ones(len(rows), dtype=torch.float64),
                    [(ids[int(r)], int(t)) for r, t in zip(rows, pos)], empty, pos=pos)
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


def with_classes(units: Units, n_classes: int) -> Units:
    """Each token unit repeated once per class c (unit-major); weights are scaled by p_c at
    run time."""
    c = torch.arange(n_classes).repeat(len(units))
    rep = lambda t: None if t is None else t.repeat_interleave(n_classes)  # noqa: E731
    return replace(units, rows=rep(units.rows), weights=rep(units.weights),
                   ids=[i for i in units.ids for _ in range(n_classes)], pos=rep(units.pos),
                   cls=c)
