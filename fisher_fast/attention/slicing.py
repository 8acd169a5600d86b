"""QK-OV slices as named-axis views: each block of a layer as ``[..., heads, d_head, d_other]``.

Following TransformerLens, a Q/K/V weight is seen as ``[heads, d_head, d_model]`` (heads =
H for Q, H_kv for K and V) and an O weight as ``[heads, d_head, d_model]`` too (the entries
that multiply head h's output). Every view is a ``torch`` view of the parameter-shaped tensor
(with any leading unit axes), so one reshape + sum gives all per-head reductions, and writing
through a view of a zero mask gives the slice's mask: masks, group ids and reductions share
one piece of index arithmetic.

One packing keeps its query heads on two axes: Falcon's ``fused_grouped`` output axis is
``[H_kv, r + 2, dh]`` (per kv head j: query heads ``j*r .. j*r + r - 1``, then K_j, then
V_j), so its Q view is ``[..., H_kv, r, d_head, d_other]`` (``head_axes_view``); merging the
two head axes into H cannot be a view (the K and V rows sit between the groups), so
``head_view`` returns that merge as a copy, for reading. Masks and group ids write through
``head_axes_view``.

The slice I(l, h, B) of SPEC §4: Q: head h's rows; K, V: kv-head ``h // r`` (r = H / H_kv);
O: head h's input columns of the output projection (rows for a GPT-2 ``Conv1D``). With
``include_bias`` the Q/K/V slices also hold the matching bias entries; the O bias adds to
every head's output and belongs to no head's slice.
"""

from __future__ import annotations

import torch

from ..attention.layouts import AttentionLayout, LayerAttention, attention_layout

BLOCKS = ("Q", "K", "V", "O")


def block_params(la: LayerAttention, block: str, include_bias: bool = False) -> list[tuple[str, str]]:
    """(parameter name, "weight" | "bias") pairs that hold block ``block`` of layer ``la``."""
    _check_block(block)
    w = {"Q": la.q, "K": la.k, "V": la.v, "O": la.o}[block]
    out = [(w, "weight")]
    b = {"Q": la.q_bias, "K": la.k_bias, "V": la.v_bias, "O": None}[block]
    if include_bias and b is not None:
        out.append((b, "bias"))
    return out


def num_block_heads(la: LayerAttention, block: str) -> int:
    """Heads along a block's head axis: H for Q and O, H_kv for K and V."""
    return la.num_kv_heads if block in ("K", "V") else la.num_heads


def kv_index(la: LayerAttention, device=None) -> torch.Tensor:
    """LongTensor[H]: the kv head of each query head, ``h // (H / H_kv)``."""
    return torch.arange(la.num_heads, device=device) // la.group_size


def head_axes(la: LayerAttention, block: str) -> tuple[int, ...]:
    """The head axes of a block's view: ``(H,)`` or ``(H_kv,)``; ``(H_kv, r)`` for the Q of
    ``fused_grouped`` (query head ``j * r + i`` at ``[j, i]``).
    """
    if block == "Q" and la.packing == "fused_grouped":
        return (la.num_kv_heads, la.group_size)
    return (num_block_heads(la, block),)


def head_axes_view(x: torch.Tensor, la: LayerAttention, block: str, part: str) -> torch.Tensor:
    """A view of ``x`` (``[*lead, *param_shape]``) with named per-head axes, always a view.

    Returns:
        weight: ``[*lead, *head_axes, d_head, d_other]``; bias: ``[*lead, *head_axes, d_head]``,
        with ``head_axes(la, block)``; ``d_other`` is d_model (input of Q/K/V, output of O).
    """
    _check_block(block)
    dh = la.head_dim
    if part == "bias":
        if block == "O":
            raise ValueError("head_view: expected a Q/K/V bias, got the O bias (it has no heads).")
        return _block_heads(x, la, block, axis=-1)
    if part != "weight":
        raise ValueError(f"head_view: part expected 'weight' or 'bias', got {part!r}.")
    conv = la.orientation == "conv1d"
    if block == "O":
        rows = x if conv else x.transpose(-1, -2)          # [..., H*dh, d_out]
        return rows.unflatten(-2, (la.num_heads, dh))
    rows = x.transpose(-1, -2) if conv else x               # [..., out, d_in]
    return _block_heads(rows, la, block, axis=-2)


def head_view(x: torch.Tensor, la: LayerAttention, block: str, part: str) -> torch.Tensor:
    """``x`` (``[*lead, *param_shape]``) with one head axis: a view, except for the Q of
    ``fused_grouped`` with H_kv > 1 (a copy: read it, never write through it).

    Returns:
        weight: ``[*lead, heads, d_head, d_other]``; bias: ``[*lead, heads, d_head]``. Heads
        is H for Q/O and H_kv for K/V; ``d_other`` is d_model (input of Q/K/V, output of O).
    """
    v = head_axes_view(x, la, block, part)
    n = len(head_axes(la, block))
    if n == 1:
        return v
    first = v.dim() - (3 if part == "weight" else 2) - (n - 1)
    return v.flatten(first, first + n - 1)


