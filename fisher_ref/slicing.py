r"""QK-OV slices I(l, h, B) and per-head group ids, from an attention layout.

Every projection axis that carries heads is labelled, element by element, with the block
(Q, K, V or O) and the head it belongs to, by named-axes reshapes (no index arithmetic):

- ``separate`` Q: axis ``[H, dh]``; K, V: ``[H_kv, dh]``;
- ``fused_blocks``: ``[Q: H, dh | K: H_kv, dh | V: H_kv, dh]``;
- ``fused_per_head``: ``[H, (Q, K, V), dh]``;
- ``fused_grouped``: ``[H_kv, (Q_0 .. Q_{r-1}, K, V), dh]``: slot i < r of key-value head j
  is query head ``j*r + i``, slot r its key, slot r + 1 its value;
- O weight input axis: ``[H, dh]``.

The Q/K/V axis is the weight's output axis (dim 0 of a Linear ``[out, in]``, dim 1 of a
Conv1D ``[in, out]``) and the bias's only axis; the O axis is the weight's input axis. Then

.. math::

    I(l, h, Q) = \{p : \mathrm{block}(p) = Q,\ \mathrm{head}(p) = h\}, \quad
    I(l, h, K|V) = \{p : \mathrm{block}(p) = K|V,\ \mathrm{head}(p) = \lfloor h / r \rfloor\},

    I(l, h, O) = \{p \in W_O : \mathrm{head}(p) = h\}.

The O bias belongs to no head.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from fisher_ref._types import Masks
from fisher_ref.layouts import AttentionLayout, LayerAttention, attention_layout

BLOCKS = ("Q", "K", "V", "O")


@dataclass(frozen=True)
class AxisRoles:
    """The head-carrying axis of one tensor: per element along it, its block and head.

    Attributes:
        axis: the axis of the tensor that carries the heads.
        block: ``LongTensor[axis_size]``, each element's block (an index into ``BLOCKS``).
        head: ``LongTensor[axis_size]``, each element's query head (Q, O) or key-value head
            (K, V).
    """

    axis: int
    block: torch.Tensor
    head: torch.Tensor


def _heads_axis(n_heads: int, head_dim: int) -> torch.Tensor:
    """Head label of each element of an axis with named axes ``[head, dh]``."""
    return torch.arange(n_heads)[:, None].expand(n_heads, head_dim).reshape(-1)


def _constant(value: int, n: int) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.long)


def _qkv_labels(la: LayerAttention) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weight name -> (block, head) labels along its Q/K/V output axis."""
    H, kv, dh = la.num_heads, la.num_kv_heads, la.head_dim
    if la.packing == "separate":
        return {la.q: (_constant(0, H * dh), _heads_axis(H, dh)),
                la.k: (_constant(1, kv * dh), _heads_axis(kv, dh)),
                la.v: (_constant(2, kv * dh), _heads_axis(kv, dh))}
    if la.packing == "fused_blocks":
        block = torch.cat([_constant(0, H * dh), _constant(1, kv * dh), _constant(2, kv * dh)])
        head = torch.cat([_heads_axis(H, dh), _heads_axis(kv, dh), _heads_axis(kv, dh)])
        return {la.q: (block, head)}
    if la.packing == "fused_grouped":
        # named axes [kv head j, slot i, dh]: slots 0..r-1 query heads j*r + i, then K, then V
        r = la.group_size
        j = torch.arange(kv)[:, None, None].expand(kv, r + 2, dh)
        i = torch.arange(r + 2)[None, :, None].expand(kv, r + 2, dh)
        block = torch.where(i < r, 0, torch.where(i == r, 1, 2)).reshape(-1)
        head = torch.where(i < r, j * r + i, j).reshape(-1)
        return {la.q: (block, head)}
    # fused_per_head: named axes [head, qkv, dh]
    block = torch.arange(3)[None, :, None].expand(H, 3, dh).reshape(-1)
    head = torch.arange(H)[:, None, None].expand(H, 3, dh).reshape(-1)
    return {la.q: (block, head)}


def axis_roles(la: LayerAttention, *, include_bias: bool = True) -> dict[str, AxisRoles]:
    """Every head-carrying tensor of layer ``la``: Q/K/V weights (and biases), O weight.

    Args:
        la: the layer.
        include_bias: include the Q/K/V biases.

    Returns:
        Parameter name -> its :class:`AxisRoles`.
    """
    out_axis = 0 if la.orientation == "linear" else 1
    roles = {}
    bias_of = {la.q: la.q_bias, la.k: la.k_bias, la.v: la.v_bias}
    for name, (block, head) in _qkv_labels(la).items():
        roles[name] = AxisRoles(out_axis, block, head)
        if include_bias and bias_of[name] is not None:
            roles[bias_of[name]] = AxisRoles(0, block, head)
    H, dh = la.num_heads, la.head_dim
    roles[la.o] = AxisRoles(1 - out_axis, _constant(3, H * dh), _heads_axis(H, dh))
    return roles


def _spread(labels: torch.Tensor, axis: int, shape: torch.Size) -> torch.Tensor:
    """Broadcast a label vector along ``axis`` to ``shape`` (a fresh tensor)."""
    if len(shape) == 1:
        return labels.clone()
    view = [1] * len(shape)
    view[axis] = -1
    return labels.view(view).expand(shape).clone()


