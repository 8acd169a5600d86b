"""Tiny Hugging Face models built from configs (nothing is downloaded).

Every builder returns a model in ``eval()`` mode with the eager attention implementation
(so ``output_attentions`` works and no fused kernel hides the per-head computation), with
weights drawn from a seeded generator so that a case id names one model exactly.

Families (``TinyConfig.arch``) and what each exercises:

==============  ===============================================================================
``gpt2``        fused ``c_attn`` Conv1D ``[d, 3d]``
``llama``       separate q/k/v/o_proj, GQA, explicit head_dim, optional bias (also ``mistral``,
                ``qwen2``: q/k/v bias always, no o bias)
``bert``        query/key/value + output.dense, masked LM (``bert-cls``: sequence classifier)
``gpt_neox``    fused ``query_key_value`` per head ``[H, 3, dh]``, partial rotary
``phi3``        fused ``qkv_proj`` ``[Q; K; V]``, GQA
``opt``         separate q/k/v_proj + ``out_proj``, biases (HF default), learned positions
``gptj``        separate q/k/v_proj + ``out_proj``, no biases, partial rotary (``rotary_dim``)
``falcon``      new decoder architecture: fused ``query_key_value`` grouped per kv head
                ``[H_kv, H/H_kv + 2, dh]``, GQA
``falcon-mq``   old decoder architecture, multi-query: fused ``[Q: H, dh | K: 1, dh | V: 1, dh]``
``falcon-rw``   old decoder architecture without multi-query (Falcon-RW): fused per head
                ``[H, 3, dh]``, ALiBi, biases, sequential attention and MLP
``bloom``       fused ``query_key_value`` per head ``[H, 3, dh]``, ALiBi, biases
``gemma``       separate q/k/v/o_proj, GQA, explicit head_dim, scaled embeddings
``gemma2``      as Gemma, plus attention-logit soft-capping and sliding-window layers
``qwen3``       separate q/k/v/o_proj, GQA, explicit head_dim, per-head RMS q/k norms
``starcoder2``  separate q/k/v/o_proj with biases (HF default), GQA, LayerNorm
``stablelm``    separate q/k/v/o_proj, optional q/k/v bias, partial rotary, GQA
``mamba``       no attention: selective state-space mixer (conv1d, ``A_log``, ``D``)
``rwkv``        no attention: RWKV time mixing (a recurrence; its ``attention`` has no heads)
==============  ===============================================================================

``attention_bias=None`` keeps the family's own default (OPT and StarCoder2: biases; the
others: none); families whose bias is fixed by the architecture (GPT-2, BERT, GPT-NeoX,
Bloom: always; GPT-J, Phi-3, Qwen2's o_proj, Mamba, RWKV: never) ignore it. Anything
else a config takes goes through ``extra`` (e.g. ``(("qk_layernorm", True),)`` for a
StableLM with per-head q/k LayerNorms, ``(("alibi", False),)`` for a rotary Falcon-RW).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ARCHS = ("gpt2", "llama", "mistral", "qwen2", "bert", "bert-cls", "gpt_neox", "phi3", "opt", "gptj",
         "falcon", "falcon-mq", "falcon-rw", "bloom", "gemma", "gemma2", "qwen3", "starcoder2",
         "stablelm", "mamba", "rwkv")
HEADLESS_ARCHS = ("mamba", "rwkv")  # no attention heads: the heads-only parts do not apply
# families whose head_dim is hidden / heads (the config has no head_dim of its own)
_HEAD_DIM_FROM_HIDDEN = ("gpt2", "bert", "bert-cls", "gpt_neox", "phi3", "opt", "gptj", "falcon",
                         "falcon-mq", "falcon-rw", "bloom", "stablelm")
# families with one key-value head per query head
_NO_GQA = ("gpt2", "bert", "bert-cls", "gpt_neox", "opt", "gptj", "falcon-rw", "bloom", "mamba", "rwkv")
_BIAS_BY_DEFAULT = ("opt", "starcoder2")


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a tiny transformer; ``make_id()`` gives a readable case id.

    Attributes:
        arch: the family, one of ``ARCHS`` (see the module docstring).
        num_layers: L. num_heads: H. num_kv_heads: H_kv (None: H; ``falcon-mq``: 1).
        head_dim: dh. hidden: d (None: H * dh; families in which dh = d / H refuse another).
        vocab_size, max_positions: the embedding sizes.
        attention_bias: Q/K/V (and, where the family has one, O) biases; None: the family's
            default.
        tie_embeddings: tie the LM head to the token embedding.
        num_labels: classes of ``bert-cls``.
        seed: seeds the weights.
        extra: ``(key, value)`` pairs passed to the HF config.
    """

    arch: str = "gpt2"
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int | None = None  # None: same as num_heads (falcon-mq: 1)
    head_dim: int = 4
    hidden: int | None = None  # None: num_heads * head_dim
    vocab_size: int = 11
    max_positions: int = 16
    attention_bias: bool | None = None  # None: the family's default
    tie_embeddings: bool = True
    num_labels: int = 3  # bert-cls
    seed: int = 0
    extra: tuple = field(default=())  # (key, value) pairs passed to the HF config

    def __post_init__(self):
        """Check the arch and the head counts."""
        if self.arch not in ARCHS:
            raise ValueError(f"Unknown arch: expected one of {ARCHS}, got {self.arch!r}.")
        kv = self.kv_heads
        if self.num_heads % kv:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads: got {self.num_heads} and {kv}."
            )
        if self.arch in _NO_GQA and kv != self.num_heads:
            raise ValueError(f"{self.arch}: expected num_kv_heads None or {self.num_heads} (no "
                             f"grouped-query attention), got {self.num_kv_heads}.")
        if self.arch == "falcon-mq" and kv != 1:
            raise ValueError(f"falcon-mq: expected num_kv_heads None or 1 (multi-query), got "
                             f"{self.num_kv_heads}.")
        if self.arch == "rwkv" and self.num_layers < 2:
            raise ValueError(f"rwkv: expected num_layers >= 2 (HF's RWKV initialisation divides by "
                             f"num_layers - 1), got {self.num_layers}.")
        if self.arch in _HEAD_DIM_FROM_HIDDEN and self.d_model != self.num_heads * self.head_dim:
            raise ValueError(f"{self.arch}: head_dim is hidden_size / num_heads; expected hidden None "
                             f"or {self.num_heads * self.head_dim}, got {self.hidden}.")

    @property
    def kv_heads(self) -> int:
        """H_kv, the key-value heads the model has."""
        if self.num_kv_heads is None:
            return 1 if self.arch == "falcon-mq" else self.num_heads
        return self.num_kv_heads

    @property
    def d_model(self) -> int:
        """d, the model width."""
        return self.num_heads * self.head_dim if self.hidden is None else self.hidden

    @property
    def bias(self) -> bool:
        """Whether the family's Q/K/V projections get a bias under ``attention_bias``."""
        return self.arch in _BIAS_BY_DEFAULT if self.attention_bias is None else self.attention_bias

    def make_id(self) -> str:
        """A readable case id, e.g. ``arch=llama-L=2-H=4-kv=2-dh=2-d=12-bias-seed=0``."""
        parts = [f"arch={self.arch}", f"L={self.num_layers}", f"H={self.num_heads}"]
        if self.kv_heads != self.num_heads:
            parts.append(f"kv={self.kv_heads}")
        parts.append(f"dh={self.head_dim}")
        if self.hidden is not None:
            parts.append(f"d={self.hidden}")
        if self.attention_bias:
            parts.append("bias")
        elif self.attention_bias is False and self.arch in _BIAS_BY_DEFAULT:
            parts.append("nobias")
        if not self.tie_embeddings:
            parts.append("untied")
        parts.extend(f"{k}={v}" for k, v in self.extra)
        parts.append(f"seed={self.seed}")
        return "-".join(parts)