def _block_heads(x: torch.Tensor, la: LayerAttention, block: str, axis: int) -> torch.Tensor:
    """Block Q, K or V of the output axis ``axis`` (negative) split as (heads, d_head): a view."""
    h, hkv, dh = la.num_heads, la.num_kv_heads, la.head_dim
    if la.packing == "separate":
        return x.unflatten(axis, (-1, dh))
    if la.packing == "fused_blocks":
        start = {"Q": 0, "K": h * dh, "V": (h + hkv) * dh}[block]
        size = (h if block == "Q" else hkv) * dh
        return x.narrow(axis, start, size).unflatten(axis, (-1, dh))
    if la.packing == "fused_grouped":
        # Falcon: [H_kv, r + 2, dh]; Q is slots 0..r-1 (two head axes), K slot r, V slot r + 1.
        r = la.group_size
        grouped = x.unflatten(axis, (hkv, r + 2, dh))
        if block == "Q":
            return grouped.narrow(axis - 1, 0, r)
        return grouped.select(axis - 1, r if block == "K" else r + 1)
    # GPT-NeoX: the output axis is [H, 3, dh]; pick the block's index on the middle axis.
    return x.unflatten(axis, (h, 3, dh)).select(axis - 1, "QKV".index(block))


def slice_matrix(tensors: dict, la: LayerAttention, block: str,
                 include_bias: bool = False) -> torch.Tensor:
    """``[*lead, heads, m]``: each head's slice entries of per-unit tensors, flattened.

    ``tensors`` maps parameter names to ``[*lead, *param_shape]``; the slice's weight and
    (optionally) bias entries are concatenated along the last axis.
    """
    parts = []
    for name, part in block_params(la, block, include_bias):
        v = head_view(tensors[name], la, block, part)
        parts.append(v.flatten(-2) if part == "weight" else v)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def per_head_sum(tensors: dict, la: LayerAttention, block: str,
                 include_bias: bool = False) -> torch.Tensor:
    r"""``[*lead, H]``: the sum over each query head's slice I(l, h, B) (K/V shared by kv head).

    .. math:: R_B(x)[h] = \sum_{p \in I(l, h, B)} x[p]
    """
    s = slice_matrix(tensors, la, block, include_bias).sum(-1)
    if block in ("K", "V"):
        s = s.index_select(-1, kv_index(la, s.device))
    return s


def qkov_mask(model: torch.nn.Module, layer: int, head: int, block: str,
              include_bias: bool = False,
              layout: AttentionLayout | dict | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks of the slice I(layer, head, block), for the parameters it touches.

    Args:
        model: the model.
        layer: layer index in ``[0, L)``.
        head: query head in ``[0, H)``; K and V use kv head ``head // (H / H_kv)``.
        block: one of "Q", "K", "V", "O".
        include_bias: also mark the Q/K/V bias entries of the head (the O bias is no head's).
        layout: a declared layout, or None to detect it.

    Returns:
        ``{parameter name: BoolTensor shaped like the parameter}`` (only touched parameters).
    """
    lay = attention_layout(model, layout)
    la = _layer(lay, layer)
    if not isinstance(head, int) or not 0 <= head < la.num_heads:
        raise ValueError(f"head: expected an int in [0, {la.num_heads}), got {head!r}.")
    _check_block(block)
    params = dict(model.named_parameters())
    hb = head // la.group_size if block in ("K", "V") else head
    out: dict[str, torch.Tensor] = {}
    for name, part in block_params(la, block, include_bias):
        m = out.setdefault(name, torch.zeros_like(params[name], dtype=torch.bool))
        axes = head_axes(la, block)
        head_axes_view(m, la, block, part)[tuple(divmod(hb, axes[1]) if len(axes) == 2 else (hb,))] = True
    return out


def head_group_ids(model: torch.nn.Module, layout: AttentionLayout | dict | None = None,
                   ) -> dict[str, tuple[torch.Tensor, int]]:
    """Per-head group ids of every attention parameter (SPEC §3 attention roles).

    Returns:
        ``{name: (LongTensor shaped like the parameter, n_groups)}``. Separate Q/K/V tensors:
        heads ``0..H-1`` (Q) or ``0..H_kv-1`` (K, V); a fused QKV tensor: Q heads ``0..H-1``,
        then K kv-heads ``H..H+H_kv-1``, then V kv-heads. Biases follow their weights. O
        weight: heads ``0..H-1``; O bias: one group (id 0).
    """
    lay = attention_layout(model, layout)
    params = dict(model.named_parameters())
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for la in lay.layers:
        fused = la.packing != "separate"
        offset = {"Q": 0, "K": la.num_heads if fused else 0,
                  "V": la.num_heads + la.num_kv_heads if fused else 0, "O": 0}
        for block in BLOCKS:
            nh = num_block_heads(la, block)
            n_groups = la.num_heads + 2 * la.num_kv_heads if fused and block != "O" else nh
            for name, part in block_params(la, block, include_bias=True):
                ids = out.get(name, (None, 0))[0]
                if ids is None:
                    ids = torch.full(params[name].shape, -1, dtype=torch.long, device=params[name].device)
                v = head_axes_view(ids, la, block, part)
                axes = head_axes(la, block)
                v.copy_((torch.arange(nh, device=ids.device) + offset[block])
                        .view(*axes, *([1] * (v.dim() - len(axes)))).expand_as(v))
                out[name] = (ids, n_groups)
        if la.o_bias is not None:
            out[la.o_bias] = (torch.zeros(params[la.o_bias].shape, dtype=torch.long,
                                          device=params[la.o_bias].device), 1)
    for name, (ids, _) in out.items():
        if bool((ids < 0).any()):
            raise ValueError(f"head_group_ids: the layout leaves entries of {name} in no head; "
                             f"expected it to cover the tensor, got {int((ids < 0).sum())} uncovered.")
    return out


def _layer(lay: AttentionLayout, layer) -> LayerAttention:
    if not isinstance(layer, int) or not 0 <= layer < lay.num_layers:
        raise ValueError(f"layer: expected an int in [0, {lay.num_layers}), got {layer!r}.")
    return lay.layers[layer]


def _check_block(block) -> None:
    if block not in BLOCKS:
        raise ValueError(f"block: expected one of {BLOCKS}, got {block!r}.")
