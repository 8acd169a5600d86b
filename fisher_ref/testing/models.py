"""Tiny Hugging Face models built from configs (nothing is downloaded).

Every builder returns a model in ``eval()`` mode with the eager attention implementation
(so ``output_attentions`` works and no fused kernel hides the per-head computation), with
weights drawn from a seeded generator so that a case id names one model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ARCHS = ("gpt2", "llama", "mistral", "qwen2", "bert", "bert-cls", "gpt_neox", "phi3")


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a tiny transformer; ``make_id()`` gives a readable case id."""

    arch: str = "gpt2"
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int | None = None  # None: same as num_heads
    head_dim: int = 4
    hidden: int | None = None  # None: num_heads * head_dim
    vocab_size: int = 11
    max_positions: int = 16
    attention_bias: bool = False  # LLaMA-family q/k/v(/o) bias
    tie_embeddings: bool = True
    num_labels: int = 3  # bert-cls
    seed: int = 0
    extra: tuple = field(default=())  # (key, value) pairs passed to the HF config

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"Unknown arch: expected one of {ARCHS}, got {self.arch!r}.")
        kv = self.kv_heads
        if self.num_heads % kv:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads: got {self.num_heads} and {kv}."
            )

    @property
    def kv_heads(self) -> int:
        """H_kv (``num_heads`` when not set)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def d_model(self) -> int:
        """The model width d (``num_heads * head_dim`` when ``hidden`` is not set)."""
        return self.num_heads * self.head_dim if self.hidden is None else self.hidden

    def make_id(self) -> str:
        """A readable case id, e.g. ``arch=llama-L=2-H=4-kv=2-dh=2-seed=0``."""
        parts = [f"arch={self.arch}", f"L={self.num_layers}", f"H={self.num_heads}"]
        if self.kv_heads != self.num_heads:
            parts.append(f"kv={self.kv_heads}")
        parts.append(f"dh={self.head_dim}")
        if self.hidden is not None:
            parts.append(f"d={self.hidden}")
        if self.attention_bias:
            parts.append("bias")
        if not self.tie_embeddings:
            parts.append("untied")
        parts.append(f"seed={self.seed}")
        return "-".join(parts)


def _hf_config(cfg: TinyConfig):
    import transformers as tf

    d, L, H = cfg.d_model, cfg.num_layers, cfg.num_heads
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings)
    extra = dict(cfg.extra)
    if cfg.arch == "gpt2":
        if cfg.hidden is not None and cfg.hidden != H * cfg.head_dim:
            raise ValueError("GPT-2 has head_dim = n_embd / n_head; do not set hidden.")
        c = tf.GPT2Config(n_layer=L, n_head=H, n_embd=d, n_positions=cfg.max_positions,
                          bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **common, **extra)
    elif cfg.arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[cfg.arch]
        kw = dict(num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=cfg.kv_heads,
                  hidden_size=d, head_dim=cfg.head_dim, intermediate_size=2 * d,
                  max_position_embeddings=cfg.max_positions, bos_token_id=0, eos_token_id=0,
                  pad_token_id=None)
        if cfg.arch == "llama":
            kw["attention_bias"] = cfg.attention_bias
        elif cfg.arch == "mistral":
            kw["sliding_window"] = None
        # qwen2 always has q/k/v bias and no o bias.
        c = cls(**kw, **common, **extra)
    elif cfg.arch in ("bert", "bert-cls"):
        if cfg.hidden is not None and cfg.hidden != H * cfg.head_dim:
            raise ValueError("BERT has head_dim = hidden_size / num_attention_heads.")
        c = tf.BertConfig(num_hidden_layers=L, num_attention_heads=H, hidden_size=d,
                          intermediate_size=2 * d, max_position_embeddings=cfg.max_positions,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          num_labels=cfg.num_labels, pad_token_id=0, **common, **extra)
    elif cfg.arch == "gpt_neox":
        if cfg.hidden is not None and cfg.hidden != H * cfg.head_dim:
            raise ValueError("GPT-NeoX has head_dim = hidden_size / num_attention_heads.")
        c = tf.GPTNeoXConfig(num_hidden_layers=L, num_attention_heads=H, hidden_size=d,
                             intermediate_size=2 * d, max_position_embeddings=cfg.max_positions,
                             rotary_pct=0.5, use_parallel_residual=True, bos_token_id=0,
                             eos_token_id=0, hidden_dropout=0.0, attention_dropout=0.0,
                             **common, **extra)
    elif cfg.arch == "phi3":
        c = tf.Phi3Config(num_hidden_layers=L, num_attention_heads=H,
                          num_key_value_heads=cfg.kv_heads, hidden_size=d,
                          intermediate_size=2 * d, max_position_embeddings=cfg.max_positions,
                          original_max_position_embeddings=cfg.max_positions,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0, **common, **extra)
        if cfg.head_dim != d // H:
            raise ValueError("Phi-3 has head_dim = hidden_size / num_attention_heads.")
    else:  # pragma: no cover - guarded in __post_init__
        raise AssertionError(cfg.arch)
    c._attn_implementation = "eager"
    return c


def build_model(cfg: TinyConfig | None = None, *, dtype=torch.float32, **kwargs) -> torch.nn.Module:
    """Build the tiny model ``cfg`` (or ``TinyConfig(**kwargs)``), seeded, eval mode."""
    import transformers as tf

    if cfg is None:
        cfg = TinyConfig(**kwargs)
    elif kwargs:
        raise ValueError(f"Pass either a TinyConfig or keyword arguments, not both: got {kwargs}.")
    hf = _hf_config(cfg)
    cls = {
        "gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM, "bert": tf.BertForMaskedLM,
        "bert-cls": tf.BertForSequenceClassification, "gpt_neox": tf.GPTNeoXForCausalLM,
        "phi3": tf.Phi3ForCausalLM,
    }[cfg.arch]
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
