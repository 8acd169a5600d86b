"""The models, batches and method lists the runner times (``benchmarks/run.py``).

A ``Workload`` names one model and batch (or two tasks, or a stream of batches), the quantity
every method computes on it (``kind``) and the methods to time. Models are built from
configs with seeded weights (nothing is downloaded); everything is float32 on ``device``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

#: what the methods of a workload compute (and are cross-checked on)
KINDS = ("full", "exact", "mc", "pipeline", "stream")


@dataclass
class Case:
    """One built workload.

    Attributes:
        model: the model (eval mode; a method needing train mode copies it).
        batch: the batch (``{"input_ids", "labels"}`` or ``{"input", "labels"}``).
        family: ``"lm"`` (causal LM, mean NLL per row) or ``"classifier"``.
        classes: C, the number of classes (vocabulary size for an LM).
        tasks: the pipeline's two task batches (``kind="pipeline"``).
        stream: the accumulator's batches (``kind="stream"``).
        cache: per-method state built on first use (a peer's wrapped copy of the model).
    """

    model: nn.Module
    batch: dict
    family: str
    classes: int
    tasks: tuple = ()
    stream: tuple = ()
    cache: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows of the batch (or of all the stream's batches, or of both tasks)."""
        if self.stream:
            return sum(b["labels"].shape[0] for b in self.stream)
        if self.tasks:
            return sum(b["labels"].shape[0] for b in self.tasks)
        return int(self.batch["labels"].shape[0])


@dataclass(frozen=True)
class Workload:
    """A named case and the methods timed on it.

    Attributes:
        name: readable id, e.g. ``"mlp-784-512-512-10/N256/exact"``.
        kind: one of ``KINDS``.
        build: ``device -> Case``.
        methods: method names of ``benchmarks/methods.py``, the baseline first.
    """

    name: str
    kind: str
    build: Callable[[str], Case]
    methods: tuple


def _ids(vocab: int, rows: int, seq: int, seed: int, device) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def gpt2(layers: int, d: int, heads: int, vocab: int, rows: int, seq: int, seed: int = 1):
    """``device -> Case``: an untied GPT-2 shape (HF ``GPT2LMHeadModel``, eager attention)."""
    def build(device) -> Case:
        import transformers as tf

        cfg = tf.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab,
                            n_positions=max(seq, 16), tie_word_embeddings=False, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        model = tf.GPT2LMHeadModel(cfg).to(device).eval()
        return Case(model, _ids(vocab, rows, seq, seed, device), "lm", vocab)
    return build


def llama(layers: int, d: int, heads: int, kv_heads: int, vocab: int, rows: int, seq: int):
    """``device -> Case``: a LLaMA shape with grouped-query attention (untied head)."""
    def build(device) -> Case:
        import transformers as tf

        cfg = tf.LlamaConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, intermediate_size=int(8 * d / 3) // 8 * 8,
                             vocab_size=vocab, max_position_embeddings=max(seq, 16),
                             tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(cfg).to(device).eval()
        return Case(model, _ids(vocab, rows, seq, 1, device), "lm", vocab)
    return build


def mlp(widths: tuple, rows: int):
    """``device -> Case``: Linear/ReLU layers of ``widths`` (input first, classes last)."""
    def build(device) -> Case:
        torch.manual_seed(0)
        layers = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        model = nn.Sequential(*layers[:-1]).to(device).eval()
        g = torch.Generator().manual_seed(1)
        batch = {"input": torch.randn(rows, widths[0], generator=g).to(device),
                 "labels": torch.randint(0, widths[-1], (rows,), generator=g).to(device)}
        return Case(model, batch, "classifier", widths[-1])
    return build


def cnn(rows: int, side: int = 28, channels: tuple = (1, 16, 32), classes: int = 10):
    """``device -> Case``: LeNet-like Conv(k5)/ReLU/MaxPool x 2, then a Linear head."""
    def build(device) -> Case:
        torch.manual_seed(0)
        c0, c1, c2 = channels
        out = ((side - 4) // 2 - 4) // 2
        model = nn.Sequential(nn.Conv2d(c0, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(c2 * out * out, classes)).to(device).eval()
        g = torch.Generator().manual_seed(1)
        batch = {"input": torch.randn(rows, c0, side, side, generator=g).to(device),
                 "labels": torch.randint(0, classes, (rows,), generator=g).to(device)}
        return Case(model, batch, "classifier", classes)
    return build


def two_tasks(build_a, rows: int, seq: int, vocab: int):
    """``device -> Case`` with two task batches (seeds 1 and 2) on the model of ``build_a``."""
    def build(device) -> Case:
        case = build_a(device)
        case.tasks = (_ids(vocab, rows, seq, 1, device), _ids(vocab, rows, seq, 2, device))
        case.batch = case.tasks[0]
        return case
    return build


def stream(build_a, n_batches: int, rows: int, seq: int, vocab: int):
    """``device -> Case`` with ``n_batches`` batches of ``rows x seq`` (seeds 1, 2, ...)."""
    def build(device) -> Case:
        case = build_a(device)
        case.stream = tuple(_ids(vocab, rows, seq, 1 + i, device) for i in range(n_batches))
        case.batch = {k: torch.cat([b[k] for b in case.stream]) for k in case.stream[0]}
        return case
    return build


FULL = ("fwd+bwd", "fisher_fast", "fisher_fast-group", "loop", "vmap", "opacus", "backpack",
        "nngeometry")
EXACT = ("fwd+bwd", "fisher_fast-exact", "loop-exact", "backpack-exact", "nngeometry-exact")
MC = ("fwd+bwd", "fisher_fast-mc", "backpack-mc", "nngeometry-mc")
PIPELINE = ("naive-loop", "shared-loop", "separate-calls", "cross_task")
STREAM = ("fwd+bwd", "accumulator", "accumulator-fisher", "one-shot", "loop")
GPU_EXTRA = ("fwd+bwd-tf32", "fisher_fast-tf32", "fwd+bwd-bf16", "fisher_fast-bf16")


def suite(name: str, quick: bool = False) -> list[Workload]:
    """The workloads of ``"cpu"`` or ``"gpu"``; ``quick``: the same on tiny shapes (smoke test)."""
    if name not in ("cpu", "gpu"):
        raise ValueError(f"suite: expected 'cpu' or 'gpu', got {name!r}.")
    gpu = name == "gpu"
    if quick:
        lm = dict(layers=1, d=32, heads=2, vocab=64)
        lm_rows, lm_seq, widths, img_rows = 4, 8, (20, 16, 16, 5), 8
        pipe_rows, sweep = (4,), ((2, 8), (4, 16))
        stream_shape = (3, 2, 8)
        lm_shape = gpt2(**lm, rows=lm_rows, seq=lm_seq)
        gqa = llama(layers=1, d=32, heads=4, kv_heads=2, vocab=64, rows=lm_rows, seq=lm_seq)
        side = 16
    else:
        lm = dict(layers=12, d=768, heads=12, vocab=50257) if gpu else \
            dict(layers=4, d=256, heads=4, vocab=8192)
        lm_rows, lm_seq = (64, 256) if gpu else (16, 128)
        widths, img_rows = (784, 512, 512, 10), 1024 if gpu else 256
        pipe_rows = (16, 64)
        sweep = tuple((n, t) for n in (4, 16, 64) for t in (32, 128, 512))
        stream_shape = (20, 8, 64)
        lm_shape = gpt2(**lm, rows=lm_rows, seq=lm_seq)
        gqa = llama(layers=lm["layers"], d=lm["d"] if not gpu else 1024, heads=8 if not gpu else 16,
                    kv_heads=2 if not gpu else 4, vocab=lm["vocab"], rows=lm_rows, seq=lm_seq)
        side = 28
    full = FULL + (GPU_EXTRA if gpu else ())
    lm_id = f"L{lm['layers']}-d{lm['d']}-V{lm['vocab']}/{lm_rows}x{lm_seq}"
    out = [
        Workload(f"gpt2-{lm_id}/full", "full", lm_shape, full),
        Workload(f"llama-gqa-{lm_id}/full", "full", gqa, full),
    ]
    mlp_id = "mlp-" + "-".join(map(str, widths)) + f"/N{img_rows}"
    out += [Workload(f"{mlp_id}/full", "full", mlp(widths, img_rows), full),
            Workload(f"{mlp_id}/exact", "exact", mlp(widths, img_rows), EXACT),
            Workload(f"{mlp_id}/mc", "mc", mlp(widths, img_rows), MC)]
    cnn_id = f"cnn-lenet-{side}x{side}/N{img_rows}"
    out += [Workload(f"{cnn_id}/full", "full", cnn(img_rows, side), full),
            Workload(f"{cnn_id}/exact", "exact", cnn(img_rows, side), EXACT)]
    pipe_lm = dict(lm, layers=lm["layers"] if not quick else 1)
    for n in pipe_rows:
        seq = lm_seq if quick else 64
        out.append(Workload(f"pipeline-gpt2-L{pipe_lm['layers']}-d{pipe_lm['d']}/{n}+{n}x{seq}", "pipeline",
                            two_tasks(gpt2(**pipe_lm, rows=n, seq=seq), n, seq, pipe_lm["vocab"]),
                            PIPELINE))
    nb, rows, seq = stream_shape
    out.append(Workload(f"accumulator-gpt2-{lm_id.split('/')[0]}/{nb}x{rows}x{seq}", "stream",
                        stream(gpt2(**lm, rows=rows, seq=seq), nb, rows, seq, lm["vocab"]), STREAM))
    small = dict(layers=2, d=128, heads=4, vocab=1000) if not quick else lm
    for n, t in sweep:
        out.append(Workload(f"sweep-gpt2-L{small['layers']}-d{small['d']}/N{n}xT{t}", "full",
                            gpt2(**small, rows=n, seq=t), ("fwd+bwd", "fisher_fast", "fisher_fast-group")))
    return out
