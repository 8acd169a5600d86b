r"""Attention layouts: which parameter tensors hold each layer's Q, K, V and O, and how.

A layout says, per attention layer, where the query/key/value/output projections live
(full ``named_parameters()`` names), how Q/K/V are packed along the projection's output
axis, whether weights are ``[out, in]`` (``torch.nn.Linear``) or ``[in, out]`` (HF
``Conv1D``), and the head counts. Heads follow the HF ``repeat_kv`` convention: query head
:math:`h` reads key-value head :math:`\mathrm{kv}(h) = \lfloor h / r \rfloor`,
:math:`r = H / H_{kv}`.

Packings of the Q/K/V output axis (size ``H*dh + 2*H_kv*dh``):

- ``"separate"``: three tensors, each ``[heads, dh]`` (LLaMA, Mistral, Qwen2, BERT);
- ``"fused_blocks"``: one tensor ``[Q: H, dh | K: H_kv, dh | V: H_kv, dh]`` (GPT-2, Phi-3,
  torch's ``nn.MultiheadAttention`` ``in_proj_weight``);
- ``"fused_per_head"``: one tensor ``[H, 3, dh]`` (GPT-NeoX, Bloom, Falcon-RW; ``H_kv == H``);
- ``"fused_grouped"``: one tensor ``[H_kv, r + 2, dh]``, per key-value head j its r query
  heads ``j*r .. j*r + r - 1``, then its key, then its value (Falcon's new decoder
  architecture; with r = 1 it is ``fused_per_head``).

The output projection's input axis is ``[H, dh]`` (head h at ``h*dh:(h+1)*dh``).

Detection reads the model's own modules (their names, types and head sizes) and config;
anything else is declared by hand and checked against the tensors' shapes. Whether a
layout is *semantically* right is checked by :mod:`fisher_ref.semantic_check`. A model
without attention heads (Mamba, RWKV, a plain MLP) gets one error that says so and names
what still applies (every estimator that needs no heads).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

PACKINGS = ("separate", "fused_blocks", "fused_per_head", "fused_grouped")
LLAMA_KINDS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "starcoder2", "stablelm")
OUT_PROJ_KINDS = ("opt", "gptj")
ORIENTATIONS = ("linear", "conv1d")
DECLARED_FIELDS = ("module", "o_module", "packing", "orientation", "q", "k", "v", "o",
                   "q_bias", "k_bias", "v_bias", "o_bias", "num_heads", "num_kv_heads", "head_dim")
_OPTIONAL = ("q_bias", "k_bias", "v_bias", "o_bias")
_DECLARE_HINT = (
    "declare the layout: attention_layout(model, layout={'layers': [{'module': ..., "
    "'o_module': ..., 'packing': 'separate'|'fused_blocks'|'fused_per_head'|'fused_grouped', "
    "'orientation': 'linear'|'conv1d', 'q': ..., 'k': ..., 'v': ..., 'o': ..., "
    "'q_bias': ..., 'k_bias': ..., 'v_bias': ..., 'o_bias': ..., 'num_heads': H, "
    "'num_kv_heads': H_kv, 'head_dim': dh}, ...]}) with full named_parameters() names "
    "(biases may be None), then check it with fisher_ref.validate_layout"
)


@dataclass(frozen=True)
class LayerAttention:
    """One attention layer: its modules, parameter names, packing and head sizes.

    Attributes:
        index: layer index l (position in the layout).
        module: path of the attention module (its output is ``(output, probabilities)``).
        o_module: path of the output projection module; its input is ``[..., H * dh]``.
        kind: the family (``"gpt2"``, ``"llama"`` and its kin of ``LLAMA_KINDS``, ``"bert"``,
            ``"gpt_neox"``, ``"phi3"``, ``"opt"``, ``"gptj"``, ``"falcon"``, ``"bloom"``,
            ``"torch_mha"``, ``"declared"``).
        packing: ``"separate"``, ``"fused_blocks"``, ``"fused_per_head"`` or
            ``"fused_grouped"``.
        orientation: ``"linear"`` (weight ``[out, in]``) or ``"conv1d"`` (``[in, out]``).
        q, k, v, o: weight names (fused packings: ``q == k == v``).
        q_bias, k_bias, v_bias, o_bias: bias names or None.
        num_heads: H. num_kv_heads: H_kv (divides H). head_dim: dh.
    """

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
        """R = H / H_kv, the query heads per key-value head."""
        return self.num_heads // self.num_kv_heads

    def kv_head(self, head: int) -> int:
        """kv(h) = floor(h / r)."""
        return head // self.group_size

    def weight(self, block: str) -> str:
        """The weight name of block ``"Q"``, ``"K"``, ``"V"`` or ``"O"``."""
        return {"Q": self.q, "K": self.k, "V": self.v, "O": self.o}[block]

    def bias(self, block: str) -> str | None:
        """The bias name of a block (None when absent)."""
        return {"Q": self.q_bias, "K": self.k_bias, "V": self.v_bias, "O": self.o_bias}[block]


@dataclass(frozen=True)
class AttentionLayout:
    """The attention layers of a model, in order. ``kind`` names the family or ``"declared"``."""

    kind: str
    layers: tuple[LayerAttention, ...]

    @property
    def num_layers(self) -> int:
        """L, the number of attention layers."""
        return len(self.layers)

    def layer(self, index: int) -> LayerAttention:
        """Layer ``index``, with a clear error when it is out of range."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.layers):
            raise ValueError(f"layer: expected an integer in [0, {len(self.layers)}), got {index!r}.")
        return self.layers[index]

    def parameter_names(self) -> set[str]:
        """Every parameter name any layer's Q/K/V/O (weights and biases) uses."""
        out = set()
        for la in self.layers:
            out.update(n for n in (la.q, la.k, la.v, la.o, la.q_bias, la.k_bias, la.v_bias,
                                   la.o_bias) if n is not None)
        return out


