"""Group layouts of docs/architecture.md "Groups" and the reduction R of g² to groups.

``generic_groups(params, roles)`` assigns each parameter the group kind of its role: Linear weight
rows (``"rows"``), HF Conv1D weight columns (``"columns"``), bias / norm elements
(``"elements"``), embedding rows (``"rows"``), anything else one group (``"single"``);
``"ids"`` carries an explicit LongTensor of group ids shaped like the parameter (attention
heads). ``reduce_squares`` computes f_u = R(g_u²) for a slice of rows without changing the
group order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupSpec:
    """How a parameter's entries fall into groups: by ``kind`` (rows, columns, elements, one
    group) or by explicit ``ids`` (a LongTensor shaped like the parameter).
    """

    kind: str  # "rows" | "columns" | "elements" | "single" | "ids"
    n_groups: int
    ids: torch.Tensor | None = None  # for kind == "ids"


def _spec(kind: str, shape, ids=None, n=None) -> GroupSpec:
    if kind == "rows":
        return GroupSpec(kind, shape[0] if len(shape) else 1)
    if kind == "columns":
        return GroupSpec(kind, shape[1])
    if kind == "elements":
        return GroupSpec(kind, int(torch.Size(shape).numel()))
    if kind == "single":
        return GroupSpec(kind, 1)
    return GroupSpec("ids", int(n), ids)


def generic_groups(params: dict, roles: dict) -> dict[str, GroupSpec]:
    """The default group of every parameter in ``params`` (``{name: Tensor}``), from the role
    of the module that holds it first (``roles``: ``{name: Role}`` of the capture plan,
    ``fisher_fast.capture.plan.Role``).
    """
    specs = {}
    for n, p in params.items():
        role = roles.get(n)
        if role is None:
            kind = "single"
        elif role.attr == "bias" or role.rule in ("layernorm", "rmsnorm") or "Norm" in role.module_type:
            kind = "elements"
        elif role.rule in ("linear", "embedding") and role.attr == "weight":
            kind = "rows"
        elif role.rule == "conv1d" and role.attr == "weight":
            kind = "columns"
        else:
            kind = "single"
        specs[n] = _spec(kind, tuple(p.shape))
    return specs


def ids_spec(ids: torch.Tensor, n_groups: int) -> GroupSpec:
    """A spec of explicit group ids ``LongTensor[*param_shape]`` in ``0..n_groups-1``."""
    return _spec("ids", None, ids=ids.long(), n=n_groups)


def group_ids_tensor(spec: GroupSpec, shape) -> torch.Tensor:
    """The LongTensor of group ids shaped like the parameter that ``spec`` describes."""
    shape = tuple(shape)
    if spec.kind == "ids":
        return spec.ids
    idx = torch.arange(int(torch.Size(shape).numel())).reshape(shape)
    if spec.kind == "rows":
        return idx // max(int(torch.Size(shape[1:]).numel()), 1)
    if spec.kind == "columns":
        return (idx % shape[1]) if len(shape) == 2 else idx
    if spec.kind == "elements":
        return idx
    return torch.zeros(shape, dtype=torch.long)


def reduce_squares(spec: GroupSpec, g: torch.Tensor) -> torch.Tensor:
    """F = R(g²) per row: ``g [s, *shape] -> [s, n_groups]``."""
    sq = g.square()
    s = sq.shape[0]
    if spec.kind == "rows":
        return sq.reshape(s, spec.n_groups, -1).sum(-1)
    if spec.kind == "columns":
        return sq.sum(1)
    if spec.kind == "elements":
        return sq.reshape(s, -1)
    if spec.kind == "single":
        return sq.reshape(s, -1).sum(-1, keepdim=True)
    ids = spec.ids.to(g.device).reshape(-1)
    out = torch.zeros((s, spec.n_groups), dtype=g.dtype, device=g.device)
    return out.index_add_(1, ids, sq.reshape(s, -1))


def reduce_squares_pairs(spec: GroupSpec, rows: torch.Tensor, cols: torch.Tensor,
                         values: torch.Tensor, n: int, shape) -> torch.Tensor:
    """F = R(g²) per row, ``[n, n_groups]``, of per-row tensors ``[n, *shape]`` given as
    distinct (row, index along axis 0) pairs with ``values [P, *shape[1:]]`` (zero
    elsewhere; see ``Moments.of_pairs``).
    """
    sq = values.square().reshape(values.shape[0], -1)
    G = spec.n_groups
    out = torch.zeros(n * G, dtype=values.dtype, device=values.device)
    if spec.kind == "rows":
        return out.index_add_(0, rows * shape[0] + cols, sq.sum(-1)).view(n, G)
    ids = group_ids_tensor(spec, shape).to(values.device).reshape(shape[0], -1)[cols]
    return out.index_add_(0, (rows[:, None] * G + ids).reshape(-1), sq.reshape(-1)).view(n, G)


GROUPINGS = ("generic", "heads")


def resolve_groups(model: torch.nn.Module, groups="generic", layout=None, *,
                   roles: dict) -> dict[str, GroupSpec]:
    """Group specs of every trainable parameter.

    Args:
        roles: ``{name: Role}`` from the capture plan (``build_plan(model).roles``).
        groups: ``"generic"`` (roles above), ``"heads"`` (attention parameters one group per
            head, from ``fisher_fast.attention.slicing.head_group_ids``; the rest generic), or a dict
            ``{name: (LongTensor ids shaped like the parameter, n_groups)}`` overriding the
            generic groups of the parameters it names.
        layout: attention layout for ``"heads"`` (``None``: detected).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    specs = generic_groups(params, roles)
    if isinstance(groups, dict):
        override = groups
    elif groups == "heads":
        from ..attention import slicing  # the attention half; imported only when asked for

        # heads of frozen attention tensors are not estimated (as for any frozen parameter)
        override = {n: v for n, v in slicing.head_group_ids(model, layout).items() if n in specs}
    elif groups == "generic":
        if layout is not None:
            raise ValueError("layout: expected None with groups='generic', got a layout.")
        override = {}
    else:
        raise ValueError(f"groups: expected one of {GROUPINGS} or a dict of group ids, got {groups!r}.")
    for name, value in override.items():
        if name not in specs:
            raise ValueError(f"groups: expected trainable parameter names, got {name!r}.")
        ids, n = value
        shape = dict(model.named_parameters())[name].shape
        if tuple(ids.shape) != tuple(shape):
            raise ValueError(f"groups[{name!r}]: expected ids of shape {tuple(shape)}, "
                             f"got {tuple(ids.shape)}.")
        specs[name] = ids_spec(ids, n)
    return specs


def axis_map(spec: GroupSpec, shape, out_axis: int):
    """``(axis, group of each unit)`` when the groups of a 2-D weight depend on one axis only
    (``"out"``: the output units, ``"in"``: the input units), else ``None``. Such groups can
    be computed from per-unit norms (Gram products) and summed into groups.
    """
    if len(shape) != 2:
        return None
    in_axis = 1 - out_axis
    if spec.kind in ("rows", "columns"):
        axis = 0 if spec.kind == "rows" else 1
        return ("out" if axis == out_axis else "in"), torch.arange(shape[axis])
    if spec.kind != "ids":
        return None
    ids = spec.ids
    for axis, name in ((out_axis, "out"), (in_axis, "in")):
        first = ids.select(1 - axis, 0)  # the ids along `axis`, at index 0 of the other
        if bool((ids == first.unsqueeze(1 - axis)).all()):
            return name, first
    return None
