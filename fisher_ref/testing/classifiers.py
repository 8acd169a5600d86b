"""Tiny classifiers built from configs: an MLP, a CNN, a LayerNorm/GELU net and a small ViT.

The models most Fisher code in the wild is written for (EWC, pruning, Laplace): plain
``torch.nn`` modules taking one positional input and returning logits ``[batch, classes]``.
Each builder returns a seeded model in ``eval()`` mode; ``ClassifierConfig.make_id()`` names
one model exactly, and ``classifier_batch`` gives the ``(input, labels)`` batch it takes,
``{"input": Tensor[batch, *input_shape], "labels": LongTensor[batch]}`` (label ``-100``: an
empty row), for :class:`fisher_ref.losses.ClassifierLoss`.

========  ====================================================  ==================
arch      modules                                               input
========  ====================================================  ==================
mlp       Linear, Tanh, Linear                                  ``[B, 6]``
cnn       Conv2d 3x3, Tanh, Flatten, Linear                     ``[B, 1, 4, 4]``
ln_gelu   Linear, LayerNorm, GELU, Linear                       ``[B, 6]``
vit       patch Linear, position table, MultiheadAttention      ``[B, 1, 4, 4]``
          (fused ``in_proj_weight``), LayerNorm, MLP, mean
          pool, Linear head
========  ====================================================  ==================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CLASSIFIER_ARCHS = ("mlp", "cnn", "ln_gelu", "vit")
_INPUT_SHAPES = {"mlp": (6,), "cnn": (1, 4, 4), "ln_gelu": (6,), "vit": (1, 4, 4)}
PATCH = 2  # ViT patches of 2 x 2 pixels: 4 patches of a 4 x 4 image


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a tiny classifier.

    Attributes:
        arch: one of ``CLASSIFIER_ARCHS``.
        width: hidden width (MLP, LayerNorm/GELU), channels (CNN) or d_model (ViT).
        num_heads: attention heads (ViT; must divide ``width``).
        num_classes: C.
        seed: seeds the weights.
    """

    arch: str = "mlp"
    width: int = 4
    num_heads: int = 2
    num_classes: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.arch not in CLASSIFIER_ARCHS:
            raise ValueError(f"arch: expected one of {CLASSIFIER_ARCHS}, got {self.arch!r}.")
        for name in ("width", "num_heads", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}.")
        if self.arch == "vit" and self.width % self.num_heads:
            raise ValueError(f"width: expected a multiple of num_heads {self.num_heads} for a ViT, "
                             f"got {self.width}.")
        if self.num_classes < 2:
            raise ValueError(f"num_classes: expected at least 2, got {self.num_classes}.")

    @property
    def family(self) -> str:
        """``"classifier"`` (the harness's model family of these configs)."""
        return "classifier"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one row's input."""
        return _INPUT_SHAPES[self.arch]

    def make_id(self) -> str:
        """A readable case id, e.g. ``arch=vit-d=4-H=2-C=3-seed=0``."""
        parts = [f"arch={self.arch}", f"d={self.width}"]
        if self.arch == "vit":
            parts.append(f"H={self.num_heads}")
        return "-".join(parts + [f"C={self.num_classes}", f"seed={self.seed}"])


class TinyViT(nn.Module):
    """A one-block ViT: patch embedding, position table, pre-norm self-attention (torch's
    ``nn.MultiheadAttention``, fused ``in_proj_weight``), a GELU MLP, mean pooling, a head.

    Args:
        d: d_model. num_heads: H. num_classes: C.
    """

    def __init__(self, d: int, num_heads: int, num_classes: int):
        super().__init__()
        n_patches = (4 // PATCH) ** 2
        self.patch = nn.Linear(PATCH * PATCH, d)
        self.position = nn.Parameter(torch.zeros(n_patches, d))
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, num_classes)

    @staticmethod
    def patches(images: torch.Tensor) -> torch.Tensor:
        """``Tensor[batch, 1, 4, 4]`` -> ``Tensor[batch, patches, PATCH * PATCH]``."""
        b = images.shape[0]
        x = images.reshape(b, 4 // PATCH, PATCH, 4 // PATCH, PATCH)
        return x.permute(0, 1, 3, 2, 4).reshape(b, -1, PATCH * PATCH)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Logits ``Tensor[batch, classes]`` of images ``Tensor[batch, 1, 4, 4]``."""
        h = self.patch(self.patches(input)) + self.position
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(dim=1))


def _module(cfg: ClassifierConfig) -> nn.Module:
    d, C = cfg.width, cfg.num_classes
    if cfg.arch == "mlp":
        return nn.Sequential(nn.Linear(6, d), nn.Tanh(), nn.Linear(d, C))
    if cfg.arch == "cnn":
        return nn.Sequential(nn.Conv2d(1, d, 3, padding=1), nn.Tanh(), nn.Flatten(),
                             nn.Linear(d * 16, C))
    if cfg.arch == "ln_gelu":
        return nn.Sequential(nn.Linear(6, d), nn.LayerNorm(d), nn.GELU(), nn.Linear(d, C))
    return TinyViT(d, cfg.num_heads, C)


def build_classifier(cfg: ClassifierConfig | None = None, *, dtype: torch.dtype = torch.float32,
                     **kwargs) -> nn.Module:
    """Build the tiny classifier ``cfg`` (or ``ClassifierConfig(**kwargs)``), seeded, eval mode.

    Every parameter is perturbed by seeded noise (as for the HF models), so that no constant
    initialisation (norm weights 1, biases 0) hides a wrong index.
    """
    if cfg is None:
        cfg = ClassifierConfig(**kwargs)
    elif kwargs:
        raise ValueError(f"Pass either a ClassifierConfig or keyword arguments, not both: got {kwargs}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _module(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype).eval()


def classifier_batch(cfg: ClassifierConfig, *, batch_size: int = 4, seed: int = 0,
                     empty_rows: tuple[int, ...] = (), sample_ids: list | None = None,
                     dtype: torch.dtype = torch.float64) -> dict:
    """An ``(input, labels)`` batch for ``cfg``: standard normal inputs, uniform labels.

    Args:
        cfg: the classifier.
        batch_size: B.
        seed: seeds inputs and labels.
        empty_rows: rows whose label is ``-100`` (no active label: empty).
        sample_ids: one id per row, stored under ``"sample_ids"`` (default: none).
        dtype: the inputs' dtype.

    Returns:
        ``{"input": Tensor[B, *input_shape], "labels": LongTensor[B]}`` (+ ``sample_ids``).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *cfg.input_shape), generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, cfg.num_classes, (batch_size,), generator=g)
    for r in empty_rows:
        labels[r] = -100
    batch = {"input": x, "labels": labels}
    if sample_ids is not None:
        if len(sample_ids) != batch_size:
            raise ValueError(f"sample_ids: expected {batch_size} ids, got {len(sample_ids)}.")
        batch["sample_ids"] = list(sample_ids)
    return batch