# ---------------------------------------------------------------------------- detection


def _config_of(model, module):
    return getattr(module, "config", None) or getattr(model, "config", None)


def _heads(config, *, gqa: bool) -> tuple[int, int]:
    H = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None) if gqa else None
    return H, int(kv) if kv else H


def _head_dim(module, config, H: int, attr: str) -> int:
    """The head size the module's forward uses; else the config's ``head_dim``; else d / H."""
    value = getattr(module, attr, None)
    if value is None:
        value = getattr(config, "head_dim", None) or config.hidden_size // H
    return int(value)


def _gpt2(path, module, model):
    names = {n for n, _ in module.named_children()}
    if not {"c_attn", "c_proj"} <= names or "q_attn" in names:
        return None
    if not all(type(getattr(module, c)).__name__ == "Conv1D" for c in ("c_attn", "c_proj")):
        return None
    config = _config_of(model, module)
    H, _ = _heads(config, gqa=False)
    return _fused(path, "c_attn", "c_proj", kind="gpt2", packing="fused_blocks",
                  orientation="conv1d", heads=H, kv_heads=H,
                  head_dim=_head_dim(module, config, H, "head_dim"))


def _fused(path, qkv, o, *, kind, packing, orientation, heads, kv_heads, head_dim) -> dict:
    """The entry of a layer whose Q, K and V live in one tensor ``{path}.{qkv}``."""
    w, b = f"{path}.{qkv}.weight", f"{path}.{qkv}.bias"
    return dict(module=path, o_module=f"{path}.{o}", kind=kind, packing=packing,
                orientation=orientation, q=w, k=w, v=w, o=f"{path}.{o}.weight", q_bias=b,
                k_bias=b, v_bias=b, o_bias=f"{path}.{o}.bias", num_heads=heads,
                num_kv_heads=kv_heads, head_dim=head_dim)


def _llama(path, module, model):
    names = {n for n, _ in module.named_children()}
    if not {"q_proj", "k_proj", "v_proj", "o_proj"} <= names:
        return None
    config = _config_of(model, module)
    H, kv = _heads(config, gqa=True)
    p = lambda c, s: f"{path}.{c}.{s}"  # noqa: E731
    kind = getattr(config, "model_type", None)
    kind = kind if kind in LLAMA_KINDS else "llama"
    return dict(module=path, o_module=f"{path}.o_proj", kind=kind, packing="separate",
                orientation="linear", q=p("q_proj", "weight"), k=p("k_proj", "weight"),
                v=p("v_proj", "weight"), o=p("o_proj", "weight"), q_bias=p("q_proj", "bias"),
                k_bias=p("k_proj", "bias"), v_bias=p("v_proj", "bias"), o_bias=p("o_proj", "bias"),
                num_heads=H, num_kv_heads=kv, head_dim=_head_dim(module, config, H, "head_dim"))