def check_head_block(la: LayerAttention, head: object, block: object) -> None:
    """``head`` in [0, H) and ``block`` in BLOCKS, else ValueError."""
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < la.num_heads:
        raise ValueError(f"head: expected an integer in [0, {la.num_heads}) for layer "
                         f"{la.index}, got {head!r}.")
    if block not in BLOCKS:
        raise ValueError(f"block: expected one of {BLOCKS}, got {block!r}.")


def slice_masks(la: LayerAttention, head: int, block: str, shapes: Mapping[str, Sequence[int]],
                include_bias: bool = False) -> Masks:
    """I(l, h, B) as boolean masks over the tensors it touches, from shapes alone.

    Args:
        la: the layer.
        head: query head h.
        block: "Q", "K", "V" or "O".
        shapes: parameter name -> shape (``torch.Size`` or tuple) for the layer's tensors.
        include_bias: also mark the Q/K/V bias entries (never the O bias).

    Returns:
        ``{parameter name: BoolTensor[*param_shape]}``, only the tensors the slice touches.
    """
    check_head_block(la, head, block)
    b = BLOCKS.index(block)
    target = la.kv_head(head) if block in ("K", "V") else head
    masks = {}
    for name, roles in axis_roles(la, include_bias=include_bias).items():
        if name not in shapes:
            raise ValueError(f"{name}: expected the shape of this attention tensor (a trainable "
                             f"parameter), got none: frozen tensors have no gradient to slice"
                             f"{'; include_bias=False leaves the biases out' if include_bias else ''}.")
        shape = torch.Size(shapes[name])
        if shape[roles.axis] != roles.block.numel():
            raise ValueError(f"{name}: expected {roles.block.numel()} entries along axis "
                             f"{roles.axis} (heads x head_dim), got shape {tuple(shape)}.")
        sel = (roles.block == b) & (roles.head == target)
        if sel.any():
            masks[name] = _spread(sel, roles.axis, shape)
    return masks


def _shapes(model) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in model.named_parameters()}


def qkov_mask(model: torch.nn.Module, layer: int, head: int, block: str,
              include_bias: bool = False, layout: AttentionLayout | dict | None = None) -> Masks:
    r"""The slice I(l, h, B) as ``{parameter name: bool mask}`` over the tensors it touches.

    Q: the entries producing head h's query; K, V: those of key-value head
    :math:`\lfloor h / r \rfloor`; O: the output-projection entries multiplying head h's
    attention output (columns of a Linear, rows of a Conv1D). With ``include_bias`` the
    Q/K/V bias entries of the same head join; the O bias belongs to no head and is never
    included.

    Args:
        model: the model.
        layer: l in [0, L).
        head: h in [0, H).
        block: "Q", "K", "V" or "O".
        include_bias: add Q/K/V bias entries.
        layout: a declared layout (see :func:`attention_layout`); None detects it.

    Returns:
        ``{parameter name: BoolTensor[*param_shape]}``, only the parameters the slice touches.
    """
    lay = layout if isinstance(layout, AttentionLayout) else attention_layout(model, layout)
    return slice_masks(lay.layer(layer), head, block, _shapes(model), include_bias)


def group_ids_of_layer(la: LayerAttention,
                       shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[torch.Tensor, int]]:
    """Per-head group ids of one layer's attention tensors (see :func:`head_group_ids`)."""
    H, kv = la.num_heads, la.num_kv_heads
    fused = la.packing != "separate"
    offset = torch.tensor([0, H, H + kv, 0]) if fused else torch.zeros(4, dtype=torch.long)
    out = {}
    for name, roles in axis_roles(la, include_bias=True).items():
        labels = offset[roles.block] + roles.head
        if fused and name != la.o:
            n = H + 2 * kv
        else:
            n = H if int(roles.block[0]) in (0, 3) else kv
        out[name] = (_spread(labels, roles.axis, torch.Size(shapes[name])), n)
    if la.o_bias is not None:
        out[la.o_bias] = (torch.zeros(torch.Size(shapes[la.o_bias]), dtype=torch.long), 1)
    return out


def head_group_ids(model: torch.nn.Module,
                   layout: AttentionLayout | dict | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """Per-head group ids for every attention tensor: ``name -> (LongTensor[*param_shape], n)``.

    Order (docs/architecture.md): a fused Q/K/V tensor has Q heads ``0..H-1``, then K
    kv-heads ``H..H+H_kv-1``, then V kv-heads; separate Q/K/V tensors number their own
    heads from 0. The O weight has heads ``0..H-1``; the O bias is one group. Q/K/V biases
    follow their weights.
    """
    lay = layout if isinstance(layout, AttentionLayout) else attention_layout(model, layout)
    shapes = _shapes(model)
    out = {}
    for la in lay.layers:
        out.update(group_ids_of_layer(la, shapes))
    return out


def all_slices(layout: AttentionLayout) -> Iterator[tuple[int, int, str]]:
    """Every (layer, head, block) in the order blocks, then layers, then heads."""
    for block in BLOCKS:
        for la in layout.layers:
            for h in range(la.num_heads):
                yield la.index, h, block
