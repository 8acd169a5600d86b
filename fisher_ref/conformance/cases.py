"""The examples the properties run on: tiny models, batches with caller ids, and splits.

Two model families are drawn: tiny Hugging Face causal LMs (``TinyConfig``; batches of
token ids, ``causal_lm_loss``) and tiny classifiers (``ClassifierConfig``: MLP, CNN,
LayerNorm/GELU net, ViT with ``nn.MultiheadAttention``; ``(input, labels)`` batches,
``ClassifierLoss``). A drawn example is plain data (a config, a ``DataSpec`` and split
sizes) so that a shrunk counterexample prints as a model id and a short batch anyone can
rebuild with ``build_case_model`` and ``DataSpec.batch()``. Hypothesis shrinks toward the
first choice of each ``sampled_from`` and toward small integers, i.e. toward the first
architecture, one layer, one head, short sequences and a single batch.

Integer sample ids are ``1000 + offset + 7 k``: never a row's position in any batch or
split, so an implementation that keys by position instead of by id is caught.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from hypothesis import strategies as st

from fisher_ref.losses import CausalLMLoss, ClassifierLoss
from fisher_ref.testing.batches import concat_batches, random_batch
from fisher_ref.testing.classifiers import (
    CLASSIFIER_ARCHS,
    ClassifierConfig,
    build_classifier,
    classifier_batch,
)
from fisher_ref.testing.models import TinyConfig, build_model

VOCAB = 11
ID_PREFIXES = ("doc", "doc_a", "q")  # str ids contain underscores on purpose
INT_ID_BASE, INT_ID_STRIDE = 1000, 7  # int ids 1000 + offset + 7k: never a row position
LM_ARCHS = ("gpt2", "llama", "mistral", "qwen2", "phi3", "gpt_neox")
FAMILIES = {"causal_lm": LM_ARCHS, "classifier": CLASSIFIER_ARCHS}
ATTENTION_ARCHS = LM_ARCHS + ("vit",)  # the architectures with an attention layout


def family_of(config) -> str:
    """``"causal_lm"`` for a ``TinyConfig``, ``"classifier"`` for a ``ClassifierConfig``."""
    return "classifier" if isinstance(config, ClassifierConfig) else "causal_lm"


def arch_family(arch: str) -> str:
    """The family an architecture name belongs to."""
    for family, archs in FAMILIES.items():
        if arch in archs:
            return family
    raise ValueError(f"architecture: expected one of {LM_ARCHS + CLASSIFIER_ARCHS}, got {arch!r}.")


def case_loss(config, reduction: str = "mean"):
    """The loss a case's model is checked with: ``CausalLMLoss`` or ``ClassifierLoss``."""
    if family_of(config) == "classifier":
        return ClassifierLoss(reduction)
    return CausalLMLoss(reduction)