def _opt(path, module, model):
    """OPT and GPT-J: ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` Linears, one key-value
    head per query head. Only for these model types: encoder-decoders (BART, Whisper) name
    their cross-attention the same way, and cross-attention is not a layer of a layout.
    """
    names = {n for n, _ in module.named_children()}
    if not {"q_proj", "k_proj", "v_proj", "out_proj"} <= names:
        return None
    config = _config_of(model, module)
    kind = getattr(config, "model_type", None)
    if kind not in OUT_PROJ_KINDS:
        return None
    H, _ = _heads(config, gqa=False)
    p = lambda c, s: f"{path}.{c}.{s}"  # noqa: E731
    return dict(module=path, o_module=f"{path}.out_proj", kind=kind, packing="separate",
                orientation="linear", q=p("q_proj", "weight"), k=p("k_proj", "weight"),
                v=p("v_proj", "weight"), o=p("out_proj", "weight"), q_bias=p("q_proj", "bias"),
                k_bias=p("k_proj", "bias"), v_bias=p("v_proj", "bias"), o_bias=p("out_proj", "bias"),
                num_heads=H, num_kv_heads=H, head_dim=_head_dim(module, config, H, "head_dim"))


def _falcon(path, module, model):
    """Falcon's fused ``query_key_value``, in the packing its forward reads (FalconConfig).

    - ``new_decoder_architecture`` (Falcon-40B/180B): ``[H_kv, r + 2, dh]`` (``fused_grouped``,
      ``H_kv = num_kv_heads``);
    - else ``multi_query`` (Falcon-7B): ``[Q: H, dh | K: 1, dh | V: 1, dh]`` (``fused_blocks``);
    - else (Falcon-RW): ``[H, 3, dh]`` (``fused_per_head``).
    """
    names = {n for n, _ in module.named_children()}
    if not {"query_key_value", "dense"} <= names or not hasattr(module, "new_decoder_architecture"):
        return None
    config = _config_of(model, module)
    H, _ = _heads(config, gqa=False)
    if module.new_decoder_architecture:
        packing, kv = "fused_grouped", int(config.num_kv_heads)
    elif module.multi_query:
        packing, kv = "fused_blocks", 1
    else:
        packing, kv = "fused_per_head", H
    return _fused(path, "query_key_value", "dense", kind="falcon", packing=packing,
                  orientation="linear", heads=H, kv_heads=kv,
                  head_dim=_head_dim(module, config, H, "head_dim"))


def _bloom(path, module, model):
    """Bloom: fused ``query_key_value`` rows ``[H, 3, dh]`` (its ``_reshape``), ``dense``; ALiBi."""
    names = {n for n, _ in module.named_children()}
    config = _config_of(model, module)
    if not {"query_key_value", "dense"} <= names or getattr(config, "model_type", None) != "bloom":
        return None
    H, _ = _heads(config, gqa=False)
    return _fused(path, "query_key_value", "dense", kind="bloom", packing="fused_per_head",
                  orientation="linear", heads=H, kv_heads=H,
                  head_dim=_head_dim(module, config, H, "head_dim"))


def _phi3(path, module, model):
    names = {n for n, _ in module.named_children()}
    if not {"qkv_proj", "o_proj"} <= names:
        return None
    config = _config_of(model, module)
    H, kv = _heads(config, gqa=True)
    return _fused(path, "qkv_proj", "o_proj", kind="phi3", packing="fused_blocks",
                  orientation="linear", heads=H, kv_heads=kv,
                  head_dim=_head_dim(module, config, H, "head_dim"))


def _neox(path, module, model):
    names = {n for n, _ in module.named_children()}
    if not {"query_key_value", "dense"} <= names or not hasattr(module, "head_size"):
        return None
    config = _config_of(model, module)
    H, _ = _heads(config, gqa=False)
    return _fused(path, "query_key_value", "dense", kind="gpt_neox", packing="fused_per_head",
                  orientation="linear", heads=H, kv_heads=H,
                  head_dim=_head_dim(module, config, H, "head_size"))


