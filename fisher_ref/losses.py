"""Built-in per-row losses implementing the token-loss protocol (docs/architecture.md).

A token loss ``loss`` provides:

- ``loss(model, batch) -> Tensor[B]``: each row's loss, the sum (``reduction="sum"``) or
  mean (``"mean"``) of the NLL over that row's active label tokens; 0 for an empty row.
- ``loss.logits_and_targets(model, batch) -> (logits [B, T, C], targets [B, T])``: the
  aligned predictions and labels (``-100`` = inactive).
- ``loss.token_counts(batch) -> LongTensor[B]``: K_i, active label tokens per row.
- ``loss.reduction``.

The language-model losses pass every batch key except ``sample_ids`` and ``labels`` to the
model as keyword arguments: the labels are used here, so the model does not compute a loss
of its own. :class:`ClassifierLoss` is the plain classifier's: an ``(input, labels)`` batch,
``model(batch["input"])`` with one positional argument, as an MLP, a CNN or a ViT takes it.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")


def model_inputs(batch: dict) -> dict:
    """The keyword arguments for the model: every batch key except ``sample_ids`` and ``labels``."""
    return {k: v for k, v in batch.items() if k not in ("sample_ids", "labels")}


def output_logits(output: object) -> torch.Tensor:
    """The logits of a model output: ``.logits``, the first tuple entry, or the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(
        f"Model output: expected a tensor, an object with .logits or a tuple of tensors, "
        f"got {type(output).__name__}."
    )


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Per-token NLL: :math:`-\log \mathrm{softmax}(z_{b,t})_{y_{b,t}}`, 0 where inactive.

    Args:
        logits: ``Tensor[batch, pos, classes]``.
        targets: ``LongTensor[batch, pos]``, class indices or -100 (inactive).

    Returns:
        ``Tensor[batch, pos]``.
    """
    active = targets != IGNORE_INDEX
    n_classes = logits.shape[-1]
    bad = active & ((targets < 0) | (targets >= n_classes))
    if bool(bad.any()):
        raise ValueError(f"labels: expected class indices in [0, {n_classes}) or {IGNORE_INDEX}, "
                         f"got {int(targets[bad][0])}.")
    logp = torch.log_softmax(logits, dim=-1)
    safe = torch.where(active, targets, torch.zeros_like(targets))
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(active, nll, torch.zeros_like(nll))


def reduce_rows(nll: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Row losses from per-token NLL: sum, or sum / K_i (0 for an empty row).

    Args:
        nll: ``Tensor[batch, pos]`` (:func:`token_nll`).
        targets: ``LongTensor[batch, pos]``, -100 where inactive.
        reduction: ``"sum"`` or ``"mean"``.

    Returns:
        ``Tensor[batch]``.
    """
    total = nll.sum(dim=1)
    if reduction == "sum":
        return total
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return total / counts.clamp(min=1).to(total.dtype)


