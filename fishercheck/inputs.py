"""The main job's inputs: the model (embedded default or a local HF checkpoint), its
tokenizer, and the two tasks' texts turned into HF-style causal-LM batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"
CHAR_VOCAB = "char_vocab.json"


class CharTokenizer:
    """The embedded model's character tokenizer: id 0 pads, "\\n" opens and closes a line."""

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.index = {c: i for i, c in enumerate(self.vocab)}
        self.pad_token_id = 0
        self.newline = self.index["\n"]

    @classmethod
    def from_dir(cls, path: Path) -> "CharTokenizer":
        return cls(json.loads((Path(path) / CHAR_VOCAB).read_text()))

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            raise ValueError(f"text: expected characters from the model's vocabulary, got {unknown}.")
        return [self.newline] + [self.index[c] for c in text] + [self.newline]


@dataclass
class Inputs:
    model: torch.nn.Module
    tokenizer: object
    source: str  # "embedded default" or the checkpoint path
    trained: bool  # False: the model's weights are random (reported)


def load_model(path: str | None) -> Inputs:
    """The embedded default (``path=None``) or a local HF causal-LM checkpoint (no download)."""
    import transformers as tf

    directory = DATA if path is None else Path(path)
    if not directory.is_dir():
        raise ValueError(f"--model: expected a local checkpoint directory, got {path!r}.")
    weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))
    if weights:
        model = tf.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                        attn_implementation="eager")
    else:  # a config only: random weights, said so in the report
        config = tf.AutoConfig.from_pretrained(directory, local_files_only=True)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config)
    if (directory / CHAR_VOCAB).exists():
        tokenizer = CharTokenizer.from_dir(directory)
    else:
        tokenizer = tf.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    source = str(directory)
    if path is None:
        source = ("embedded default: a character-level GPT-2 (2 layers, 4 heads, width 32) "
                  "trained by fishercheck/data/train_default.py on both tasks (held-out lines)")
    return Inputs(model.eval(), tokenizer, source, bool(weights))


def read_texts(path: str | Path, text_field: str = "text", limit: int | None = None) -> list[str]:
    """Lines of a .txt file, or the ``text_field`` of each record of a .jsonl file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"task file: expected an existing .txt or .jsonl file, got {str(path)!r}.")
    texts = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            record = json.loads(line)
            if text_field not in record:
                raise ValueError(f"{p}:{n}: expected a field {text_field!r}, got {sorted(record)}.")
            line = str(record[text_field])
        texts.append(line)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise ValueError(f"task file {p}: expected at least one text, got none.")
    return texts


def _encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text)["input_ids"])


def make_batch(tokenizer, texts: list[str], prefix: str, max_length: int) -> dict:
    """Right-padded causal-LM batch; ids ``f"{prefix}_{k}"``; labels -100 on padding."""
    rows = [_encode(tokenizer, t)[:max_length] for t in texts]
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
    return DATA / "task_a.txt", DATA / "task_b.txt"
