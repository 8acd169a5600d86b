"""Tiny float64 models covering every capture path (not a test module)."""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D


class Scale(nn.Module):
    """A module of no known kind (direct parameter, elementwise): the functorch path."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x * self.scale)


class OnePlusNorm(nn.Module):
    """Looks like an RMS norm (weight, eps) but computes x / rms(x) * (1 + w) (Gemma):
    the run-time check must send it to functorch.
    """

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-0.2, 0.3, d, dtype=torch.float64))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class TinyLM(nn.Module):
    """ids -> Embedding(padding_idx=0) + positions -> LayerNorm -> Linear -> RMSNorm -> Scale
    -> OnePlusNorm -> Conv1D logits; ``tied`` adds an output Linear sharing the embedding.
    """

    def __init__(self, V=7, d=4, T=6, tied=False, seed=0, rms=True):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.pos = nn.Embedding(T, d)
        self.ln = nn.LayerNorm(d)
        self.lin = nn.Linear(d, d)
        # LlamaRMSNorm computes in float32 even in a float64 model; rms=False removes that
        # float32 island for tests of float64 identities
        self.rms = LlamaRMSNorm(d, eps=1e-6) if rms else nn.Identity()
        self.scale = Scale(d)
        self.gemma = OnePlusNorm(d)
        self.conv = Conv1D(V, d)
        self.tied = tied
        if tied:
            self.out = nn.Linear(d, V, bias=False)
            self.out.weight = self.emb.weight
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.3 * torch.randn_like(p))
        self.double().eval()

    def forward(self, input_ids, attention_mask=None):
        T = input_ids.shape[1]
        h = self.emb(input_ids) + self.pos(torch.arange(T)[None])
        h = self.gemma(self.scale(self.rms(self.lin(self.ln(h)))))
        logits = self.conv(h)
        return logits + self.out(h) if self.tied else logits


def tiny_batch(B=4, T=6, V=7, seed=0, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    ids[:, -1] = 0  # a padding token in every row
    labels = ids.clone()
    labels[:, -1] = -100
    for r in empty_rows:
        labels[r] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def row_gradients(model, batch, loss_fn):
    """Reference: one row at a time, plain autograd -> {name: [B, *shape]} float64."""
    names = [n for n, p in model.named_parameters()]
    params = [p for p in model.parameters()]
    rows = []
    for r in range(next(iter(batch.values())).shape[0]):
        sub = {k: v[r:r + 1] for k, v in batch.items()}
        g = torch.autograd.grad(loss_fn(model, sub).sum(), params, allow_unused=True)
        rows.append([torch.zeros_like(p) if x is None else x for p, x in zip(params, g, strict=True)])
    return {n: torch.stack([row[i] for row in rows]) for i, n in enumerate(names)}
