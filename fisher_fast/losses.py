r"""Built-in per-row losses implementing the token-loss protocol of docs/architecture.md.

Each loss object ``loss`` offers

- ``loss(model, batch) -> Tensor[B]``: row i's loss, the sum (``reduction="sum"``) or the
  mean (``"mean"``) of the NLL over its K_i active label tokens; 0 for an empty row,
- ``loss.logits_and_targets(model, batch) -> (logits [B, T, C], targets [B, T])``,
- ``loss.token_counts(batch) -> LongTensor[B]`` (K_i, from the labels alone),
- ``loss.reduction``.

.. math::

    \ell_i = \frac{1}{K_i^{[\text{mean}]}} \sum_{t:\,y_{it} \neq -100} -\log
    \operatorname{softmax}(z_{it})_{y_{it}}

Half-precision logits are promoted to float32 before the log-softmax. The language-model
losses call ``model(**batch)`` (labels withheld); ``ClassifierLoss`` calls a plain
classifier with its one positional input, ``model(batch["input"])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")


def model_inputs(batch: dict) -> dict:
    """Every key of the batch except ``sample_ids``: what the model is called with."""
    return {k: v for k, v in batch.items() if k != "sample_ids"}


def model_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Run the model on the batch (labels withheld, so the model computes no loss itself)."""
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL per position ``[B, T]``; 0 where ``targets == -100``."""
    B, T, C = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, C), targets.reshape(B * T),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.reshape(B, T)


def reduce_rows(nll: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Row losses ``[B]`` from per-position NLL: sum, or mean over active positions (0 if none)."""
    total = nll.sum(dim=1)
    if reduction == "sum":
        return total
    count = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1).to(total.dtype)
    return total / count


class _TokenLoss:
    """Shared body of the built-in losses; subclasses align logits and labels."""

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}.")
        self.reduction = reduction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    def align(self, logits: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def targets(self, batch: dict) -> torch.Tensor:
        """The aligned targets ``[B, T]`` computed from the labels alone."""
        if "labels" not in batch:
            raise ValueError(f"{type(self).__name__}: expected a 'labels' entry in the batch, "
                             f"got keys {sorted(batch)}.")
        labels = batch["labels"]
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point \
                or labels.dtype.is_complex or labels.dtype == torch.bool:
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"{type(self).__name__}: expected integer class labels (or -100), "
                             f"got {got}.")
        return self.align(None, labels)[1]

    def token_counts(self, batch: dict) -> torch.Tensor:
        """K_i, the active aligned labels of each row ``LongTensor[B]``, from the labels alone."""
        return (self.targets(batch) != IGNORE_INDEX).sum(dim=1)

    def model_logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The model's logits on the batch: ``model(**batch)``, labels withheld."""
        return model_logits(model, batch)

    def logits_and_targets(self, model: torch.nn.Module,
                           batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, T, C], targets [B, T])``, aligned.

        Checks the targets against the number of classes C before any loss is formed: an
        out-of-range class would be an IndexError on the CPU and a device-side assert (a
        lost CUDA context) on a GPU. (One host sync per call on a GPU.)
        """
        targets = self.targets(batch)
        logits, _ = self.align(self.model_logits(model, batch), batch["labels"])
        C = logits.shape[-1]
        bad = (targets >= C) | ((targets < 0) & (targets != IGNORE_INDEX))
        if bool(bad.any()):
            value = int(targets[bad][0])
            raise ValueError(f"labels: expected class indices in [0, {C}) or {IGNORE_INDEX}, "
                             f"got {value}.")
        return logits, targets

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits, targets = self.logits_and_targets(model, batch)
        return reduce_rows(token_nll(logits, targets), targets, self.reduction)


class CausalLMLoss(_TokenLoss):
    """Next-token loss with the HF shift: logits at t predict the label at t + 1."""

    def align(self, logits: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at t with the label at t + 1: ``logits[:, :-1]``, ``labels[:, 1:]``."""
        return (None if logits is None else logits[:, :-1]), labels[:, 1:]


class MaskedLMLoss(_TokenLoss):
    """Masked-LM loss: logits and labels aligned as they are."""

    def align(self, logits: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels as they are."""
        return logits, labels


class SequenceClassificationLoss(_TokenLoss):
    """Sequence classification: logits ``[B, C]``, labels ``[B]``; one position (T = 1)."""

    def align(self, logits: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, C]`` and labels ``[B]`` as one position: ``[B, 1, C]``, ``[B, 1]``."""
        if labels.dim() != 1:
            raise ValueError(f"SequenceClassificationLoss: expected labels of shape [B], "
                             f"got {tuple(labels.shape)}.")
        return (None if logits is None else logits[:, None, :]), labels[:, None]


class ClassifierLoss(_TokenLoss):
    """A plain classifier's cross-entropy on an ``(input, labels)`` batch.

    ``model(batch[input_key])`` returns logits ``[B, C]`` for labels ``[B]`` (one position,
    T = 1) or ``[B, T, C]`` for labels ``[B, T]``; ``-100`` marks an inactive label.

    Args:
        reduction: ``"mean"`` or ``"sum"`` over a row's active labels.
        input_key: the batch key of the model's input (default ``"input"``).
    """

    def __init__(self, reduction: str = "mean", input_key: str = "input") -> None:
        super().__init__(reduction)
        if not isinstance(input_key, str) or not input_key:
            raise ValueError(f"input_key: expected a non-empty str, got {input_key!r}.")
        self.input_key = input_key

    def __repr__(self) -> str:
        return f"ClassifierLoss(reduction={self.reduction!r}, input_key={self.input_key!r})"

    def align(self, logits: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels ``[B]`` become ``[B, 1]`` and logits ``[B, C]`` become ``[B, 1, C]``."""
        if labels.dim() not in (1, 2):
            raise ValueError(f"ClassifierLoss: expected labels of shape [B] or [B, T], "
                             f"got {tuple(labels.shape)}.")
        if logits is not None and tuple(logits.shape[:-1]) != tuple(labels.shape):
            raise ValueError(f"ClassifierLoss: expected logits of shape {(*labels.shape, 'C')}, "
                             f"got {tuple(logits.shape)}.")
        if labels.dim() == 1:
            return (None if logits is None else logits[:, None, :]), labels[:, None]
        return logits, labels

    def model_logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """``model(batch[input_key])``: logits ``[B, C]`` or ``[B, T, C]``."""
        if self.input_key not in batch:
            raise ValueError(f"ClassifierLoss: expected the model's input under "
                             f"{self.input_key!r}, got keys {sorted(batch)}.")
        out = model(batch[self.input_key])
        logits = out.logits if hasattr(out, "logits") else out
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


causal_lm_loss = CausalLMLoss("mean")
masked_lm_loss = MaskedLMLoss("mean")
sequence_classification_loss = SequenceClassificationLoss("mean")
classifier_loss = ClassifierLoss("mean")


def has_token_protocol(loss_fn) -> bool:
    """True when ``loss_fn`` offers the token-loss protocol (not just ``loss(model, batch)``)."""
    return all(hasattr(loss_fn, a) for a in ("logits_and_targets", "token_counts", "reduction"))
