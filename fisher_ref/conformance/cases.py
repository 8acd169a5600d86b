"""The examples the properties run on: tiny models, batches with caller ids, and splits.

A drawn example is plain data (a ``TinyConfig``, a ``DataSpec`` and split sizes) so that a
shrunk counterexample prints as a model id and a short batch anyone can rebuild with
``build_case_model`` and ``DataSpec.batch()``. Hypothesis shrinks toward the first choice of
each ``sampled_from`` and toward small integers, i.e. toward GPT-2, one layer, one head,
short sequences and a single batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from hypothesis import strategies as st

from fisher_ref.testing.batches import concat_batches, random_batch
from fisher_ref.testing.models import TinyConfig, build_model

VOCAB = 11
ID_PREFIXES = ("doc", "doc_a", "q")  # str ids contain underscores on purpose


@dataclass(frozen=True)
class DataSpec:
    """One task's rows: ``random_batch(seed=..)`` plus the caller's sample ids.

    ``id_style`` "int" gives ids ``offset + k``; "str" gives ``f"{prefix}_{k}"``-style ids
    (several ids share a prefix, and the prefixes themselves contain ``_``). ``tokens``
    "low" / "high" draws tokens from the lower / upper half of the vocabulary only, so that
    two tasks can be made to differ.
    """

    seed: int
    batch_size: int
    seq_len: int
    empty_row: int | None = None
    id_style: str = "int"
    id_offset: int = 0
    tokens: str = "all"

    def ids(self) -> list:
        if self.id_style == "int":
            return [self.id_offset + k for k in range(self.batch_size)]
        return [f"{ID_PREFIXES[k % len(ID_PREFIXES)]}_{self.id_offset + k}"
                for k in range(self.batch_size)]

    def batch(self) -> dict:
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

    def describe(self) -> str:
        b = self.batch()
        return (f"DataSpec(seed={self.seed}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"empty_row={self.empty_row}, id_style={self.id_style!r}) -> "
                f"sample_ids={b['sample_ids']}, input_ids={b['input_ids'].tolist()}, "
                f"attention_mask={b['attention_mask'].tolist()}, labels={b['labels'].tolist()}")


def split_batch(batch: dict, sizes: list[int]) -> list[dict]:
    """Consecutive row blocks of ``batch`` with the given sizes (summing to its rows)."""
    if sum(sizes) != batch["input_ids"].shape[0] or min(sizes) < 1:
        raise ValueError(f"split sizes: expected positive sizes summing to "
                         f"{batch['input_ids'].shape[0]}, got {sizes}.")
    out, start = [], 0
    for n in sizes:
        out.append({k: (v[start:start + n]) for k, v in batch.items()})
        start += n
    return out


def join(batches: list[dict]) -> dict:
    """One batch from several (rows stacked, right-padded)."""
    return concat_batches(batches)


@lru_cache(maxsize=32)
def build_case_model(config: TinyConfig, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The model of a case (cached: adapters must leave it unchanged)."""
    model = build_model(config, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _kv_choices(num_heads: int) -> list[int]:
    return [k for k in (num_heads, 1, 2) if num_heads % k == 0 and k <= num_heads]


@st.composite
def tiny_configs(draw, archs: tuple[str, ...], max_layers: int = 2) -> TinyConfig:
    """A consistent tiny causal-LM config of one of ``archs`` (4 <= d <= 16, vocab 11)."""
    arch = draw(st.sampled_from(archs))
    layers = draw(st.integers(1, max_layers))
    seed = draw(st.integers(0, 3))
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


@st.composite
def data_specs(draw, min_rows: int = 1, max_rows: int = 4, id_offset: int = 0,
               tokens: str = "all", allow_empty: bool = True) -> DataSpec:
    """A task's rows: 1-4 rows of 3-6 tokens, int or str ids, maybe one empty row."""
    n = draw(st.integers(min_rows, max_rows))
    empty = None
    if allow_empty and n >= 2 and draw(st.booleans()):
        empty = draw(st.integers(0, n - 1))
    return DataSpec(seed=draw(st.integers(0, 2**16)), batch_size=n,
                    seq_len=draw(st.integers(3, 6)), empty_row=empty,
                    id_style=draw(st.sampled_from(["int", "str"])), id_offset=id_offset,
                    tokens=tokens)


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


def duplicate(spec_batch: dict) -> dict:
    """The batch with every row twice; the copies get fresh ids (int ids + 1000, str ids
    with ``"#dup"`` appended).
    """
    ids = spec_batch["sample_ids"]
    copy_ids = [i + 1000 if isinstance(i, int) else f"{i}#dup" for i in ids]
    copy = dict(spec_batch, sample_ids=copy_ids)
    return join([spec_batch, copy])


def config_code(config: TinyConfig) -> str:
    """``TinyConfig(...)`` with the fields that differ from the defaults: pasted into
    ``fisher_ref.testing.models.build_model`` it rebuilds the model (weights seeded).
    """
    default = TinyConfig(arch=config.arch)
    fields = [f"arch={config.arch!r}"] + [
        f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
        if f.name != "arch" and getattr(config, f.name) != getattr(default, f.name)]
    return f"TinyConfig({', '.join(fields)})"


def describe_model(config: TinyConfig) -> str:
    return f"model {config.make_id()} = {config_code(config)}"


def describe_case(config: TinyConfig, data: DataSpec, sizes: list[int] | None = None) -> str:
    text = f"{describe_model(config)}; data {data.describe()}"
    if sizes is not None:
        text += f"; split {sizes}"
    return text


def with_offset(spec: DataSpec, offset: int) -> DataSpec:
    return replace(spec, id_offset=offset)
