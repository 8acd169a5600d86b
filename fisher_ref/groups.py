r"""Parameter roles, group ids and group statistics (SPEC §3).

A group reduction R sums the elements of each group of a parameter tensor. It is linear,
and the group values of any tensor sum to the tensor's total. Generic roles:

========================  =============================================
role                      groups
========================  =============================================
torch ``Linear`` weight   one per output unit: row ``[out, in]``
HF ``Conv1D`` weight      one per output unit: column ``[in, out]``
bias                      one per element
``Embedding`` weight      one per row
norm weight / bias        one per element (any module whose class name contains "Norm")
anything else             one group per tensor
========================  =============================================

With ``groups="heads"``, the attention parameters' groups come from
``fisher_ref.slicing.head_group_ids`` (one per head) and override these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fisher_ref._types import Batch, LossFn, SampleId
from fisher_ref.layouts import AttentionLayout
from fisher_ref.results import FisherResult, PerUnit
from fisher_ref.units import per_sample_gradients, trainable_parameters

GROUPINGS = ("generic", "heads")


def _role(module: torch.nn.Module, local_name: str, param: torch.Tensor) -> str:
    cls = type(module).__name__
    if cls == "Conv1D" and local_name == "weight" and param.dim() == 2:
        return "conv1d"  # transformers.pytorch_utils.Conv1D, detected by name
    if isinstance(module, torch.nn.Linear) and local_name == "weight":
        return "linear"
    if isinstance(module, torch.nn.Embedding) and local_name == "weight":
        return "embedding"
    if "Norm" in cls:
        return "norm"
    if local_name == "bias":
        return "bias"
    return "other"


def parameter_roles(model: torch.nn.Module) -> dict[str, str]:
    """Role of every trainable parameter, from the module that first owns it.

    Returns:
        Parameter name -> ``"linear"``, ``"conv1d"``, ``"embedding"``, ``"norm"``, ``"bias"``
        or ``"other"`` (the table in the module docstring).
    """
    owner: dict[int, str] = {}
    for _, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if id(p) not in owner:
                owner[id(p)] = _role(module, local, p)
    return {name: owner[id(p)] for name, p in trainable_parameters(model)}


def role_group_ids(role: str, shape: torch.Size) -> tuple[torch.Tensor, int]:
    """Group ids and group count for a role.

    Args:
        role: a role of :func:`parameter_roles`.
        shape: ``param_shape``.

    Returns:
        ``(ids, n_groups)``: ``LongTensor[*param_shape]`` with values in ``[0, n_groups)``.
    """
    numel = 1
    for s in shape:
        numel *= s
    if role in ("linear", "embedding"):  # rows
        ids = torch.arange(shape[0]).reshape(-1, *[1] * (len(shape) - 1)).expand(shape)
        return ids.contiguous(), shape[0]
    if role == "conv1d":  # columns: Conv1D weight is [in, out]
        return torch.arange(shape[1]).expand(shape).contiguous(), shape[1]
    if role in ("bias", "norm"):
        return torch.arange(numel).reshape(shape), numel
    return torch.zeros(shape, dtype=torch.long), 1


def group_ids(model: torch.nn.Module, groups: str = "generic",
              layout: AttentionLayout | dict | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """``name -> (LongTensor[*param_shape], n_groups)`` for every trainable parameter.

    ``groups="heads"`` lets ``fisher_ref.slicing.head_group_ids(model, layout)`` override
    the attention parameters.

    Args:
        model: the model.
        groups: ``"generic"`` (the roles of the module docstring) or ``"heads"``.
        layout: attention layout for ``groups="heads"`` (None: detected); must be None with
            ``groups="generic"``.
    """
    if groups not in GROUPINGS:
        raise ValueError(f"groups: expected one of {GROUPINGS}, got {groups!r}.")
    if groups == "generic" and layout is not None:
        raise ValueError("layout: expected None with groups='generic', got a layout.")
    shapes = {name: p.shape for name, p in trainable_parameters(model)}
    out = {name: role_group_ids(role, shapes[name]) for name, role in parameter_roles(model).items()}
    if groups == "heads":
        from fisher_ref.slicing import head_group_ids  # the attention half

        out.update({k: v for k, v in head_group_ids(model, layout).items() if k in out})
    return out


def reduce_groups(tensor: torch.Tensor, ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    r"""Group sums :math:`R(x)[k] = \sum_{p:\, \mathrm{id}(p) = k} x_p`.

    Args:
        tensor: ``Tensor[*lead, *param_shape]``, e.g. ``Tensor[*param_shape]`` or
            ``Tensor[units, *param_shape]``.
        ids: ``LongTensor[*param_shape]``, each entry's group.
        n_groups: the number of groups.

    Returns:
        ``Tensor[*lead, n_groups]`` (``Tensor[units, *param_shape]`` gives
        ``Tensor[units, n_groups]``).
    """
    lead = tensor.dim() - ids.dim()
    if lead < 0 or tuple(tensor.shape[lead:]) != tuple(ids.shape):
        raise ValueError(f"reduce_groups: expected a tensor ending in shape {tuple(ids.shape)}, "
                         f"got {tuple(tensor.shape)}.")
    head = tensor.shape[:lead]
    flat = tensor.reshape(-1, ids.numel())
    out = torch.zeros(flat.shape[0], n_groups, dtype=tensor.dtype)
    out.index_add_(1, ids.reshape(-1), flat)
    return out.reshape(*head, n_groups)


def group_fisher_of(pu: PerUnit, ids: dict[str, tuple[torch.Tensor, int]]) -> FisherResult:
    r"""Group statistics from per-unit gradients.

    With :math:`f_u = R(g_u^2)`: mean :math:`= \sum_u w_u f_u / W = R(F)`, variance
    :math:`= \sum_u w_u (f_u - \mathrm{mean})^2 / W`, stderr :math:`= \sqrt{\mathrm{var}/U}`,
    snr = mean / stderr (inf where stderr = 0 < mean, nan where both are 0), n = U.

    Args:
        pu: per-unit gradients, ``Tensor[units, *param_shape]`` per parameter.
        ids: parameter name -> ``(LongTensor[*param_shape], n_groups)`` (:func:`group_ids`).

    Returns:
        FisherResult: parameter name -> ``{"mean", "variance", "stderr", "snr", "n"}``,
        each ``Tensor[n_groups]``.
    """
    w, W, U = pu.weights, pu.weights.sum(), pu.n_units
    out = {}
    for name, g in pu.tensors.items():
        gid, n = ids[name]
        f = reduce_groups(g.square(), gid, n)  # [U, n]
        mean = (w[:, None] * f).sum(0) / W
        var = (w[:, None] * (f - mean).square()).sum(0) / W
        stderr = (var / U).sqrt()
        out[name] = {"mean": mean, "variance": var, "stderr": stderr, "snr": mean / stderr,
                     "n": torch.full((n,), U, dtype=torch.long)}
    return pu.result(out)


def group_fisher(model: torch.nn.Module, batch: Batch, *, groups: str = "generic",
                 layout: AttentionLayout | dict | None = None, loss_fn: LossFn | None = None,
                 unit: str = "sample", weighting: str = "sample",
                 sample_ids: Sequence[SampleId] | None = None) -> FisherResult:
    r"""Per-group Fisher statistics for every trainable parameter.

    For group k of a parameter, :math:`f_u[k] = \sum_{p \in k} g_{u,p}^2`; the result holds
    ``mean`` (:math:`= R(F)`), ``variance`` (weighted, population), ``stderr``
    (:math:`\sqrt{\mathrm{variance}/U}`), ``snr`` (mean / stderr) and ``n`` (U), each a
    1-D float64 tensor ``Tensor[n_groups]`` over the parameter's groups.

    Args:
        model: any ``torch.nn.Module`` (copied to float64; never modified).
        batch: dict of tensors ``Tensor[batch, ...]``, optionally ``sample_ids``.
        groups: ``"generic"`` (roles above) or ``"heads"`` (attention parameters per head).
        layout: attention layout for ``groups="heads"`` (``None``: detected).
        loss_fn: per-row loss; ``None`` means ``causal_lm_loss`` (``reduction="mean"``).
        unit: ``"sample"`` or ``"token"``.
        weighting: ``"sample"`` (w = 1) or ``"token"`` (w = K_i for sample units).
        sample_ids: row ids, unless the batch carries them.

    Returns:
        FisherResult: parameter name -> dict of the five statistics.
    """
    ids = group_ids(model, groups, layout)
    pu = per_sample_gradients(model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting,
                              sample_ids=sample_ids)
    return group_fisher_of(pu, ids)