def _bert(path, module, model):
    names = {n for n, _ in module.named_children()}
    if not {"self", "output"} <= names or "Cross" in type(module.self).__name__:
        return None
    inner = {n for n, _ in module.self.named_children()}
    if not {"query", "key", "value"} <= inner or not hasattr(module.output, "dense"):
        return None
    config = _config_of(model, module.self)
    H, _ = _heads(config, gqa=False)
    s = lambda c, t: f"{path}.self.{c}.{t}"  # noqa: E731
    return dict(module=f"{path}.self", o_module=f"{path}.output.dense", kind="bert",
                packing="separate", orientation="linear", q=s("query", "weight"),
                k=s("key", "weight"), v=s("value", "weight"), o=f"{path}.output.dense.weight",
                q_bias=s("query", "bias"), k_bias=s("key", "bias"), v_bias=s("value", "bias"),
                o_bias=f"{path}.output.dense.bias", num_heads=H, num_kv_heads=H,
                head_dim=_head_dim(module.self, config, H, "attention_head_size"))


def _torch_mha(path, module, model):
    """The entry of torch's ``nn.MultiheadAttention``: fused ``in_proj_weight`` ``[3E, E]`` with rows
    ``[Q: H, dh | K: H, dh | V: H, dh]`` (``dh = E / H``) and ``out_proj`` a Linear.

    Its forward calls ``F.multi_head_attention_forward`` with the tensors, not the
    ``out_proj`` module, and returns ``(output, weights)``; see :mod:`fisher_ref.semantic_check`
    for how the check observes it.
    """
    if not isinstance(module, torch.nn.MultiheadAttention):
        return None
    where = path or type(model).__name__
    if not module._qkv_same_embed_dim:
        raise ValueError(
            f"attention_layout: expected {where} (nn.MultiheadAttention) to have one fused "
            f"in_proj_weight, got separate q/k/v_proj_weight (kdim or vdim != embed_dim) whose one "
            f"fused in_proj_bias no layout packing describes; {_DECLARE_HINT} (biases None)."
        )
    p = f"{path}." if path else ""
    H = int(module.num_heads)
    return dict(module=path, o_module=f"{p}out_proj", kind="torch_mha", packing="fused_blocks",
                orientation="linear", q=f"{p}in_proj_weight", k=f"{p}in_proj_weight",
                v=f"{p}in_proj_weight", o=f"{p}out_proj.weight", q_bias=f"{p}in_proj_bias",
                k_bias=f"{p}in_proj_bias", v_bias=f"{p}in_proj_bias", o_bias=f"{p}out_proj.bias",
                num_heads=H, num_kv_heads=H, head_dim=int(module.head_dim))


_DETECTORS = (_gpt2, _llama, _opt, _phi3, _falcon, _bloom, _neox, _bert, _torch_mha)

# Token mixers without attention heads: a model whose only mixers are these has no heads.
HEADLESS_MIXERS = {
    "MambaMixer": "Mamba's selective state-space mixer",
    "Mamba2Mixer": "Mamba-2's state-space mixer",
    "FalconMambaMixer": "Falcon-Mamba's selective state-space mixer",
    "RwkvSelfAttention": "RWKV time mixing, a recurrence with no heads",
}
HEADS_ONLY = ("attention_layout", "qkov_mask", "head_group_ids", "group_fisher(groups='heads')",
              "interference", "conflicts(groups='heads')", "check_layout / validate_layout")
NO_HEADS_NEEDED = ("empirical_fisher", "mean_gradient", "squared_mean_gradient", "gradient_variance",
                   "batch_squared_gradient", "mc_fisher", "exact_fisher", "per_sample_gradients",
                   "per_sample_contributions", "group_fisher(groups='generic')",
                   "conflicts(groups='parameters')")


def _drop_missing_biases(entry: dict, params: dict) -> dict:
    for f in _OPTIONAL:
        if entry[f] is not None and entry[f] not in params:
            entry[f] = None
    return entry


def _detect(model) -> AttentionLayout:
    params = dict(model.named_parameters())
    found = []
    for path, module in model.named_modules():
        for detector in _DETECTORS:
            entry = detector(path, module, model)
            if entry is not None:
                found.append(_drop_missing_biases(entry, params))
                break
    if not found:
        raise _not_found(model)
    kinds = sorted({e["kind"] for e in found})
    kind = kinds[0] if len(kinds) == 1 else "mixed"
    return _build(model, found, kind)


