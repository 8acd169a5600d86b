"""One batched forward for a chunk of units: each forward row's loss is its unit's loss.

- sample units: the row loss ``loss(model, rows)``; with label draws (mc_fisher), the
  loss's reduction applied to the NLL of the drawn labels at the active positions;
- token units: the NLL of the one target at the unit's position (its true label, its drawn
  label, or the enumerated class of exact_fisher, whose weight is multiplied by p_c).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .label_draws import draw_labels
from .losses import IGNORE_INDEX, reduce_rows, token_nll


def chunk_rows(tensors: dict, rows: torch.Tensor, device) -> dict:
    """The forward batch: row ``rows[j]`` of every tensor, on ``device``."""
    return {k: v.index_select(0, rows.to(v.device)).to(device) for k, v in tensors.items()}


def chunk_losses(model, loss, sub: dict, units, uniforms: torch.Tensor | None):
    """``(losses [n], weights [n] float64 on CPU)`` for the chunk ``units``.

    ``uniforms [B, T, n_samples]`` are the batch rows' label-draw uniforms (mc_fisher only).
    """
    weights = units.weights
    if units.unit == "sample" and units.draw is None:
        return loss(model, sub), weights
    logits, targets = loss.logits_and_targets(model, sub)
    n = logits.shape[0]
    ar = torch.arange(n, device=logits.device)
    if units.unit == "sample":  # drawn labels at every active position
        u = uniforms[units.rows, :, units.draw]  # [n, T]
        drawn = draw_labels(logits, u).to(targets.device)
        drawn = torch.where(targets != IGNORE_INDEX, drawn, torch.full_like(drawn, IGNORE_INDEX))
        return reduce_rows(token_nll(logits, drawn), drawn, loss.reduction), weights
    pos = units.pos.to(logits.device)
    z = logits[ar, pos]  # [n, C]
    if units.draw is not None:
        label = draw_labels(z, uniforms[units.rows, units.pos, units.draw]).to(z.device)
    elif units.cls is not None:
        label = units.cls.to(z.device)
        p = torch.softmax(z.detach().double(), dim=-1)[ar, label]
        weights = weights * p.cpu()
    else:
        label = targets[ar, pos]
    return F.cross_entropy(z, label, reduction="none"), weights
