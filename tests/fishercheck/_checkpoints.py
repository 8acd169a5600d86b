"""Local Hugging Face checkpoints built from configs, for the CLI tests (nothing downloaded)."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fisher_ref.testing.models import TinyConfig, build_model

WORDS = ["[UNK]", "[PAD]", "hello", "world", "foo", "bar", "baz", "one", "two", "three", "four"]


def save_tokenizer(directory):
    """A word-level tokenizer of 11 words, saved as tokenizer.save_pretrained does."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                            pad_token="[PAD]").save_pretrained(directory)


def checkpoint(tmp_path, arch, tokenizer=True, vocab_size=None, name=None):
    """A 1-layer model of ``arch`` saved with save_pretrained in ``tmp_path / (name or arch)``."""
    d = tmp_path / (name or arch)
    vocab_size = len(WORDS) if vocab_size is None else vocab_size
    build_model(TinyConfig(arch=arch, num_layers=1, num_heads=2, head_dim=4, vocab_size=vocab_size),
                dtype=torch.float32).save_pretrained(d)
    if tokenizer:
        save_tokenizer(d)
    return d


def edit_weights(directory, drop=(), add=None):
    """Rewrite the checkpoint's weights without the tensors whose names start with ``drop``,
    plus ``add``; returns the names dropped.
    """
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    dropped = sorted(n for n in tensors if n.startswith(drop)) if drop else []
    kept = {n: t for n, t in tensors.items() if n not in dropped}
    save_file({**kept, **(add or {})}, path, metadata={"format": "pt"})
    return dropped
