"""One batched forward for a chunk of units: each forward row's loss is its unit's loss.

- sample units: the row loss ``loss(model, rows)``; with label draws (mc_fisher), the
  loss's reduction applied to the NLL of the drawn labels at the active positions (one
  column per draw when a row carries several, ``shared_draw_losses``);
- token units: the NLL of the one target at the unit's position (its true label, its drawn
  label, or the enumerated class of exact_fisher, whose weight is multiplied by p_c); a
  token row that carries q classes (``shared_class_losses``) has one loss column per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..batching.label_draws import draw_label_sets, draw_labels
from ..losses import IGNORE_INDEX, reduce_rows, token_nll


def chunk_rows(tensors: dict, rows: torch.Tensor, device) -> dict:
    """The forward batch: row ``rows[j]`` of every tensor, on ``device``."""
    return {k: v.index_select(0, rows.to(v.device)).to(device) for k, v in tensors.items()}


def chunk_losses(model, loss, sub: dict, units, uniforms: torch.Tensor | None):
    """``(losses [n], weights [n] float64 on CPU)`` for the chunk ``units``; for rows that
    carry q label draws (``units.n_draws = q``) the losses are ``[n, q]``, one column per
    draw (their weights: ``units.draw_weights()``).

    ``uniforms [B, T, n_samples]`` are the batch rows' label-draw uniforms (mc_fisher only).
    """
    weights = units.weights
    if units.unit == "sample" and units.draw is None and not units.n_draws:
        return loss(model, sub), weights
    logits, targets = loss.logits_and_targets(model, sub)
    if units.n_draws and units.classes:
        return shared_class_losses(logits, units)
    if units.n_draws:
        return shared_draw_losses(logits, targets, units, uniforms, loss.reduction), weights
    n = logits.shape[0]
    ar = torch.arange(n, device=logits.device)
    if units.unit == "sample":  # drawn labels at every active position
        u = uniforms[units.rows, :, units.draw]  # [n, T] (CPU; moved to the logits' device)
        drawn = draw_labels(logits, u, targets != IGNORE_INDEX, fill=IGNORE_INDEX)
        return reduce_rows(token_nll(logits, drawn), drawn, loss.reduction), weights
    pos = units.pos.to(logits.device)
    z = logits[ar, pos]  # [n, C]
    if units.draw is not None:
        label = draw_labels(z, uniforms[units.rows, units.pos, units.draw])
    elif units.cls is not None:
        label = units.cls.to(z.device)
        p = torch.softmax(z.detach().double(), dim=-1)[ar, label]
        weights = weights * p.cpu()
    else:
        label = targets[ar, pos]
    return F.cross_entropy(z, label, reduction="none"), weights


def shared_class_losses(logits, units):
    """``([n, q], [n, q])``: each token row's NLL of the q classes it carries (classes
    ``units.draw + j``; an index past C repeats class C − 1, whose weight is then 0) and
    their weights ``w p_c`` (float64, on the logits' device), from one forward.
    """
    q, C = units.n_draws, units.total_draws
    ar = torch.arange(logits.shape[0], device=logits.device)
    z = logits[ar, units.pos.to(logits.device)]  # [n, C]
    c = (units.draw[:, None] + torch.arange(q)).clamp(max=C - 1).to(z.device)  # [n, q]
    p = torch.softmax(z.detach().double(), dim=-1).gather(-1, c)
    weights = units.draw_weights().to(device=z.device, dtype=torch.float64) * p
    return -torch.log_softmax(z, dim=-1).gather(-1, c), weights


def shared_draw_losses(logits, targets, units, uniforms, reduction: str) -> torch.Tensor:
    """``[n, q]``: each row's loss under each of the q label draws it carries (draws
    ``units.draw + j``; an index past K repeats draw K − 1, whose weight is then 0), from one
    forward.

    The log-softmax is taken once and the q draws' NLLs gathered from it, so the graph keeps
    one ``[n, T, C]`` tensor whatever q; the q backward passes differ only in which entries
    receive a gradient.
    """
    q, K = units.n_draws, units.total_draws
    k = (units.draw[:, None] + torch.arange(q)).clamp(max=K - 1)  # [n, q]
    if units.unit == "sample":  # drawn labels at every active position
        u = uniforms[units.rows]  # [n, T, K]
        u = u.gather(2, k[:, None, :].expand(-1, u.shape[1], -1))  # [n, T, q]
        active = targets != IGNORE_INDEX  # [n, T]
        drawn = draw_label_sets(logits, u, active)  # [n, T, q], class 0 where inactive
        active = active.unsqueeze(-1)  # [n, T, 1]
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, drawn)  # [n, T, q]
        total = torch.where(active, nll, torch.zeros_like(nll)).sum(dim=1)  # [n, q]
        if reduction == "sum":
            return total
        return total / active.sum(dim=1).clamp(min=1).to(total.dtype)
    ar = torch.arange(logits.shape[0], device=logits.device)
    z = logits[ar, units.pos.to(logits.device)]  # [n, C]
    u = uniforms[units.rows, units.pos].gather(1, k)  # [n, q]
    drawn = draw_label_sets(z, u)  # [n, q]
    return -torch.log_softmax(z, dim=-1).gather(-1, drawn)