@dataclass(frozen=True)
class DataSpec:
    """One task's rows (causal-LM tokens or classifier inputs) plus the caller's sample ids.

    ``id_style`` "int" gives ids ``1000 + id_offset + 7 k``; "str" gives ``f"{prefix}_{k}"``
    style ids (several ids share a prefix, and the prefixes themselves contain ``_``).
    ``tokens`` "low" / "high" draws tokens from the lower / upper half of the vocabulary
    only (classifier inputs: shifted by -1 / +1), so that two tasks can be made to differ.
    ``repeat`` > 1 repeats the first ``batch_size // repeat`` rows (fresh ids) to fill the
    batch. For a classifier, ``input_shape`` and ``num_classes`` come from its config.
    """

    seed: int
    batch_size: int
    seq_len: int = 4
    empty_row: int | None = None
    id_style: str = "int"
    id_offset: int = 0
    tokens: str = "all"
    family: str = "causal_lm"
    input_shape: tuple = ()
    num_classes: int = 0
    repeat: int = 1
    input_dtype: str = "float64"

    def ids(self) -> list:
        """The rows' sample ids."""
        if self.id_style == "int":
            return [INT_ID_BASE + self.id_offset + INT_ID_STRIDE * k for k in range(self.batch_size)]
        return [f"{ID_PREFIXES[k % len(ID_PREFIXES)]}_{self.id_offset + k}"
                for k in range(self.batch_size)]

    def batch(self) -> dict:
        """The batch, with ``sample_ids``."""
        b = self._classifier_batch() if self.family == "classifier" else self._lm_batch()
        if self.repeat > 1:
            n = self.batch_size // self.repeat
            idx = torch.arange(self.batch_size) % n
            b = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
        return b

    def _lm_batch(self) -> dict:
        empty = () if self.empty_row is None else (self.empty_row,)
        vocab = VOCAB // 2 + 1 if self.tokens != "all" else VOCAB  # "low": tokens 1..5
        b = random_batch(kind="causal", vocab_size=vocab, batch_size=self.batch_size,
                         seq_len=self.seq_len, empty_rows=empty, seed=self.seed,
                         sample_ids=self.ids())
        if self.tokens == "high":  # tokens 6..10
            real = b["attention_mask"].bool()
            b["input_ids"] = torch.where(real, b["input_ids"] + VOCAB // 2, b["input_ids"])
            b["labels"] = torch.where(b["labels"] == -100, b["labels"], b["input_ids"])
        return b

    def _classifier_batch(self) -> dict:
        cfg = _ShapeOnly(self.input_shape, self.num_classes)
        empty = () if self.empty_row is None else (self.empty_row,)
        b = classifier_batch(cfg, batch_size=self.batch_size, seed=self.seed, empty_rows=empty,
                             sample_ids=self.ids())
        shift = {"low": -1.0, "high": 1.0}.get(self.tokens, 0.0)
        b["input"] = (b["input"] + shift).to(getattr(torch, self.input_dtype))
        return b

    def describe(self) -> str:
        """The spec and the batch it gives, as text to paste into a bug report."""
        b = self.batch()
        fields = [f"seed={self.seed}", f"batch_size={self.batch_size}"]
        if self.family == "causal_lm":
            fields.append(f"seq_len={self.seq_len}")
        fields += [f"empty_row={self.empty_row}", f"id_style={self.id_style!r}"]
        if self.repeat > 1:
            fields.append(f"repeat={self.repeat}")
        if self.input_dtype != "float64":
            fields.append(f"input_dtype={self.input_dtype!r}")
        if self.family == "classifier":
            return (f"DataSpec({', '.join(fields)}, family='classifier', "
                    f"input_shape={self.input_shape}, num_classes={self.num_classes}) -> "
                    f"sample_ids={b['sample_ids']}, input={_short(b['input'])}, "
                    f"labels={b['labels'].tolist()}")
        return (f"DataSpec({', '.join(fields)}) -> "
                f"sample_ids={b['sample_ids']}, input_ids={b['input_ids'].tolist()}, "
                f"attention_mask={b['attention_mask'].tolist()}, labels={b['labels'].tolist()}")


@dataclass(frozen=True)
class _ShapeOnly:
    input_shape: tuple
    num_classes: int


def _short(x: torch.Tensor) -> str:
    flat = [round(v, 3) for v in x.flatten()[:6].tolist()]
    return f"Tensor{list(x.shape)}[{', '.join(map(str, flat))}{', ...' if x.numel() > 6 else ''}]"


def split_batch(batch: dict, sizes: list[int]) -> list[dict]:
    """Consecutive row blocks of ``batch`` with the given sizes (summing to its rows)."""
    n = n_rows(batch)
    if sum(sizes) != n or min(sizes) < 1:
        raise ValueError(f"split sizes: expected positive sizes summing to {n}, got {sizes}.")
    out, start = [], 0
    for n in sizes:
        out.append({k: (v[start:start + n]) for k, v in batch.items()})
        start += n
    return out


def n_rows(batch: dict) -> int:
    """The number of rows of a batch (its labels' leading axis)."""
    return int(batch["labels"].shape[0])


def join(batches: list[dict]) -> dict:
    """One batch from several (rows stacked, right-padded)."""
    return concat_batches(batches)


@lru_cache(maxsize=32)
def build_case_model(config, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The model of a case, a ``TinyConfig`` or a ``ClassifierConfig`` (cached: adapters must
    leave it unchanged).
    """
    if family_of(config) == "classifier":
        model = build_classifier(config, dtype=dtype)
    else:
        model = build_model(config, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _kv_choices(num_heads: int) -> list[int]:
    """Key-value head counts for ``num_heads`` (shrinking toward no GQA)."""
    return [k for k in (num_heads, 1, 2) if num_heads % k == 0 and k <= num_heads]


SIZES = ("tiny", "scale")


@st.composite
def tiny_configs(draw, archs: tuple[str, ...], max_layers: int = 2, size: str = "tiny"):
    """A consistent model config of one of ``archs``: a ``TinyConfig`` (causal LM, vocab 11,
    4 <= d <= 16) or a ``ClassifierConfig``.

    ``size="scale"`` draws what tiny cases miss: 12 layers, 8 heads (LLaMA-family and
    Phi-3: 8, 4, 2 or 1 key-value heads), d_model 16 (GPT-NeoX 32); classifiers of width 16
    (the ViT with 8 heads).
    """
    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}.")
    arch = draw(st.sampled_from(archs))
    if arch_family(arch) == "classifier":
        return _classifier_config(draw, arch, size)
    layers = 12 if size == "scale" else draw(st.integers(1, max_layers))
    seed = draw(st.integers(0, 3))
    if size == "scale":
        return _scale_lm_config(draw, arch, seed)
    if arch == "gpt2":
        # d >= 4: a LayerNorm over d = 2 maps every token to +-(1, -1) (times its weight), so
        # a later layer's values can coincide at every position and no head reacts to its
        # query or key (the semantic check can then only say "inconclusive" for that head).
        heads = draw(st.sampled_from([1, 2, 4]))
        head_dim = {1: 4, 2: draw(st.sampled_from([4, 2])), 4: 2}[heads]
        return TinyConfig(arch="gpt2", num_layers=layers, num_heads=heads, head_dim=head_dim,
                          vocab_size=VOCAB, seed=seed)
    if arch == "gpt_neox":
        heads = draw(st.sampled_from([1, 2]))  # d = 4 or 8
        return TinyConfig(arch="gpt_neox", num_layers=layers, num_heads=heads, head_dim=4,
                          vocab_size=VOCAB, seed=seed)
    # Every choice is drawn whatever the others are, so that shrinking one (e.g. 4 heads to 2)
    # does not shift how the later ones are read and the shrinker can reach the smallest case.
    heads = draw(st.sampled_from([2, 4]))
    kv = draw(st.sampled_from(_kv_choices(heads)))
    dim = draw(st.sampled_from([2, 4]))
    head_dim = dim if heads == 2 else 2
    wide, bias = draw(st.booleans()), draw(st.booleans())
    hidden = None
    if arch in ("llama", "mistral", "qwen2") and wide:
        hidden = heads * head_dim + 4  # head_dim from the config, not hidden / heads
    return TinyConfig(arch=arch, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                      head_dim=head_dim, hidden=hidden, vocab_size=VOCAB,
                      attention_bias=arch == "llama" and bias, seed=seed)


def _scale_lm_config(draw, arch: str, seed: int) -> TinyConfig:
    if arch == "gpt2":
        return TinyConfig(arch="gpt2", num_layers=12, num_heads=8, head_dim=2, vocab_size=VOCAB,
                          max_positions=32, seed=seed)
    if arch == "gpt_neox":
        return TinyConfig(arch="gpt_neox", num_layers=12, num_heads=8, head_dim=4,
                          vocab_size=VOCAB, max_positions=32, seed=seed)
    kv = draw(st.sampled_from([8, 4, 2, 1]))
    return TinyConfig(arch=arch, num_layers=12, num_heads=8, num_kv_heads=kv, head_dim=2,
                      vocab_size=VOCAB, max_positions=32, attention_bias=arch == "llama",
                      seed=seed)


def _classifier_config(draw, arch: str, size: str) -> ClassifierConfig:
    seed = draw(st.integers(0, 3))
    classes = draw(st.sampled_from([3, 2, 5]))
    if size == "scale":
        return ClassifierConfig(arch=arch, width=16, num_heads=8, num_classes=classes, seed=seed)
    if arch == "vit":
        heads = draw(st.sampled_from([2, 1, 4]))
        return ClassifierConfig(arch="vit", width=4 if heads < 4 else 8, num_heads=heads,
                                num_classes=classes, seed=seed)
    return ClassifierConfig(arch=arch, width=draw(st.sampled_from([4, 3, 6])),
                            num_classes=classes, seed=seed)


@st.composite
def data_specs(draw, config=None, min_rows: int = 1, max_rows: int = 4, id_offset: int = 0,
               tokens: str = "all", allow_empty: bool = True, size: str = "tiny",
               dtype: torch.dtype = torch.float64) -> DataSpec:
    """A task's rows for ``config``'s family (default causal LM): 1-4 rows (``size="scale"``:
    16-24) of 3-6 tokens (scale: 8-12), int or str ids, maybe one empty row; a classifier's
    inputs in ``dtype`` (the model's).
    """
    if size == "scale":
        min_rows, max_rows = max(min_rows, 16), max(max_rows, 24)
    n = draw(st.integers(min_rows, max_rows))
    empty = None
    if allow_empty and n >= 2 and draw(st.booleans()):
        empty = draw(st.integers(0, n - 1))
    seq = draw(st.integers(8, 12) if size == "scale" else st.integers(3, 6))
    extra = {}
    if config is not None and family_of(config) == "classifier":
        extra = {"family": "classifier", "input_shape": config.input_shape,
                 "num_classes": config.num_classes, "seq_len": 1,
                 "input_dtype": str(dtype).removeprefix("torch.")}
    return DataSpec(**{"seed": draw(st.integers(0, 2**16)), "batch_size": n, "seq_len": seq,
                       "empty_row": empty, "id_style": draw(st.sampled_from(["int", "str"])),
                       "id_offset": id_offset, "tokens": tokens, **extra})


@st.composite
def splits(draw, n_rows: int) -> list[int]:
    """Sizes of consecutive batches covering ``n_rows`` rows (shrinks to one batch)."""
    cuts = draw(st.lists(st.booleans(), min_size=n_rows - 1, max_size=n_rows - 1))
    sizes, run = [], 1
    for cut in cuts:
        if cut:
            sizes.append(run)
            run = 1
        else:
            run += 1
    sizes.append(run)
    return sizes


DUPLICATE_ID_OFFSET = 500_000


def duplicate(spec_batch: dict) -> dict:
    """The batch with every row twice; the copies get fresh ids (int ids + 500000, str ids
    with ``"#dup"`` appended).
    """
    ids = spec_batch["sample_ids"]
    copy_ids = [i + DUPLICATE_ID_OFFSET if isinstance(i, int) else f"{i}#dup" for i in ids]
    copy = dict(spec_batch, sample_ids=copy_ids)
    return join([spec_batch, copy])


def config_code(config) -> str:
    """``TinyConfig(...)`` / ``ClassifierConfig(...)`` with the fields that differ from the
    defaults: pasted into ``fisher_ref.testing.models.build_model`` (or
    ``fisher_ref.testing.classifiers.build_classifier``) it rebuilds the model (weights seeded).
    """
    default = type(config)(arch=config.arch)
    fields = [f"arch={config.arch!r}"] + [
        f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
        if f.name != "arch" and getattr(config, f.name) != getattr(default, f.name)]
    return f"{type(config).__name__}({', '.join(fields)})"


def describe_model(config) -> str:
    """``model <id> = <config code>``."""
    return f"model {config.make_id()} = {config_code(config)}"


def describe_case(config, data: DataSpec, sizes: list[int] | None = None) -> str:
    """The model, the data and the split of a case, as text."""
    text = f"{describe_model(config)}; data {data.describe()}"
    if sizes is not None:
        text += f"; split {sizes}"
    return text


def with_offset(spec: DataSpec, offset: int) -> DataSpec:
    """The same rows with ids offset by ``offset``."""
    return replace(spec, id_offset=offset)