def _partial_rotary_dims(head_dim: int) -> int:
    """Rotary dimensions of a partially rotary family: half of dh, even, at least 2."""
    return max(2, head_dim // 4 * 2)


def _gpt2(tf, cfg, common):
    return tf.GPT2Config(n_layer=cfg.num_layers, n_head=cfg.num_heads, n_embd=cfg.d_model,
                         n_positions=cfg.max_positions, bos_token_id=0, eos_token_id=0,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)


def _llama_like(tf, cfg, common):
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
           "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config, "qwen3": tf.Qwen3Config}[cfg.arch]
    kw = dict(num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.kv_heads, hidden_size=cfg.d_model, head_dim=cfg.head_dim,
              intermediate_size=2 * cfg.d_model, max_position_embeddings=cfg.max_positions,
              bos_token_id=0, eos_token_id=0, pad_token_id=None)
    if cfg.arch not in ("qwen2", "mistral"):  # qwen2: q/k/v bias, no o bias; mistral: none
        kw["attention_bias"] = cfg.bias
    if cfg.arch == "mistral":
        kw["sliding_window"] = None
    if cfg.arch == "gemma2":
        kw["query_pre_attn_scalar"] = cfg.head_dim
    return cls(**kw, **common)


def _bert(tf, cfg, common):
    return tf.BertConfig(num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         hidden_size=cfg.d_model, intermediate_size=2 * cfg.d_model,
                         max_position_embeddings=cfg.max_positions, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, num_labels=cfg.num_labels, pad_token_id=0,
                         **common)


def _gpt_neox(tf, cfg, common):
    return tf.GPTNeoXConfig(num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            hidden_size=cfg.d_model, intermediate_size=2 * cfg.d_model,
                            max_position_embeddings=cfg.max_positions, rotary_pct=0.5,
                            use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
                            hidden_dropout=0.0, attention_dropout=0.0, **common)


def _phi3(tf, cfg, common):
    return tf.Phi3Config(num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.kv_heads, hidden_size=cfg.d_model,
                         intermediate_size=2 * cfg.d_model, max_position_embeddings=cfg.max_positions,
                         original_max_position_embeddings=cfg.max_positions, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0, **common)


def _opt(tf, cfg, common):
    return tf.OPTConfig(num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                        hidden_size=cfg.d_model, ffn_dim=2 * cfg.d_model, word_embed_proj_dim=cfg.d_model,
                        max_position_embeddings=cfg.max_positions, enable_bias=cfg.bias, dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, pad_token_id=0,
                        bos_token_id=0, eos_token_id=0, **common)


def _gptj(tf, cfg, common):
    return tf.GPTJConfig(n_layer=cfg.num_layers, n_head=cfg.num_heads, n_embd=cfg.d_model,
                         n_inner=2 * cfg.d_model, rotary_dim=_partial_rotary_dims(cfg.head_dim),
                         n_positions=cfg.max_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common)


def _falcon(tf, cfg, common):
    kw = dict(num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              hidden_size=cfg.d_model, ffn_hidden_size=2 * cfg.d_model,
              max_position_embeddings=cfg.max_positions, hidden_dropout=0.0, attention_dropout=0.0,
              bos_token_id=0, eos_token_id=0)
    if cfg.arch == "falcon":
        kw.update(new_decoder_architecture=True, num_kv_heads=cfg.kv_heads, bias=cfg.bias)
    elif cfg.arch == "falcon-mq":
        kw.update(new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=cfg.bias)
    else:  # falcon-rw
        kw.update(new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True,
                  bias=True if cfg.attention_bias is None else cfg.attention_bias)
    return tf.FalconConfig(**{**kw, **common})


def _bloom(tf, cfg, common):
    return tf.BloomConfig(n_layer=cfg.num_layers, n_head=cfg.num_heads, hidden_size=cfg.d_model,
                          hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
                          pad_token_id=0, **common)


def _starcoder2(tf, cfg, common):
    return tf.Starcoder2Config(num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                               num_key_value_heads=cfg.kv_heads, hidden_size=cfg.d_model,
                               head_dim=cfg.head_dim, intermediate_size=2 * cfg.d_model,
                               max_position_embeddings=cfg.max_positions, use_bias=cfg.bias,
                               sliding_window=None, residual_dropout=0.0, embedding_dropout=0.0,
                               attention_dropout=0.0, bos_token_id=0, eos_token_id=0, **common)


def _stablelm(tf, cfg, common):
    factor = _partial_rotary_dims(cfg.head_dim) / cfg.head_dim
    return tf.StableLmConfig(num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                             num_key_value_heads=cfg.kv_heads, hidden_size=cfg.d_model,
                             intermediate_size=2 * cfg.d_model, max_position_embeddings=cfg.max_positions,
                             use_qkv_bias=cfg.bias, partial_rotary_factor=factor, hidden_dropout=0.0,
                             attention_dropout=0.0, bos_token_id=0, eos_token_id=0, **common)


def _mamba(tf, cfg, common):
    # use_cache=False: the cache's in-place updates would enter every per-sample gradient
    return tf.MambaConfig(num_hidden_layers=cfg.num_layers, hidden_size=cfg.d_model, state_size=4,
                          expand=2, conv_kernel=3, use_cache=False, bos_token_id=0, eos_token_id=0,
                          pad_token_id=0, **common)


def _rwkv(tf, cfg, common):
    # use_cache=False: RWKV's state is updated in place, which autograd cannot differentiate
    return tf.RwkvConfig(num_hidden_layers=cfg.num_layers, hidden_size=cfg.d_model,
                         attention_hidden_size=cfg.d_model, intermediate_size=2 * cfg.d_model,
                         context_length=cfg.max_positions, use_cache=False, bos_token_id=0,
                         eos_token_id=0, **common)


_CONFIGS = {"gpt2": _gpt2, "llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like,
            "bert": _bert, "bert-cls": _bert, "gpt_neox": _gpt_neox, "phi3": _phi3, "opt": _opt,
            "gptj": _gptj, "falcon": _falcon, "falcon-mq": _falcon, "falcon-rw": _falcon,
            "bloom": _bloom, "gemma": _llama_like, "gemma2": _llama_like, "qwen3": _llama_like,
            "starcoder2": _starcoder2, "stablelm": _stablelm, "mamba": _mamba, "rwkv": _rwkv}
_MODELS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "qwen2": "Qwen2ForCausalLM", "bert": "BertForMaskedLM",
           "bert-cls": "BertForSequenceClassification", "gpt_neox": "GPTNeoXForCausalLM",
           "phi3": "Phi3ForCausalLM", "opt": "OPTForCausalLM", "gptj": "GPTJForCausalLM",
           "falcon": "FalconForCausalLM", "falcon-mq": "FalconForCausalLM",
           "falcon-rw": "FalconForCausalLM", "bloom": "BloomForCausalLM", "gemma": "GemmaForCausalLM",
           "gemma2": "Gemma2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "starcoder2": "Starcoder2ForCausalLM", "stablelm": "StableLmForCausalLM",
           "mamba": "MambaForCausalLM", "rwkv": "RwkvForCausalLM"}


