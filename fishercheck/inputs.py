"""The main job's inputs: the model (embedded default or a local HF checkpoint), its
tokenizer, and the two tasks' texts turned into HF-style causal-LM batches
(``input_ids``, ``attention_mask``, ``labels``: ``Tensor[batch, pos]``; ``sample_ids``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"
CHAR_VOCAB = "char_vocab.json"


class CharTokenizer:
    r"""The embedded model's character tokenizer: id 0 pads, "\n" opens and closes a line.

    Args:
        vocab: the characters, by id.
    """

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.index = {c: i for i, c in enumerate(self.vocab)}
        self.pad_token_id = 0
        self.newline = self.index["\n"]

    @classmethod
    def from_dir(cls, path: Path) -> CharTokenizer:
        """The vocabulary saved as ``char_vocab.json`` in ``path``."""
        return cls(json.loads((Path(path) / CHAR_VOCAB).read_text()))

    def encode(self, text: str) -> list[int]:
        r"""Token ids of ``text`` between two "\n" ids.

        Raises:
            ValueError: a character outside the vocabulary.
        """
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            raise ValueError(f"text: expected characters from the model's vocabulary, got {unknown}.")
        return [self.newline] + [self.index[c] for c in text] + [self.newline]


@dataclass
class Inputs:
    """The loaded model (eval mode), its tokenizer, where it came from and whether it is trained."""

    model: torch.nn.Module
    tokenizer: object
    source: str  # "embedded default" or the checkpoint path
    trained: bool  # True only if every tensor of the model came from the checkpoint
    missing: list[str] = field(default_factory=list)  # randomly initialised (--allow-partial)
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model

    @property
    def weights(self) -> str:
        """``"loaded"`` (every tensor), ``"partial"`` (some missing) or ``"random"`` (none)."""
        if self.trained:
            return "loaded"
        return "partial" if self.missing else "random"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "tokenizer.model", "spiece.model")  # what tokenizer.save_pretrained writes


def load_tokenizer(directory: Path, option: str = "--model") -> object:
    """The tokenizer saved in ``directory``: ``char_vocab.json`` (fishercheck's character
    vocabulary) or what ``tokenizer.save_pretrained`` writes, loaded with
    ``local_files_only=True``. Never downloads; a directory without tokenizer files is an
    error (transformers would otherwise build an empty tokenizer for some model types).
    """
    import transformers as tf

    if (directory / CHAR_VOCAB).exists():
        return CharTokenizer.from_dir(directory)
    if not any((directory / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(
            f"{option}: expected tokenizer files in {str(directory)!r} (one of "
            f"{', '.join(TOKENIZER_FILES)}, as tokenizer.save_pretrained writes, or {CHAR_VOCAB}), "
            f"got none; fishercheck never downloads a tokenizer: save yours there or pass "
            f"--tokenizer DIR.")
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{option}: expected a loadable tokenizer in {str(directory)!r}, got "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    if len(tokenizer) == 0:
        raise ValueError(f"{option}: expected a tokenizer with a vocabulary in "
                         f"{str(directory)!r}, got an empty one.")
    return tokenizer


def load_model(path: str | None, tokenizer_path: str | None = None, *,
               allow_partial: bool = False) -> Inputs:
    """The embedded default (``path=None``) or a local HF causal-LM checkpoint (no download).

    The tokenizer comes from ``tokenizer_path`` when given, else from the checkpoint
    directory (see :func:`load_tokenizer`). A directory with a config and no weights gives
    a model with random weights (seeded, ``trained=False``).

    Args:
        path: the checkpoint directory, or None for the embedded default.
        tokenizer_path: a tokenizer directory, or None for the checkpoint's.
        allow_partial: accept weights that miss some of the model's tensors (left randomly
            initialised, seeded; ``trained=False``) or hold tensors the model lacks (ignored);
            both are listed in the result.

    Raises:
        ValueError: no checkpoint, no tokenizer, weights that do not load, or (without
            ``allow_partial``) missing or unexpected tensors.
    """
    import transformers as tf

    directory = DATA if path is None else Path(path)
    if not directory.is_dir():
        raise ValueError(f"--model: expected a local checkpoint directory, got {path!r}.")
    if not (directory / "config.json").is_file():
        raise ValueError(f"--model: expected a Hugging Face checkpoint directory with a "
                         f"config.json, got {str(directory)!r} without one.")
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_dir():
            raise ValueError(f"--tokenizer: expected a local tokenizer directory, got "
                             f"{tokenizer_path!r}.")
        tokenizer = load_tokenizer(Path(tokenizer_path), "--tokenizer")
    else:
        tokenizer = load_tokenizer(directory)
    weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))
    tf.utils.logging.disable_progress_bar()  # no "Loading weights" bar in the CLI's output
    verbosity = tf.utils.logging.get_verbosity()
    tf.utils.logging.set_verbosity_error()  # its load report: missing tensors are ours to say
    info = {}
    try:
        with torch.random.fork_rng(devices=[]):  # tensors not loaded: seeded, global RNG kept
            torch.manual_seed(0)
            if weights:
                model, info = tf.AutoModelForCausalLM.from_pretrained(
                    directory, local_files_only=True, attn_implementation="eager",
                    output_loading_info=True)
            else:  # a config only: random weights, said so in the report
                config = tf.AutoConfig.from_pretrained(directory, local_files_only=True)
                config._attn_implementation = "eager"
                model = tf.AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # corrupt weights, an unknown architecture, a bad config
        first = (str(exc).splitlines() or [""])[0]
        raise ValueError(f"--model: expected a loadable causal-LM checkpoint in "
                         f"{str(directory)!r}, got {type(exc).__name__}: {first}") from exc
    finally:
        tf.utils.logging.set_verbosity(verbosity)
    _check_causal(model, directory)
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    if (missing or unexpected) and not allow_partial:
        raise ValueError(f"--model: expected the checkpoint in {str(directory)!r} to hold every "
                         f"tensor of the model and no other, got {_few(missing, 'missing')} "
                         f"(they would be random) and {_few(unexpected, 'unexpected')}; pass "
                         f"--allow-partial to run anyway (the report lists them).")
    source = str(directory)
    if path is None:
        source = ("embedded default: a character-level GPT-2 (2 layers, 4 heads, width 32) "
                  "trained by fishercheck/data/train_default.py on both tasks (held-out lines)")
    return Inputs(model.eval(), tokenizer, source, bool(weights) and not missing, missing,
                  unexpected)


def _few(names: list[str], what: str, shown: int = 3) -> str:
    """``"2 missing (a, b)"``, ``"5 missing (a, b, c, …)"``: a count and the first names."""
    if not names:
        return f"0 {what}"
    more = ", …" if len(names) > shown else ""
    return f"{len(names)} {what} ({', '.join(names[:shown])}{more})"


# encoder families that AutoModelForCausalLM also loads: without is_decoder=True their
# attention is bidirectional, so a "next-token" loss would see the token it predicts
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra",
                  "ernie", "bert-generation", "data2vec-text", "rembert", "roformer", "xmod",
                  "megatron-bert"}


def _check_causal(model: torch.nn.Module, directory: Path) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in _ENCODER_TYPES and not getattr(config, "is_decoder", False):
        raise ValueError(f"--model: expected a causal LM, got a {config.model_type} checkpoint "
                         f"in {str(directory)!r} with bidirectional attention "
                         f"(is_decoder=False): its next-token loss would see each token it "
                         f"predicts. Save it with config.is_decoder=True to run it as a decoder.")


def model_max_length(model: torch.nn.Module) -> int | None:
    """The model's number of positions (``n_positions`` / ``max_position_embeddings``), if it
    has absolute ones.
    """
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def read_texts(path: str | Path, text_field: str = "text", limit: int | None = None) -> list[str]:
    """Lines of a .txt file, or the ``text_field`` of each record of a .jsonl file.

    Blank lines, and records whose text is empty or only whitespace, are skipped.

    Args:
        path: the task file (``.txt`` or ``.jsonl``, any case).
        text_field: the field of each ``.jsonl`` record.
        limit: at most this many texts.

    Raises:
        ValueError: a missing file, another suffix, non-UTF-8 bytes, invalid JSON, a record
            without a string ``text_field``, or no text at all.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"task file: expected an existing .txt or .jsonl file, got {str(path)!r}.")
    kind = p.suffix.lower()
    if kind not in (".txt", ".jsonl"):
        raise ValueError(f"task file {str(p)!r}: expected a .txt (one text per line) or .jsonl "
                         f"(one JSON object per line) file, got the suffix {p.suffix!r}.")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"task file {str(p)!r}: expected UTF-8 text, got {exc.reason} at "
                         f"byte {exc.start}.") from None
    texts, blank = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if kind == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{n}: expected a JSON object, got invalid JSON "
                                 f"({exc.msg}, column {exc.colno}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"{p}:{n}: expected a JSON object, got {type(record).__name__}.")
            if text_field not in record:
                raise ValueError(f"{p}:{n}: expected a field {text_field!r}, got {sorted(record)}.")
            line = record[text_field]
            if not isinstance(line, str):
                raise ValueError(f"{p}:{n}: expected the field {text_field!r} to be a string, got "
                                 f"{type(line).__name__}.")
            if not line.strip():  # an empty text is skipped, as a blank line of a .txt file
                blank += 1
                continue
        texts.append(line)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        empty = f" ({blank} records with an empty {text_field!r})" if blank else ""
        raise ValueError(f"task file {p}: expected at least one text, got none{empty}.")
    return texts