def _not_found(model) -> ValueError:
    """The error for a model in which no detector found a layer: unsupported attention
    (attention-like modules found: declare the layout), or no attention heads at all.
    """
    headless, suspects = [], []
    for p, m in model.named_modules():
        cls = type(m).__name__
        if cls in HEADLESS_MIXERS:
            headless.append(f"{p} ({cls}: {HEADLESS_MIXERS[cls]})")
        elif "attn" in p.lower().rsplit(".", 1)[-1] or "attention" in cls.lower():
            suspects.append(f"{p} ({cls})")
    name = type(model).__name__
    if suspects:
        return ValueError(
            f"attention_layout: expected a GPT-2, LLaMA/Mistral/Qwen2/Qwen3/Gemma/StarCoder2/"
            f"StableLM, OPT, GPT-J, Falcon, Bloom, BERT, GPT-NeoX, Phi-3 or torch "
            f"nn.MultiheadAttention attention layout in {name}, got attention-like modules "
            f"{suspects[:6]}; {_DECLARE_HINT}."
        )
    more = f" and {len(headless) - 1} more like it" if len(headless) > 1 else ""
    found = f"its token mixer is {headless[0]}{more}" if headless else "got no attention-like module"
    hint = "" if headless else (f" If it does have attention heads in modules not recognised, "
                                f"{_DECLARE_HINT}.")
    return ValueError(
        f"attention_layout: expected a model with attention heads, got {name}, which has none "
        f"({found}). The heads-only parts do not apply to it: {', '.join(HEADS_ONLY)}. Every "
        f"estimator that needs no heads does: {', '.join(NO_HEADS_NEEDED)}.{hint}"
    )


# ---------------------------------------------------------------------------- declared


def _declared_entries(layout) -> tuple[str, list[dict]]:
    if isinstance(layout, AttentionLayout):
        return layout.kind, [{f.name: getattr(la, f.name) for f in fields(la)} for la in layout.layers]
    if not isinstance(layout, dict) or set(layout) != {"layers"}:
        got = sorted(layout) if isinstance(layout, dict) else type(layout).__name__
        raise ValueError(f"layout: expected an AttentionLayout or a dict with the one key "
                         f"'layers', got {got}.")
    layers = layout["layers"]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"layout['layers']: expected a non-empty list of dicts, got {layers!r}.")
    entries = []
    for i, la in enumerate(layers):
        if not isinstance(la, dict):
            raise ValueError(f"layout['layers'][{i}]: expected a dict, got {type(la).__name__}.")
        unknown = sorted(set(la) - set(DECLARED_FIELDS))
        missing = sorted(set(DECLARED_FIELDS) - set(_OPTIONAL) - set(la))
        if unknown or missing:
            raise ValueError(f"layout['layers'][{i}]: expected keys {list(DECLARED_FIELDS)} "
                             f"(biases optional), got unknown {unknown} and missing {missing}.")
        entry = {f: None for f in _OPTIONAL} | dict(la) | {"kind": "declared"}
        entries.append(entry)
    return "declared", entries


def _check_entry(i: int, e: dict, params: dict, modules: dict) -> None:
    where = f"layout layer {i}"
    for f in ("num_heads", "num_kv_heads", "head_dim"):
        v = e[f]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {f}: expected an integer >= 1, got {v!r}.")
    if e["num_heads"] % e["num_kv_heads"]:
        raise ValueError(f"{where}: expected num_heads to be a multiple of num_kv_heads, "
                         f"got {e['num_heads']} and {e['num_kv_heads']}.")
    if e["packing"] not in PACKINGS:
        raise ValueError(f"{where}: packing: expected one of {PACKINGS}, got {e['packing']!r}.")
    if e["orientation"] not in ORIENTATIONS:
        raise ValueError(f"{where}: orientation: expected one of {ORIENTATIONS}, got {e['orientation']!r}.")
    for f in ("module", "o_module"):
        if e[f] not in modules:
            raise ValueError(f"{where}: {f}: expected a module path of the model, got {e[f]!r}.")
    for f in ("q", "k", "v", "o") + _OPTIONAL:
        if e[f] is not None and e[f] not in params:
            raise ValueError(f"{where}: {f}: expected a parameter name of the model, "
                             f"got {e[f]!r}.")
    fused = e["packing"] != "separate"
    same = e["q"] == e["k"] == e["v"]
    if fused != same:
        raise ValueError(f"{where}: expected q == k == v for a fused packing and three distinct "
                         f"tensors for 'separate', got q={e['q']!r}, k={e['k']!r}, v={e['v']!r} "
                         f"with packing {e['packing']!r}.")
    if e["packing"] == "fused_per_head" and e["num_kv_heads"] != e["num_heads"]:
        raise ValueError(f"{where}: expected num_kv_heads == num_heads for 'fused_per_head', "
                         f"got {e['num_kv_heads']} and {e['num_heads']}.")
    _check_shapes(where, e, params)