class _TokenLoss:
    """Shared machinery: subclasses define how logits and labels are aligned."""

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}.")
        self.reduction = reduction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    def align(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's logits and the batch's labels, aligned: ``(Tensor[batch, pos, classes],
        LongTensor[batch, pos])``, the logits at each position predicting the target there.
        """
        raise NotImplementedError

    def aligned_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The targets of :meth:`align` from the labels alone: ``LongTensor[batch, pos]``."""
        raise NotImplementedError

    def logits_and_targets(self, model: torch.nn.Module,
                           batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits Tensor[batch, pos, classes], targets LongTensor[batch, pos])`` from one
        forward of ``model`` on ``batch``.
        """
        logits = output_logits(model(**model_inputs(batch)))
        return self.align(logits, batch["labels"])

    def token_counts(self, batch: dict) -> torch.Tensor:
        """K_i, the active label tokens of each row, from the labels alone: ``LongTensor[batch]``."""
        return (self.aligned_labels(batch["labels"]) != IGNORE_INDEX).sum(dim=1)

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits, targets = self.logits_and_targets(model, batch)
        return reduce_rows(token_nll(logits, targets), targets, self.reduction)


class CausalLMLoss(_TokenLoss):
    r"""Next-token loss with the HF shift: logits at t predict the label at t + 1.

    .. math:: \ell_i = \rho_i \sum_{t:\, y_{i,t+1} \ne -100} -\log p_\theta(y_{i,t+1} \mid x_{i,\le t}),
       \quad \rho_i = 1/K_i \text{ (mean) or } 1 \text{ (sum)}.
    """

    def align(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at t and labels at t + 1: ``(Tensor[batch, pos - 1, vocab],
        LongTensor[batch, pos - 1])``.
        """
        return logits[:, :-1, :], labels[:, 1:]

    def aligned_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels at t + 1: ``LongTensor[batch, pos - 1]``."""
        return labels[:, 1:]


class MaskedLMLoss(_TokenLoss):
    """Masked-LM loss: logits at t predict the label at t (no shift)."""

    def align(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels at the same t: ``(Tensor[batch, pos, vocab], LongTensor[batch, pos])``."""
        return logits, labels

    def aligned_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels unchanged: ``LongTensor[batch, pos]``."""
        return labels


class SequenceClassificationLoss(_TokenLoss):
    """Sequence classification: logits ``[B, C]`` and labels ``[B]`` become T = 1."""

    def align(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Tensor[batch, classes]`` and ``LongTensor[batch]`` as ``(Tensor[batch, 1, classes],
        LongTensor[batch, 1])``.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits: expected shape [B, C] for sequence classification, got "
                             f"{tuple(logits.shape)}.")
        return logits.reshape(logits.shape[0], 1, -1), labels.reshape(-1, 1)

    def aligned_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels as ``LongTensor[batch, 1]``."""
        return labels.reshape(-1, 1)


class ClassifierLoss(_TokenLoss):
    r"""A plain classifier's cross-entropy on an ``(input, labels)`` batch.

    The model is called with one positional argument, ``model(batch[input_key])``, and
    returns logits ``Tensor[batch, classes]`` for labels ``LongTensor[batch]`` (one label
    per row: T = 1, so ``"mean"`` and ``"sum"`` give the same row loss), or logits
    ``Tensor[batch, pos, classes]`` for labels ``LongTensor[batch, pos]`` (e.g. one label
    per pixel or per patch), reduced over the row's active labels. A label of ``-100`` is
    inactive; a row without an active label is empty.

    .. math:: \ell_i = \rho_i \sum_{t:\, y_{i,t} \ne -100} -\log \mathrm{softmax}(z_{i,t})_{y_{i,t}},
       \quad \rho_i = 1/K_i \text{ (mean) or } 1 \text{ (sum)}.

    Args:
        reduction: ``"mean"`` or ``"sum"`` over a row's active labels.
        input_key: the batch key holding the model's input (default ``"input"``).
    """

    def __init__(self, reduction: str = "mean", input_key: str = "input") -> None:
        super().__init__(reduction)
        if not isinstance(input_key, str) or not input_key:
            raise ValueError(f"input_key: expected a non-empty str, got {input_key!r}.")
        self.input_key = input_key

    def __repr__(self) -> str:
        return f"ClassifierLoss(reduction={self.reduction!r}, input_key={self.input_key!r})"

    def logits_and_targets(self, model: torch.nn.Module,
                           batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, T, C], targets [B, T])`` from ``model(batch[input_key])``."""
        logits = output_logits(model(batch[self.input_key]))
        return self.align(logits, batch["labels"])

    def align(self, logits: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, C]`` with labels ``[B]`` become T = 1; ``[B, T, C]`` with ``[B, T]`` stay."""
        want = labels.dim() + 1
        if logits.dim() != want or logits.shape[:-1] != labels.shape:
            raise ValueError(f"logits: expected shape {(*labels.shape, 'C')} for labels of shape "
                             f"{tuple(labels.shape)}, got {tuple(logits.shape)}.")
        if labels.dim() == 1:
            return logits.unsqueeze(1), labels.unsqueeze(1)
        return logits, labels

    def aligned_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels as ``[B, T]`` (T = 1 for one label per row)."""
        return labels.unsqueeze(1) if labels.dim() == 1 else labels


causal_lm_loss = CausalLMLoss("mean")
masked_lm_loss = MaskedLMLoss("mean")
sequence_classification_loss = SequenceClassificationLoss("mean")
classifier_loss = ClassifierLoss("mean")


def is_token_loss(loss_fn: object) -> bool:
    """Whether ``loss_fn`` implements the token-loss protocol."""
    return all(hasattr(loss_fn, a) for a in ("logits_and_targets", "token_counts", "reduction"))
