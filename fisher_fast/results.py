"""Result containers shared by every estimator (docs/architecture.md "Results"), and the
type aliases of the public signatures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

#: A per-row loss: ``loss_fn(model, batch) -> Tensor[rows]`` (the built-in losses also
#: offer the token-loss protocol, docs/architecture.md).
LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]
#: Sample ids, one per row: str or int ids, or an int tensor / array of them.
SampleIds = Sequence[int | str] | torch.Tensor


class FisherResult(dict):
    """``dict[str, Tensor]`` keyed by parameter name, with the run's bookkeeping.

    Attributes:
        n_units: number of units U that entered the statistic.
        total_weight: W = sum of the unit weights.
        empty_ids: sample ids of the rows that had no active label token (dropped).
    """

    def __init__(self, tensors: dict | Iterable = (), *, n_units: int = 0, total_weight: float = 0.0,
                 empty_ids: list | None = None) -> None:
        super().__init__(tensors)
        self.n_units = int(n_units)
        self.total_weight = float(total_weight)
        self.empty_ids = list(empty_ids or [])

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) if hasattr(v, "shape") else type(v).__name__
                  for k, v in self.items()}
        return (f"FisherResult(n_units={self.n_units}, total_weight={self.total_weight}, "
                f"empty_ids={self.empty_ids}, tensors={shapes})")


@dataclass
class PerUnit:
    """Per-unit tensors: ``tensors[name]`` is ``[U, *param.shape]``; row u belongs to ``ids[u]``.

    ``ids`` are sample ids (``unit="sample"``) or ``(sample_id, position)`` pairs
    (``unit="token"``); ``weights`` are the w_u of docs/architecture.md; ``empty_ids`` lists the
    dropped empty rows.
    """

    tensors: dict[str, torch.Tensor]
    ids: list
    weights: torch.Tensor
    empty_ids: list = field(default_factory=list)
