"""Tiny hand-checkable models shared by the fisher_ref tests (not test modules)."""

import numpy as np
import torch


class SoftmaxRegression(torch.nn.Module):
    """logits = W x (no bias): per-sample gradient of the CE is (p - y) x^T."""

    def __init__(self, n_classes=3, dim=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(n_classes, dim, generator=g, dtype=torch.float64))

    def forward(self, x, labels=None):
        return x @ self.W.T


def softmax_data(n=5, n_classes=3, dim=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return {"x": x, "labels": y}


def softmax_grads_by_hand(model, batch) -> np.ndarray:
    """[n, C, d] per-sample (p - onehot(y)) x^T, in numpy."""
    W, x, y = model.W.detach().numpy(), batch["x"].numpy(), batch["labels"].numpy()
    z = x @ W.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return p[:, :, None] * x[:, None, :]


def softmax_probs(model, batch) -> np.ndarray:
    z = batch["x"].numpy() @ model.W.detach().numpy().T
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)
