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

import torch

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
    """Role of every trainable parameter, from the module that first owns it."""
    owner: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if id(p) not in owner:
                owner[id(p)] = _role(module, local, p)
    return {name: owner[id(p)] for name, p in trainable_parameters(model)}


def role_group_ids(role: str, shape: torch.Size) -> tuple[torch.Tensor, int]:
    """Group ids (a LongTensor shaped ``shape``) and group count for a role."""
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
              layout=None) -> dict[str, tuple[torch.Tensor, int]]:
    """``name -> (LongTensor shaped like the parameter, n_groups)`` for every trainable parameter.

    ``groups="heads"`` lets ``fisher_ref.slicing.head_group_ids(model, layout)`` override
    the attention parameters.
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

    ``tensor`` is shaped like the parameter (result ``[n_groups]``) or has extra leading
    axes (``[U, *shape]`` gives ``[U, n_groups]``).
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


def group_fisher(model, batch, *, groups="generic", layout=None, loss_fn=None, unit="sample",
                 weighting="sample", sample_ids=None) -> FisherResult:
    r"""Per-group Fisher statistics for every trainable parameter.

    For group k of a parameter, :math:`f_u[k] = \sum_{p \in k} g_{u,p}^2`; the result holds
    ``mean`` (:math:`= R(F)`), ``variance`` (weighted, population), ``stderr``
    (:math:`\sqrt{\mathrm{variance}/U}`), ``snr`` (mean / stderr) and ``n`` (U), each a
    1-D float64 tensor over the parameter's groups.

    Args:
        model, batch, loss_fn, unit, weighting, sample_ids: as ``empirical_fisher``.
        groups: ``"generic"`` (roles above) or ``"heads"`` (attention parameters per head).
        layout: attention layout for ``groups="heads"`` (``None``: detected).

    Returns:
        FisherResult: parameter name -> dict of the five statistics.
    """
    ids = group_ids(model, groups, layout)
    pu = per_sample_gradients(model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting,
                              sample_ids=sample_ids)
    return group_fisher_of(pu, ids)