def _hf_config(cfg: TinyConfig):
    import transformers as tf

    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, **dict(cfg.extra))
    c = _CONFIGS[cfg.arch](tf, cfg, common)
    c._attn_implementation = "eager"
    return c


def build_model(cfg: TinyConfig | None = None, *, dtype: torch.dtype = torch.float32,
                **kwargs: object) -> torch.nn.Module:
    """Build the tiny model ``cfg`` (or ``TinyConfig(**kwargs)``), seeded, eval mode.

    Args:
        cfg: the shape; None: ``TinyConfig(**kwargs)``.
        dtype: the parameters' dtype.
        **kwargs: fields of :class:`TinyConfig` (only without ``cfg``).

    Returns:
        The HF model (``*ForCausalLM``, ``BertForMaskedLM`` or ``BertForSequenceClassification``),
        every parameter perturbed by seeded noise, eager attention, ``eval()`` mode.
    """
    import transformers as tf

    if cfg is None:
        cfg = TinyConfig(**kwargs)
    elif kwargs:
        raise ValueError(f"Pass either a TinyConfig or keyword arguments, not both: got {kwargs}.")
    hf = _hf_config(cfg)
    cls = getattr(tf, _MODELS[cfg.arch])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = cls(hf)
        # HF initialises some tensors to constants (norms to 1, biases to 0); perturb every
        # parameter so that no symmetry hides a wrong index.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model.to(dtype).eval()


def loss_kind(arch: str) -> str:
    """The loss family a tiny model of ``arch`` is built for: causal, mlm or cls."""
    return {"bert": "mlm", "bert-cls": "cls"}.get(arch, "causal")
