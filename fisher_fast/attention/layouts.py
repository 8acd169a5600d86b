"""Attention layouts: which parameter tensors hold each layer's Q, K, V and O heads.

A layout is read from the model's modules (GPT-2; LLaMA / Mistral / Qwen2 / Qwen3 / Gemma /
Gemma-2 / StarCoder2 / StableLM; OPT, GPT-J; Falcon, Bloom, GPT-NeoX; BERT; Phi-3; torch's
``nn.MultiheadAttention``) or declared by hand, and always checked against the tensors'
shapes. Nothing here computes a statistic; ``fisher_fast.attention.slicing`` turns a layout
into per-head views. A model with no attention heads (Mamba, RWKV, an MLP) gets one error
saying so and naming what applies to it instead.

Packings (output axis of the projection, ``dh`` = head_dim, ``H`` query heads, ``H_kv``
key/value heads):

====================  =====================================================
``"separate"``        q, k, v distinct tensors: ``[H*dh]``, ``[H_kv*dh]``, ``[H_kv*dh]``
``"fused_blocks"``    one tensor ``[Q: H*dh | K: H_kv*dh | V: H_kv*dh]`` (GPT-2, Phi-3, MHA)
``"fused_per_head"``  one tensor ``[H, 3, dh]`` (GPT-NeoX, Bloom, Falcon-RW; needs H_kv = H)
``"fused_grouped"``   one tensor ``[H_kv, r + 2, dh]``: per kv head its r query heads, its K,
                      its V (Falcon's new decoder architecture; r = H / H_kv)
====================  =====================================================

Orientation ``"linear"`` stores weights ``[out, in]``; ``"conv1d"`` (HF ``Conv1D``, GPT-2)
stores ``[in, out]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

PACKINGS = ("separate", "fused_blocks", "fused_per_head", "fused_grouped")
ORIENTATIONS = ("linear", "conv1d")
_NAME_FIELDS = ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias")
_DECLARED_FIELDS = ("module", "o_module", "packing", "orientation", *_NAME_FIELDS,
                    "num_heads", "num_kv_heads", "head_dim")
_OPTIONAL_FIELDS = ("q_bias", "k_bias", "v_bias", "o_bias")
_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_OUT_PROJ_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
_LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "starcoder2", "stablelm")
_OUT_PROJ_FAMILIES = ("opt", "gptj")  # not BART/Whisper: their cross-attention looks the same
# token mixers with no attention heads, by class name
_HEADLESS = {"MambaMixer": "Mamba selective scan", "Mamba2Mixer": "Mamba-2 state-space mixer",
             "FalconMambaMixer": "Falcon-Mamba selective scan",
             "RwkvSelfAttention": "RWKV time mixing, a recurrence without heads"}


@dataclass(frozen=True)
class LayerAttention:
    """One attention layer: parameter names (as ``named_parameters()`` gives them) and shape."""

    index: int
    module: str
    o_module: str
    kind: str
    packing: str
    orientation: str
    q: str
    k: str
    v: str
    o: str
    q_bias: str | None
    k_bias: str | None
    v_bias: str | None
    o_bias: str | None
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """R = H / H_kv: query heads per key/value head (HF ``repeat_kv``)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class AttentionLayout:
    """The attention layers of a model, in forward order."""

    kind: str
    layers: tuple[LayerAttention, ...]

    @property
    def num_layers(self) -> int:
        """L, the number of attention layers."""
        return len(self.layers)


_HOW_TO_DECLARE = (
    "Declare it with attention_layout(model, layout={'layers': [{'q': ..., 'k': ..., 'v': ..., "
    "'o': ..., 'packing': 'separate'|'fused_blocks'|'fused_per_head'|'fused_grouped', "
    "'orientation': 'linear'|'conv1d', 'num_heads': H, 'num_kv_heads': H_kv, 'head_dim': dh, "
    "'module': attention module path, 'o_module': output projection path, "
    "optional 'q_bias', 'k_bias', 'v_bias', 'o_bias'}, ...]})."
)