def _encode(tokenizer: object, text: str) -> list[int]:
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text)["input_ids"])


def make_batch(tokenizer: object, texts: list[str], prefix: str, max_length: int,
               source: str | Path | None = None) -> dict:
    """A right-padded causal-LM batch of ``texts``, each cut to ``max_length`` tokens.

    Args:
        tokenizer: a :class:`CharTokenizer` or a Hugging Face tokenizer.
        texts: one text per row.
        prefix: the rows' sample ids are ``f"{prefix}_{k}"``.
        max_length: tokens per row at most.
        source: the task file, named in the error for a text that cannot be encoded.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding), each
        ``LongTensor[batch, pos]``, and ``sample_ids`` (``list[str]``).
    """
    rows = []
    for k, t in enumerate(texts):
        try:
            rows.append(_encode(tokenizer, t)[:max_length])
        except ValueError as exc:
            where = f"task file {str(source)!r}, text {k + 1}" if source else f"text {k + 1}"
            raise ValueError(f"{where}: {exc}") from None
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else pad
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "sample_ids": [f"{prefix}_{k}" for k in range(len(rows))]}


def default_tasks() -> tuple[Path, Path]:
    """The embedded default's task files (A: addition, B: reversal)."""
    return DATA / "task_a.txt", DATA / "task_b.txt"


def check_batch(batch: dict, model: torch.nn.Module, path: str | Path) -> None:
    """Token ids the model can embed, and at least one row with a label to predict (two or
    more tokens: the causal-LM loss shifts by one).
    """
    ids = batch["input_ids"]
    if ids.numel() == 0 or not bool((batch["labels"][:, 1:] != -100).any()):
        raise ValueError(f"task file {str(path)!r}: expected at least one text of two or more "
                         f"tokens (the loss predicts each token from the previous ones), got "
                         f"{ids.shape[0]} text(s) of at most one token.")
    vocab = model.get_input_embeddings().num_embeddings
    top = int(ids.max())
    if top >= vocab:
        raise ValueError(f"task file {str(path)!r}: expected token ids below the model's "
                         f"vocabulary size {vocab}, got id {top}: is the tokenizer the model's?")
