"""Hypothesis strategies for property tests and the conformance harness.

Everything drawn is tiny (d_model <= 16, vocab <= 13, T <= 6, B <= 5 by default) so that
the float64 oracle stays fast. Shapes are drawn in dependency order, so every draw is a
consistent model: number of heads, then head_dim, then the key-value ratio (GQA), then
d_model (only LLaMA may have d_model != n_heads * head_dim).

Strategies (all ``@st.composite``; import and call them):

- ``tiny_configs(archs=ARCHS)``: a ``TinyConfig`` for gpt2 (tied head), llama (GQA, an
  explicit head_dim, optional q/k/v bias, tied or not), bert (masked LM) or gpt_neox.
- ``batches(cfg, max_batch=5, max_len=6)``: a batch for the config's loss family, with
  random right padding and random empty rows (never all rows empty), optionally with
  string sample ids.
- ``estimator_options()``: ``{"unit", "weighting", "reduction"}``.
- ``row_splits(n_rows)``: consecutive ``(start, stop)`` pieces covering ``range(n_rows)``
  (how a stream of rows is cut into ``update`` calls).
- ``chunk_sizes()``: ``None`` (automatic) or a small positive int.
- ``fisher_cases(...)``: all of the above in one dict: ``cfg``, ``batch``, ``unit``,
  ``weighting``, ``reduction``, ``splits``, ``chunk_size``, ``micro_batch_size``.

Helpers: ``take_rows(batch, start, stop)`` cuts a batch (sample ids too),
``float64_tolerance_kind(cfg)`` names the tolerance row for two float64 paths on that model
(LLaMA-family RMS norms compute in float32 even in a float64 model), and
``loss_for(module, cfg, reduction)`` picks the config's loss class from a package
(``fisher_ref`` or ``fisher_fast``) so that each package is tested with its own losses.

Nothing here computes a Fisher quantity. Use ``assume()`` (never an early ``return``) to
reject a draw.
"""

from __future__ import annotations

from hypothesis import assume
from hypothesis import strategies as st

from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, loss_kind

ARCHS = ("gpt2", "llama", "bert", "gpt_neox")
UNITS = ("sample", "token")
WEIGHTINGS = ("sample", "token")
REDUCTIONS = ("mean", "sum")
MAX_D_MODEL = 16


@st.composite
def tiny_configs(draw, archs=ARCHS, max_layers: int = 2, max_vocab: int = 13) -> TinyConfig:
    """A consistent tiny transformer shape.

    Order: arch, n_heads, head_dim, kv ratio (a divisor of n_heads; LLaMA only), then
    d_model (LLaMA may decouple it from n_heads * head_dim), then layers, vocab, ties, seed.
    """
    arch = draw(st.sampled_from(archs))
    n_heads = draw(st.integers(1, 4))
    # GPT-NeoX applies rotary to half of head_dim, which must stay even: head_dim 4.
    head_dim = draw(st.sampled_from((4,) if arch == "gpt_neox" else (2, 4)))
    kv_heads = None
    hidden = None
    tie = True
    bias = False
    if arch == "llama":
        ratio = draw(st.sampled_from([r for r in (1, 2, 4) if n_heads % r == 0]))
        kv_heads = n_heads // ratio
        # an explicit head_dim: d_model a multiple of n_heads (HF checks it) other than
        # n_heads * head_dim, or None for the coupled shape
        others = [n_heads * k for k in (2, 4, 8) if k != head_dim and n_heads * k <= MAX_D_MODEL]
        hidden = draw(st.sampled_from([None, *others]))
        tie = draw(st.booleans())
        bias = draw(st.booleans())
    elif arch == "gpt_neox":
        tie = False
    d_model = hidden if hidden is not None else n_heads * head_dim
    assume(d_model <= MAX_D_MODEL)
    return TinyConfig(
        arch=arch, num_layers=draw(st.integers(1, max_layers)), num_heads=n_heads,
        num_kv_heads=kv_heads, head_dim=head_dim, hidden=hidden,
        vocab_size=draw(st.integers(5, max_vocab)), attention_bias=bias, tie_embeddings=tie,
        seed=draw(st.integers(0, 3)),
    )


@st.composite
def batches(draw, cfg: TinyConfig, max_batch: int = 5, max_len: int = 6,
            string_ids: bool | None = None) -> dict:
    """A batch for ``cfg``'s loss family with padding and some empty rows (not all)."""
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(2, max_len))
    empty = draw(st.sets(st.integers(0, B - 1), max_size=B - 1))
    use_strings = draw(st.booleans()) if string_ids is None else string_ids
    ids = [f"s{i}" for i in range(B)] if use_strings else None
    return random_batch(kind=loss_kind(cfg.arch), vocab_size=cfg.vocab_size, batch_size=B,
                        seq_len=T, num_labels=cfg.num_labels, empty_rows=tuple(sorted(empty)),
                        pad=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                        sample_ids=ids)


@st.composite
def estimator_options(draw, units=UNITS, weightings=WEIGHTINGS, reductions=REDUCTIONS) -> dict:
    """``{"unit", "weighting", "reduction"}``."""
    return {"unit": draw(st.sampled_from(units)), "weighting": draw(st.sampled_from(weightings)),
            "reduction": draw(st.sampled_from(reductions))}


@st.composite
def row_splits(draw, n_rows: int, max_pieces: int = 3) -> list[tuple[int, int]]:
    """Consecutive pieces ``[(0, a), (a, b), ..., (z, n_rows)]`` of at least one row each."""
    cuts = draw(st.sets(st.integers(1, max(n_rows - 1, 1)), max_size=max_pieces - 1))
    bounds = [0] + sorted(c for c in cuts if 0 < c < n_rows) + [n_rows]
    return list(zip(bounds[:-1], bounds[1:], strict=False))


def chunk_sizes(max_size: int = 6):
    """``None`` (the implementation chooses) or a chunk size in ``1..max_size``."""
    return st.one_of(st.none(), st.integers(1, max_size))


@st.composite
def fisher_cases(draw, archs=ARCHS, max_batch: int = 5, max_len: int = 6,
                 units=UNITS) -> dict:
    """One whole property-test case (see the module docstring for the keys)."""
    cfg = draw(tiny_configs(archs=archs))
    batch = draw(batches(cfg, max_batch=max_batch, max_len=max_len))
    opts = draw(estimator_options(units=units))
    n_rows = batch["input_ids"].shape[0]
    return {"cfg": cfg, "batch": batch, **opts, "splits": draw(row_splits(n_rows)),
            "chunk_size": draw(chunk_sizes()),
            "micro_batch_size": draw(st.integers(1, 4))}


FLOAT32_NORM_ARCHS = ("llama", "mistral", "qwen2", "phi3")


def float64_tolerance_kind(cfg: TinyConfig) -> str:
    """The tolerance-table row for comparing two float64 paths on ``cfg``'s model:
    "float64-float32-norm" where the model's RMS norms compute in float32 even in float64
    (see the table's reason), else "float64-paths".
    """
    return "float64-float32-norm" if cfg.arch in FLOAT32_NORM_ARCHS else "float64-paths"


def take_rows(batch: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every tensor (and of ``sample_ids``)."""
    return {k: v[start:stop] for k, v in batch.items()}


def loss_for(package, cfg: TinyConfig, reduction: str = "mean"):
    """``package``'s loss object for ``cfg``'s family (causal, mlm or cls)."""
    cls = {"causal": "CausalLMLoss", "mlm": "MaskedLMLoss",
           "cls": "SequenceClassificationLoss"}[loss_kind(cfg.arch)]
    return getattr(package, cls)(reduction)
