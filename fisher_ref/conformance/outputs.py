"""Reading adapters' outputs into one form, and the losses the harness passes them."""

from __future__ import annotations

import torch

from fisher_ref.losses import IGNORE_INDEX, causal_lm_loss, reduce_rows, token_nll


class ScaledLoss:
    r"""``c * base(model, batch)``: a plain per-row loss callable (no token protocol).

    .. math:: \ell^{(c)}_i = c\, \ell_i \;\Rightarrow\; g^{(c)}_u = c\, g_u,\;
       F^{(c)} = c^2 F,\; S^{(c)} = c^2 S.
    """

    def __init__(self, scale: float, base=causal_lm_loss):
        self.scale = float(scale)
        self.base = base

    def __call__(self, model, batch: dict) -> torch.Tensor:
        """Each row's loss times c, ``Tensor[B]``."""
        return self.scale * self.base(model, batch)

    def __repr__(self) -> str:
        return f"ScaledLoss({self.scale:g} * {self.base!r})"


class RelabeledLoss:
    r"""A token loss on other labels: each active target y becomes :math:`(y + 1) \bmod C`.

    A loss of the same form and scale as ``base`` (so F keeps its magnitude) that only an
    implementation using the caller's ``loss_fn`` computes: one that takes the model's own
    loss, or its own cross-entropy of ``batch["labels"]``, gets the Fisher of the original
    labels. Keeps the token protocol (``logits_and_targets`` returns the moved targets).
    """

    def __init__(self, base=causal_lm_loss):
        self.base = base
        self.reduction = base.reduction

    def __repr__(self) -> str:
        return f"RelabeledLoss({self.base!r}, y -> (y + 1) mod C)"

    def logits_and_targets(self, model, batch: dict):
        """The base loss's logits and its targets moved to the next class."""
        logits, targets = self.base.logits_and_targets(model, batch)
        moved = torch.where(targets == IGNORE_INDEX, targets, (targets + 1) % logits.shape[-1])
        return logits, moved

    def token_counts(self, batch: dict) -> torch.Tensor:
        """The base loss's active label counts (moving a label keeps it active)."""
        return self.base.token_counts(batch)

    def __call__(self, model, batch: dict) -> torch.Tensor:
        """Each row's loss on the moved labels, ``Tensor[B]``."""
        logits, targets = self.logits_and_targets(model, batch)
        return reduce_rows(token_nll(logits, targets), targets, self.reduction)


def tensor_dict(result, what: str) -> dict[str, torch.Tensor]:
    """A ``dict[str, Tensor]`` from a mapping result, detached, on CPU, float64."""
    if not hasattr(result, "items"):
        raise AssertionError(f"{what}: expected a dict of tensors, got {type(result).__name__}.")
    return {str(k): torch.as_tensor(v).detach().to("cpu", torch.float64) for k, v in result.items()}


def per_unit(result, what: str = "per_sample_contributions") -> tuple[list, dict[str, torch.Tensor]]:
    """``(ids, tensors)`` from a tuple or an object with ``.ids`` and ``.tensors``."""
    if hasattr(result, "ids") and hasattr(result, "tensors"):
        ids, tensors = result.ids, result.tensors
    elif isinstance(result, tuple) and len(result) == 2:
        ids, tensors = result
    else:
        raise AssertionError(f"{what}: expected (ids, tensors) or an object with .ids and "
                             f".tensors, got {type(result).__name__}.")
    return list(ids), tensor_dict(tensors, what)


def group_means(result, what: str = "group_fisher") -> dict[str, torch.Tensor]:
    """Per parameter, the 1-D group means: values may be tensors, dicts with "mean", or
    objects with a ``.mean`` attribute.
    """
    if not hasattr(result, "items"):
        raise AssertionError(f"{what}: expected a dict keyed by parameter, got {type(result).__name__}.")
    out = {}
    for name, value in result.items():
        if isinstance(value, dict):
            value = value["mean"]
        elif hasattr(value, "mean") and not isinstance(value, torch.Tensor):
            value = value.mean
        out[str(name)] = torch.as_tensor(value).detach().to("cpu", torch.float64).reshape(-1)
    return out


def bool_masks(result, what: str = "qkov_mask") -> dict[str, torch.Tensor]:
    """A ``dict[str, BoolTensor]`` from a mapping result, on CPU."""
    if not hasattr(result, "items"):
        raise AssertionError(f"{what}: expected a dict of bool masks, got {type(result).__name__}.")
    return {str(k): torch.as_tensor(v).detach().to("cpu").bool() for k, v in result.items()}


def block_tensors(result, what: str = "interference") -> dict[str, torch.Tensor]:
    """Per block "Q", "K", "V", "O" the ``[N_A, N_B, L, H]`` tensor (float64, CPU)."""
    source = getattr(result, "blocks", result)
    if hasattr(source, "items") and "blocks" in source and hasattr(source["blocks"], "items"):
        source = source["blocks"]
    missing = [b for b in "QKVO" if b not in source]
    if missing:
        raise AssertionError(f"{what}: expected tensors for blocks Q, K, V, O, missing {missing}.")
    return {b: torch.as_tensor(source[b]).detach().to("cpu", torch.float64) for b in "QKVO"}
