"""Type aliases of the oracle's public signatures.

Shapes are named in the docstrings, TransformerLens style: ``Tensor[batch, pos]``,
``Tensor[units, *param_shape]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: A batch: a dict of tensors with a leading batch axis (``input_ids: Tensor[batch, pos]``,
#: ``attention_mask``, ``labels`` with ignore index -100, ...), optionally ``sample_ids``
#: (a sequence of str or int, one per row).
Batch = dict[str, Any]

#: A per-row loss ``loss_fn(model, batch) -> Tensor[batch]``: each row's loss from one
#: batched forward (SPEC §0).
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]

#: The caller's id of one row.
SampleId = str | int

#: The id of one unit: a sample id (``unit="sample"``) or ``(sample_id, position)``
#: (``unit="token"``, the position in the aligned targets).
UnitId = SampleId | tuple[SampleId, int]

#: ``{parameter name: BoolTensor[*param_shape]}``: the entries of a slice or group.
Masks = dict[str, torch.Tensor]
