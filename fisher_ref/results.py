"""Result containers shared by every estimator: ``FisherResult`` and ``PerUnit``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fisher_ref._types import SampleId, UnitId


class FisherResult(dict):
    """A ``dict[str, Tensor]`` keyed by parameter name, with the units it was computed from.

    Attributes:
        n_units: U, the number of units (non-empty rows or active tokens) used.
        total_weight: W = sum of the units' weights.
        empty_ids: sample ids of the rows that had no active label token (excluded).
    """

    def __init__(self, data: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), *, n_units: int,
                 total_weight: float, empty_ids: Iterable[SampleId]) -> None:
        super().__init__(data)
        self.n_units = int(n_units)
        self.total_weight = float(total_weight)
        self.empty_ids = list(empty_ids)

    def __repr__(self) -> str:
        return (f"FisherResult({len(self)} parameters, n_units={self.n_units}, "
                f"total_weight={self.total_weight:g}, empty_ids={self.empty_ids!r})")


@dataclass
class PerUnit:
    """Per-unit tensors (gradients or contributions) with the units' ids and weights.

    Attributes:
        tensors: parameter name -> ``Tensor[units, *param_shape]`` (float64, CPU).
        ids: U unit ids: a sample id for ``unit="sample"``, ``(sample_id, position)`` for
            ``unit="token"`` (position in the aligned targets).
        weights: ``Tensor[units]`` float64, w_u.
        empty_ids: sample ids of the excluded empty rows.
    """

    tensors: dict[str, torch.Tensor]
    ids: list[UnitId]
    weights: torch.Tensor
    empty_ids: list[SampleId] = field(default_factory=list)

    @property
    def n_units(self) -> int:
        """U, the number of units."""
        return len(self.ids)

    @property
    def total_weight(self) -> float:
        """W, the sum of the units' weights."""
        return float(self.weights.sum())

    def result(self, data: Mapping[str, Any]) -> FisherResult:
        """Wrap ``data`` in a ``FisherResult`` carrying these units' counts and empty ids."""
        return FisherResult(data, n_units=self.n_units, total_weight=self.total_weight,
                            empty_ids=self.empty_ids)
