r"""Produce fishercheck's embedded default: a tiny character-level GPT-2 and two text tasks.

Run from the repository root (takes well under a minute on one CPU core)::

    python fishercheck/data/train_default.py

It writes, next to this file:

- ``task_a.txt``: task A, "addition": lines such as ``12+7=19``.
- ``task_b.txt``: task B, "reversal": lines such as ``kqd>dqk``.
- ``char_vocab.json``: the character vocabulary (id 0 is padding, ``"\n"`` starts and ends a line).
- ``config.json`` and ``model.safetensors``: a GPT-2 (2 layers, 4 heads, width 32) trained for
  3000 AdamW steps (linear decay) on fresh lines of both tasks (different seeds from the shipped
  files, so the shipped lines are held out). Everything is seeded; rerunning reproduces the
  files up to floating-point nondeterminism of the CPU kernels.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VOCAB = ["<pad>", "\n"] + list(string.digits) + list(string.ascii_lowercase) + ["+", "=", ">"]
N_SHIPPED = 128  # lines per shipped task file
MAX_LEN = 16  # characters per encoded line, "\n" delimiters included


def addition_line(rng: random.Random) -> str:
    """A line of task A: ``a+b=c`` with a, b in [0, 50)."""
    a, b = rng.randrange(0, 50), rng.randrange(0, 50)
    return f"{a}+{b}={a + b}"


def reversal_line(rng: random.Random) -> str:
    """A line of task B: a word of 2-5 letters from a-l, ``>``, the word reversed."""
    w = "".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randrange(2, 6)))
    return f"{w}>{w[::-1]}"


def lines(make: Callable[[random.Random], str], n: int, seed: int) -> list[str]:
    """``n`` lines of ``make`` from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]


def encode(batch_lines: list[str]) -> dict[str, torch.Tensor]:
    r"""A right-padded training batch: ``input_ids``, ``attention_mask``, ``labels`` ``[batch, pos]``
    (each line between two ``"\n"``; labels -100 on padding).
    """
    index = {c: i for i, c in enumerate(VOCAB)}
    rows = [[index["\n"]] + [index[c] for c in s] + [index["\n"]] for s in batch_lines]
    T = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main(steps: int = 3000, batch_size: int = 64) -> None:
    """Write the task files, the vocabulary and the trained model next to this file."""
    import transformers as tf

    torch.manual_seed(0)
    (HERE / "task_a.txt").write_text("\n".join(lines(addition_line, N_SHIPPED, 1)) + "\n")
    (HERE / "task_b.txt").write_text("\n".join(lines(reversal_line, N_SHIPPED, 2)) + "\n")
    (HERE / "char_vocab.json").write_text(json.dumps(VOCAB, indent=0) + "\n")
    cfg = tf.GPT2Config(vocab_size=len(VOCAB), n_positions=MAX_LEN * 2, n_embd=32, n_layer=2,
                        n_head=4, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tf.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    train_a = lines(addition_line, steps * batch_size // 2, 101)
    train_b = lines(reversal_line, steps * batch_size // 2, 102)
    half = batch_size // 2
    model.train()
    for step in range(steps):
        batch = encode(train_a[step * half:(step + 1) * half] + train_b[step * half:(step + 1) * half])
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    model.save_pretrained(HERE, safe_serialization=True)
    for extra in ("generation_config.json",):
        (HERE / extra).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