def attention_layout(model: torch.nn.Module,
                     layout: AttentionLayout | dict | None = None) -> AttentionLayout:
    """The model's attention layout, detected from its modules or declared, checked against shapes.

    Args:
        model: any ``torch.nn.Module``.
        layout: ``None`` (detect), an ``AttentionLayout``, or a dict
            ``{"layers": [{field: value, ...}, ...]}`` with the fields of ``LayerAttention``
            except ``index`` and ``kind``.

    Returns:
        The ``AttentionLayout``; every tensor named in it exists and has the shape its
        packing, orientation and head counts imply.

    Raises:
        ValueError: an unsupported model (naming the attention-like modules found and how to
            declare a layout), a model without attention heads (saying which estimators
            apply to it), an unknown or missing declared field, or a shape mismatch.
    """
    names = _param_names(model)
    if layout is None:
        out = _detect(model, names)
    elif isinstance(layout, AttentionLayout):
        out = layout
    elif isinstance(layout, dict):
        out = _from_dict(layout)
    else:
        raise ValueError(
            f"layout: expected None, an AttentionLayout or a dict, got {type(layout).__name__}."
        )
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for la in out.layers:
        _check_layer(la, params)
        for f in ("module", "o_module"):
            if getattr(la, f) not in modules:
                raise ValueError(f"Attention layer {la.index}: {f} expected a module path of the "
                                 f"model, got {getattr(la, f)!r}.")
    return out


def _param_names(model) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _pname(names: dict[int, str], module, attr: str) -> str | None:
    p = getattr(module, attr, None)
    if p is None:
        return None
    return names.get(id(p))


def _detect(model, names) -> AttentionLayout:
    found: list[dict] = []
    mods = dict(model.named_modules())
    for path, mod in mods.items():
        entry = _read_module(path, mod, mods, names)
        if entry is not None:
            found.append(entry)
    if not found:
        raise _no_layout_error(model, mods)
    kinds = {e["kind"] for e in found}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    layers = tuple(LayerAttention(index=i, **e) for i, e in enumerate(found))
    return AttentionLayout(kind=kind, layers=layers)


