"""What a task has accumulated: moment states and bookkeeping, merged only on commit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..stats.micro_batches import MicroBatchState


@dataclass
class TaskState:
    """Everything a task has accumulated: counts, weights, empty ids and moment states."""

    n_units: int = 0
    n_rows: int = 0  # rows seen (empty ones included): the default id offset
    total_weight: float = 0.0
    sum_w2: float = 0.0  # Σ w_u², for the reliability-weighted unbiased variance
    empty_ids: list = field(default_factory=list)
    moments: dict = field(default_factory=dict)  # name -> Moments (per element)
    group_moments: dict = field(default_factory=dict)  # name -> Moments (per group)
    micro: dict = field(default_factory=dict)  # b -> {name -> MicroBatchState}

    def merged(self, other: TaskState, in_place: bool = False) -> TaskState:
        """``self`` followed by ``other`` (micro-batch states: ``other``'s, which continue
        ``self``'s). ``in_place``: merge into ``self``'s tensors (only for a state nobody
        else holds, e.g. a batch's delta while it is being built).
        """
        def merge(a: dict, b: dict) -> dict:
            return {k: (a[k].merge_(b[k]) if in_place else a[k].merge(b[k]))
                    if k in a and k in b else a[k] if k in a else b[k] for k in {**a, **b}}
        return TaskState(
            self.n_units + other.n_units, self.n_rows + other.n_rows,
            self.total_weight + other.total_weight, self.sum_w2 + other.sum_w2,
            self.empty_ids + other.empty_ids, merge(self.moments, other.moments),
            merge(self.group_moments, other.group_moments),
            other.micro if other.micro else self.micro)

    def to(self, device: torch.device | str) -> TaskState:
        """The same state with every tensor on ``device``."""
        def mv(m):
            return m.to(device)

        def mb(s):
            return MicroBatchState(s.b, s.closed.to(device), s.open_sum.to(device),
                                   s.open_w.to(device), s.seen)

        return TaskState(self.n_units, self.n_rows, self.total_weight, self.sum_w2,
                         list(self.empty_ids), {k: mv(v) for k, v in self.moments.items()},
                         {k: mv(v) for k, v in self.group_moments.items()},
                         {b: {k: mb(v) for k, v in d.items()} for b, d in self.micro.items()})
