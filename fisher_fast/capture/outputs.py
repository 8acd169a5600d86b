"""The tensors of a module's output, whatever its structure, and the output rebuilt from
replaced tensors: what lets the capture hook each output of a module that returns a tuple,
a dict, a dataclass or an HF ``ModelOutput`` (an MoE router, experts).
"""

from __future__ import annotations

import dataclasses

import torch


def tensor_leaves(output) -> list[torch.Tensor]:
    """The tensors of a module's output, in a fixed order: the output itself, or the
    tensors of a tuple, list, dict, dataclass or HF ``ModelOutput`` (depth first).
    """
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        items = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [getattr(output, f.name) for f in dataclasses.fields(output)]
    else:
        return []
    return [t for item in items for t in tensor_leaves(item)]


def with_leaves(output, leaves):
    """``output`` with its tensors (in ``tensor_leaves`` order) taken from ``leaves``."""
    if isinstance(output, torch.Tensor):
        return next(leaves)
    if isinstance(output, dict):
        new = {k: with_leaves(v, leaves) for k, v in output.items()}
        if type(output) is dict:
            return new
        for k, v in new.items():  # an HF ModelOutput keeps its class and attributes
            output[k] = v
        return output
    if isinstance(output, (tuple, list)):
        items = [with_leaves(v, leaves) for v in output]
        return type(output)(items) if not hasattr(output, "_fields") else type(output)(*items)
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return dataclasses.replace(output, **{f.name: with_leaves(getattr(output, f.name), leaves)
                                              for f in dataclasses.fields(output)})
    return output