def _no_layout_error(model, mods) -> ValueError:
    """Attention modules no reader knows (declare the layout), or no attention heads at all."""
    headless = [f"{p} ({type(m).__name__}: {_HEADLESS[type(m).__name__]})"
                for p, m in mods.items() if type(m).__name__ in _HEADLESS]
    suspects = sorted({f"{p} ({type(m).__name__})" for p, m in mods.items()
                       if type(m).__name__ not in _HEADLESS
                       and ("attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower())})
    if suspects:
        return ValueError(
            f"Unsupported model {type(model).__name__}: expected GPT-2, LLaMA-family (LLaMA, "
            f"Mistral, Qwen2/3, Gemma/Gemma-2, StarCoder2, StableLM), OPT, GPT-J, Falcon, Bloom, "
            f"BERT, GPT-NeoX, Phi-3 or torch nn.MultiheadAttention attention modules, got "
            f"{', '.join(suspects[:8])}. {_HOW_TO_DECLARE}"
        )
    where = (f"its sequence mixing is {headless[0]}" + (f" and {len(headless) - 1} more like it"
                                                        if len(headless) > 1 else "")
             if headless else "no module whose class name mentions attention")
    declare = "" if headless else f" If it has attention heads under other names: {_HOW_TO_DECLARE}"
    return ValueError(
        f"{type(model).__name__} has no attention heads ({where}): expected a model with "
        f"attention heads for attention_layout, qkov_mask, head_group_ids, "
        f"group_fisher(groups='heads'), interference and conflicts(groups='heads'), which do not "
        f"apply to it. What applies: every estimator that needs no heads (empirical_fisher, "
        f"mean_gradient, squared_mean_gradient, gradient_variance, batch_squared_gradient, "
        f"mc_fisher, exact_fisher, per_sample_gradients, per_sample_contributions, "
        f"group_fisher(groups='generic'), conflicts(groups='parameters'), FisherAccumulator).{declare}"
    )


def _model_type(mod, mods) -> str | None:
    """The ``model_type`` of the module's config, else of the model's (Bloom's attention has none)."""
    config = getattr(mod, "config", None) or getattr(mods.get(""), "config", None)
    return getattr(config, "model_type", None)


def _entry(path, o_path, kind, packing, orientation, q, k, v, o, qb, kb, vb, ob, h, hkv, dh):
    return dict(module=path, o_module=o_path, kind=kind, packing=packing, orientation=orientation,
                q=q, k=k, v=v, o=o, q_bias=qb, k_bias=kb, v_bias=vb, o_bias=ob,
                num_heads=int(h), num_kv_heads=int(hkv), head_dim=int(dh))


def _read_module(path, mod, mods, names) -> dict | None:
    """One recognised attention module's layout entry, or None."""
    join = (lambda s: f"{path}.{s}") if path else (lambda s: s)
    if isinstance(mod, torch.nn.MultiheadAttention):
        return _torch_mha(path, mod, names, join)
    if hasattr(mod, "c_attn") and hasattr(mod, "c_proj") and hasattr(mod, "head_dim"):
        if hasattr(mod, "q_attn") or getattr(mod, "is_cross_attention", False):
            return None  # cross-attention is not a layer of the layout (docs/definitions.md)
        w = _pname(names, mod.c_attn, "weight")
        b = _pname(names, mod.c_attn, "bias")
        dh = mod.head_dim
        h = mod.c_attn.weight.shape[1] // (3 * dh)
        return _entry(path, join("c_proj"), "gpt2", "fused_blocks", "conv1d", w, w, w,
                      _pname(names, mod.c_proj, "weight"), b, b, b,
                      _pname(names, mod.c_proj, "bias"), h, h, dh)
    if all(hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
        family = getattr(getattr(mod, "config", None), "model_type", None)
        family = family if family in _LLAMA_FAMILIES else "llama"
        return _separate(path, join("o_proj"), family, mod, names, _LLAMA_PROJECTIONS)
    if (all(hasattr(mod, a) for a in (*_OUT_PROJ_PROJECTIONS, "head_dim"))
            and _model_type(mod, mods) in _OUT_PROJ_FAMILIES):
        return _separate(path, join("out_proj"), _model_type(mod, mods), mod, names,
                         _OUT_PROJ_PROJECTIONS)
    if hasattr(mod, "qkv_proj") and hasattr(mod, "o_proj") and hasattr(mod, "head_dim"):
        dh, hkv = mod.head_dim, mod.num_key_value_heads
        h = mod.qkv_proj.weight.shape[0] // dh - 2 * hkv
        w, b = _pname(names, mod.qkv_proj, "weight"), _pname(names, mod.qkv_proj, "bias")
        return _entry(path, join("o_proj"), "phi3", "fused_blocks", "linear", w, w, w,
                      _pname(names, mod.o_proj, "weight"), b, b, b,
                      _pname(names, mod.o_proj, "bias"), h, hkv, dh)
    if hasattr(mod, "query_key_value") and hasattr(mod, "dense") and hasattr(mod, "new_decoder_architecture"):
        return _falcon(path, mod, names, join)
    if hasattr(mod, "query_key_value") and hasattr(mod, "dense") and _model_type(mod, mods) == "bloom":
        h, dh = mod.num_heads, mod.head_dim
        w, b = _pname(names, mod.query_key_value, "weight"), _pname(names, mod.query_key_value, "bias")
        return _entry(path, join("dense"), "bloom", "fused_per_head", "linear", w, w, w,
                      _pname(names, mod.dense, "weight"), b, b, b,
                      _pname(names, mod.dense, "bias"), h, h, dh)
    if hasattr(mod, "query_key_value") and hasattr(mod, "dense") and hasattr(mod, "head_size"):
        dh = mod.head_size
        h = mod.query_key_value.weight.shape[0] // (3 * dh)
        w, b = _pname(names, mod.query_key_value, "weight"), _pname(names, mod.query_key_value, "bias")
        return _entry(path, join("dense"), "gpt_neox", "fused_per_head", "linear", w, w, w,
                      _pname(names, mod.dense, "weight"), b, b, b,
                      _pname(names, mod.dense, "bias"), h, h, dh)
    if all(hasattr(mod, a) for a in ("query", "key", "value", "attention_head_size")):
        parent_path = path.rsplit(".", 1)[0] if "." in path else ""
        if "Cross" in type(mod).__name__ or getattr(mods.get(parent_path), "is_cross_attention", False):
            return None  # cross-attention is skipped
        out = getattr(mods.get(parent_path), "output", None)
        dense = getattr(out, "dense", None)
        if dense is None:
            raise ValueError(
                f"{path}: found BERT-style query/key/value but no sibling output.dense at "
                f"{parent_path!r}. {_HOW_TO_DECLARE}"
            )
        dh = mod.attention_head_size
        h = mod.query.weight.shape[0] // dh
        pre = f"{parent_path}.output.dense" if parent_path else "output.dense"
        return _entry(path, pre, "bert", "separate", "linear",
                      *(_pname(names, getattr(mod, a), "weight") for a in ("query", "key", "value")),
                      _pname(names, dense, "weight"),
                      *(_pname(names, getattr(mod, a), "bias") for a in ("query", "key", "value")),
                      _pname(names, dense, "bias"), h, h, dh)
    return None


def _separate(path, o_path, family, mod, names, projections) -> dict:
    """A layer with separate q/k/v Linears and an output Linear named ``projections``."""
    dh = mod.head_dim
    q, k = getattr(mod, projections[0]), getattr(mod, projections[1])
    return _entry(path, o_path, family, "separate", "linear",
                  *(_pname(names, getattr(mod, a), "weight") for a in projections),
                  *(_pname(names, getattr(mod, a), "bias") for a in projections),
                  q.weight.shape[0] // dh, k.weight.shape[0] // dh, dh)


def _falcon(path, mod, names, join) -> dict:
    """Falcon's ``query_key_value`` as its forward splits it: the new decoder architecture
    groups rows per kv head ``[H_kv, r + 2, dh]``; the old one is multi-query
    ``[Q: H | K: 1 | V: 1]`` or, without ``multi_query``, per head ``[H, 3, dh]``.
    """
    h, dh = mod.num_heads, mod.head_dim
    if mod.new_decoder_architecture:
        packing, hkv = "fused_grouped", mod.num_kv_heads
    elif mod.multi_query:
        packing, hkv = "fused_blocks", 1
    else:
        packing, hkv = "fused_per_head", h
    w, b = _pname(names, mod.query_key_value, "weight"), _pname(names, mod.query_key_value, "bias")
    return _entry(path, join("dense"), "falcon", packing, "linear", w, w, w,
                  _pname(names, mod.dense, "weight"), b, b, b, _pname(names, mod.dense, "bias"),
                  h, hkv, dh)


def _torch_mha(path, mod, names, join) -> dict:
    """The entry of a torch ``nn.MultiheadAttention``: ``in_proj_weight`` ``[3E, E]`` = ``[Q | K | V]`` rows,
    each ``[H, dh]``; ``out_proj`` a Linear whose input axis is ``[H, dh]``.
    """
    if not mod._qkv_same_embed_dim:
        raise ValueError(
            f"{path or 'model'}: nn.MultiheadAttention with kdim/vdim != embed_dim keeps separate "
            f"q/k/v_proj_weight but one fused in_proj_bias, which no packing describes; expected "
            f"a fused in_proj_weight. {_HOW_TO_DECLARE}"
        )
    w, b = _pname(names, mod, "in_proj_weight"), _pname(names, mod, "in_proj_bias")
    return _entry(path, join("out_proj"), "torch_mha", "fused_blocks", "linear", w, w, w,
                  _pname(names, mod.out_proj, "weight"), b, b, b,
                  _pname(names, mod.out_proj, "bias"), mod.num_heads, mod.num_heads, mod.head_dim)


def _from_dict(layout: dict) -> AttentionLayout:
    if set(layout) != {"layers"}:
        raise ValueError(f"Declared layout: expected the one key 'layers', got {sorted(layout)}.")
    if not isinstance(layout["layers"], (list, tuple)) or not layout["layers"]:
        raise ValueError(f"Declared layout: expected a non-empty list of layers, got {layout['layers']!r}.")
    kind = "declared"
    layers = []
    for i, d in enumerate(layout["layers"]):
        if not isinstance(d, dict):
            raise ValueError(f"Declared layer {i}: expected a dict, got {type(d).__name__}.")
        extra = sorted(set(d) - set(_DECLARED_FIELDS))
        missing = sorted(set(_DECLARED_FIELDS) - set(_OPTIONAL_FIELDS) - set(d))
        if extra or missing:
            raise ValueError(
                f"Declared layer {i}: expected fields {list(_DECLARED_FIELDS)}, got unknown "
                f"{extra} and missing {missing}."
            )
        full = {f: d.get(f) for f in _DECLARED_FIELDS}
        layers.append(LayerAttention(index=i, kind=kind, **full))
    return AttentionLayout(kind=kind, layers=tuple(layers))


def qkv_out_sizes(la: LayerAttention) -> tuple[int, int, int]:
    """Output sizes of the Q, K and V projections: H*dh, H_kv*dh, H_kv*dh."""
    return (la.num_heads * la.head_dim, la.num_kv_heads * la.head_dim,
            la.num_kv_heads * la.head_dim)


def _check_layer(la: LayerAttention, params: dict) -> None:
    where = f"Attention layer {la.index}"
    if la.packing not in PACKINGS:
        raise ValueError(f"{where}: packing expected one of {PACKINGS}, got {la.packing!r}.")
    if la.orientation not in ORIENTATIONS:
        raise ValueError(f"{where}: orientation expected one of {ORIENTATIONS}, got {la.orientation!r}.")
    for f in ("num_heads", "num_kv_heads", "head_dim"):
        v = getattr(la, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{where}: {f} expected a positive int, got {v!r}.")
    if la.num_heads % la.num_kv_heads:
        raise ValueError(f"{where}: num_heads must be a multiple of num_kv_heads, got "
                         f"{la.num_heads} and {la.num_kv_heads}.")
    for f in _NAME_FIELDS:
        name = getattr(la, f)
        if name is None and f in ("q", "k", "v", "o"):
            raise ValueError(f"{where}: {f} expected a parameter name, got None.")
        if name is not None and name not in params:
            raise ValueError(f"{where}: {f} expected a parameter of the model, got {name!r}.")
    fused = la.packing != "separate"
    if fused and not (la.q == la.k == la.v and la.q_bias == la.k_bias == la.v_bias):
        raise ValueError(f"{where}: packing {la.packing!r} expected q == k == v (one fused tensor), "
                         f"got {la.q!r}, {la.k!r}, {la.v!r}.")
    if not fused and len({la.q, la.k, la.v}) != 3:
        raise ValueError(f"{where}: packing 'separate' expected three distinct q, k, v tensors, "
                         f"got {la.q!r}, {la.k!r}, {la.v!r}.")
    biases = [b for b in (la.q_bias, la.k_bias, la.v_bias) if b is not None]
    if not fused and len(set(biases)) != len(biases):
        raise ValueError(f"{where}: packing 'separate' expected distinct q, k, v biases, got "
                         f"{la.q_bias!r}, {la.k_bias!r}, {la.v_bias!r}.")
    if la.packing == "fused_per_head" and la.num_kv_heads != la.num_heads:
        raise ValueError(f"{where}: 'fused_per_head' expected num_kv_heads == num_heads, got "
                         f"{la.num_kv_heads} and {la.num_heads}.")
    sq, sk, sv = qkv_out_sizes(la)
    conv = la.orientation == "conv1d"
    d_in = _shape(params, la.q)[0 if conv else -1]
    outs = [(la.q, sq + sk + sv)] if fused else [(la.q, sq), (la.k, sk), (la.v, sv)]
    for name, n_out in outs:
        want = (d_in, n_out) if conv else (n_out, d_in)
        _expect(where, name, _shape(params, name), want)
    bias_outs = ([(la.q_bias, sq + sk + sv)] if fused
                 else [(la.q_bias, sq), (la.k_bias, sk), (la.v_bias, sv)])
    for name, n_out in bias_outs:
        if name is not None:
            _expect(where, name, _shape(params, name), (n_out,))
    o_shape = _shape(params, la.o)
    d_out = o_shape[-1] if conv else o_shape[0]
    _expect(where, la.o, o_shape, (sq, d_out) if conv else (d_out, sq))
    if la.o_bias is not None:
        _expect(where, la.o_bias, _shape(params, la.o_bias), (d_out,))


def _shape(params, name) -> tuple[int, ...]:
    return tuple(params[name].shape)


def _expect(where, name, got, want) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{where}: shape mismatch for {name}: expected {tuple(want)}, got {tuple(got)}.")


def layer_fields() -> tuple[str, ...]:
    """The field names of ``LayerAttention`` (for reports and declared layouts)."""
    return tuple(f.name for f in fields(LayerAttention))