def _out_axis(e: dict) -> int:
    return 0 if e["orientation"] == "linear" else 1


def _check_shapes(where: str, e: dict, params: dict) -> None:
    H, kv, dh = e["num_heads"], e["num_kv_heads"], e["head_dim"]
    if e["packing"] == "separate":
        sizes = {"q": H * dh, "k": kv * dh, "v": kv * dh}
    else:
        sizes = {"q": (H + 2 * kv) * dh}
    out_ax, in_ax = _out_axis(e), 1 - _out_axis(e)
    for f, n in sizes.items():
        shape = tuple(params[e[f]].shape)
        if len(shape) != 2 or shape[out_ax] != n:
            raise ValueError(f"{where}: {f} weight {e[f]!r}: expected a 2-D {e['orientation']} "
                             f"weight with {n} outputs (heads x head_dim), got shape {shape}.")
        bias = e[f + "_bias"]
        if bias is not None and tuple(params[bias].shape) != (n,):
            raise ValueError(f"{where}: {f}_bias {bias!r}: expected shape ({n},), "
                             f"got {tuple(params[bias].shape)}.")
    if e["packing"] != "separate":
        for f in ("k_bias", "v_bias"):
            if e[f] != e["q_bias"]:
                raise ValueError(f"{where}: expected one fused bias (q_bias == {f}), "
                                 f"got {e['q_bias']!r} and {e[f]!r}.")
    o_shape = tuple(params[e["o"]].shape)
    if len(o_shape) != 2 or o_shape[in_ax] != H * dh:
        raise ValueError(f"{where}: o weight {e['o']!r}: expected a 2-D {e['orientation']} weight "
                         f"with {H * dh} inputs (heads x head_dim), got shape {o_shape}.")
    if e["o_bias"] is not None and tuple(params[e["o_bias"]].shape) != (o_shape[out_ax],):
        raise ValueError(f"{where}: o_bias {e['o_bias']!r}: expected shape ({o_shape[out_ax]},), "
                         f"got {tuple(params[e['o_bias']].shape)}.")


def _build(model, entries: list[dict], kind: str) -> AttentionLayout:
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    layers = []
    for i, e in enumerate(entries):
        _check_entry(i, e, params, modules)
        e = {f: e[f] for f in DECLARED_FIELDS} | {"kind": e["kind"]}
        layers.append(LayerAttention(index=i, **e))
    return AttentionLayout(kind=kind, layers=tuple(layers))


def attention_layout(model: torch.nn.Module, layout: AttentionLayout | dict | None = None) -> AttentionLayout:
    r"""The attention layout of ``model``: detected, or declared and checked.

    Detected from the model's modules for GPT-2 (fused ``c_attn`` Conv1D, ``c_proj``),
    LLaMA / Mistral / Qwen2 / Qwen3 / Gemma / Gemma-2 / StarCoder2 / StableLM (``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj``; GQA; the module's ``head_dim``, which comes from the
    config when it sets one), OPT / GPT-J (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``),
    BERT (``query``/``key``/``value`` + ``attention.output.dense``), GPT-NeoX and Bloom
    (``query_key_value`` rows ``[H, 3, dh]``), Falcon (``query_key_value`` rows
    ``[H_kv, r + 2, dh]`` in the new decoder architecture, ``[Q: H | K: 1 | V: 1]`` multi-query,
    else ``[H, 3, dh]``), Phi-3 (``qkv_proj`` rows ``[Q; K; V]``) and torch's
    ``nn.MultiheadAttention`` (``in_proj_weight`` rows ``[Q; K; V]``, ``out_proj``; e.g. a
    ViT built from torch modules).

    Args:
        model: the model.
        layout: None (detect), an :class:`AttentionLayout`, or a dict
            ``{"layers": [{module, o_module, packing, orientation, q, k, v, o, q_bias,
            k_bias, v_bias, o_bias, num_heads, num_kv_heads, head_dim}, ...]}``.

    Returns:
        AttentionLayout: the layers in model order, shapes checked against the tensors.

    Raises:
        ValueError: no supported layout was found (the message names what was found and
            how to declare one), the model has no attention heads (the message names what
            applies instead), or a declared layout does not match the tensors.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")
    if layout is None:
        return _detect(model)
    kind, entries = _declared_entries(layout)
    return _build(model, entries, kind)
