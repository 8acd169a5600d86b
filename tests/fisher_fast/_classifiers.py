"""Tiny float64 classifiers (an MLP and a CNN) with one position per row (not a test module).

Batches are ``{"input": features, "labels": classes}``: ``nn.Sequential`` takes ``input=``,
so the built-in ``sequence_classification_loss`` of either package (logits ``[B, C]``,
labels ``[B]``) applies as is.
"""

import torch
from torch import nn


def mlp(d_in=5, hidden=4, classes=3, seed=0) -> nn.Module:
    """Linear -> tanh -> Linear -> tanh -> Linear (every weight has T = 1)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, classes)).double().eval()


def cnn(channels=2, classes=3, seed=0, padding="same", stride=1) -> nn.Module:
    """Conv2d(k=2, ``padding``) -> tanh -> Conv2d(k=3, stride, dilation 1) -> tanh -> flatten
    -> Linear, on 2 x 6 x 6 inputs. ``padding="same"`` with k = 2 pads asymmetrically.
    """
    torch.manual_seed(seed)
    first = nn.Conv2d(channels, 3, 2, padding=padding)
    side = 6 - (0 if padding == "same" else 1)
    out = (side - 3) // stride + 1
    return nn.Sequential(first, nn.Tanh(), nn.Conv2d(3, 2, 3, stride=stride), nn.Tanh(),
                         nn.Flatten(), nn.Linear(2 * out * out, classes)).double().eval()


def classifier_batch(model: nn.Module, rows=5, seed=1) -> dict:
    """Random inputs of the model's kind (features or 2 x 6 x 6 images) and labels."""
    g = torch.Generator().manual_seed(seed)
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    shape = (rows, first.in_features) if isinstance(first, nn.Linear) else (rows, first.in_channels, 6, 6)
    classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    return {"input": torch.randn(shape, generator=g, dtype=torch.float64),
            "labels": torch.randint(0, classes, (rows,), generator=g)}
