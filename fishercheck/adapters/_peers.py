"""What the peer-library adapters share: a classifier batch split as ``(X, y)`` tensors.

Peer libraries take a model and ``(input, target)`` mini-batches with a torch loss module;
the harness's batches are dicts with ``sample_ids`` and may hold empty rows (label -100),
which every statistic excludes: the adapters drop those rows before the library sees them.
"""

from __future__ import annotations

import copy

import torch


def xy_batches(batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor, list]]:
    """``[(X, y, ids), ...]`` per batch, empty rows (label -100) dropped, empty batches too."""
    out = []
    for b in batches:
        keep = b["labels"] != -100
        if bool(keep.any()):
            ids = [i for i, k in zip(b["sample_ids"], keep.tolist(), strict=True) if k]
            out.append((b["input"][keep], b["labels"][keep], ids))
    return out


def n_rows(parts) -> int:
    """The number of non-empty rows."""
    return sum(int(y.shape[0]) for _, y, _ in parts)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``{name: parameter}`` of the trainable parameters, in ``named_parameters()`` order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy the library may hook or extend (the harness's model stays untouched)."""
    return copy.deepcopy(model)


def check_reduction(loss_fn) -> str:
    """The row reduction of the harness's loss (the peers' own loss takes one label per row,
    where "mean" and "sum" agree).
    """
    return getattr(loss_fn, "reduction", "mean")
