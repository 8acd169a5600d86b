"""Input validation for ``fisher_ref``: every failure is a ``ValueError`` saying
what was expected and what came.
"""

from __future__ import annotations

import inspect
import math

import torch

from fisher_ref._types import Batch, LossFn, SampleId, UnitId
from fisher_ref.losses import (
    CausalLMLoss,
    ClassifierLoss,
    MaskedLMLoss,
    SequenceClassificationLoss,
    _TokenLoss,
    causal_lm_loss,
    is_token_loss,
)

UNITS = ("sample", "token")
WEIGHTINGS = ("sample", "token")
_SEQUENCE_KEYS = ("attention_mask", "token_type_ids", "position_ids")


def check_options(loss_fn: LossFn | None, unit: str, weighting: str, *,
                  needs_token_loss: bool = False) -> LossFn:
    """Validate ``unit`` / ``weighting`` and resolve ``loss_fn=None`` to ``causal_lm_loss``.

    Args:
        loss_fn: ``loss_fn(model, batch) -> Tensor[batch]``, or None.
        unit: ``"sample"`` or ``"token"``.
        weighting: ``"sample"`` or ``"token"``.
        needs_token_loss: the estimator needs a token loss whatever ``unit`` and
            ``weighting`` say (MC and exact Fisher).

    Returns:
        The loss to use.

    Raises:
        ValueError: an unknown option, a non-callable loss, or a plain callable where a token
            loss is needed.
    """
    if unit not in UNITS:
        raise ValueError(f"unit: expected one of {UNITS}, got {unit!r}.")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}.")
    if loss_fn is None:
        loss_fn = causal_lm_loss
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: expected a callable loss_fn(model, batch) -> Tensor[B], "
                         f"got {type(loss_fn).__name__}.")
    wants = [w for w, on in (("unit='token'", unit == "token"),
                             ("weighting='token'", weighting == "token"),
                             ("this estimator", needs_token_loss)) if on]
    if wants and not is_token_loss(loss_fn):
        raise ValueError(
            f"loss_fn: expected a token loss (with logits_and_targets, token_counts and "
            f"reduction) for {', '.join(wants)}, got {type(loss_fn).__name__}."
        )
    return loss_fn


def check_model(model: torch.nn.Module) -> None:
    """The model is a module with at least one trainable parameter."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model: expected at least one trainable parameter "
                         "(requires_grad=True), got none.")


def resolve_sample_ids(batch: Batch, sample_ids: object, batch_size: int) -> list[SampleId]:
    """The rows' sample ids: from the batch, the argument, or ``0..B-1``; unique.

    Args:
        batch: the batch; its ``sample_ids`` key, if any, gives the ids.
        sample_ids: the caller's ids (never together with the batch's), or None.
        batch_size: B, the number of rows.

    Returns:
        B unique str or int ids, in row order.
    """
    if "sample_ids" in batch and sample_ids is not None:
        raise ValueError("sample_ids: expected them in the batch or as the argument, "
                         "got both.")
    ids = batch.get("sample_ids", sample_ids)
    if ids is None:
        return list(range(batch_size))
    if hasattr(ids, "tolist"):  # a tensor or a numpy array of ids: Python ints
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"sample_ids: expected a sequence of {batch_size} ids, got {ids!r}.")
    ids = list(ids)
    if len(ids) != batch_size:
        raise ValueError(f"sample_ids: expected {batch_size} ids (one per row), got {len(ids)}.")
    bad = [i for i in ids if not isinstance(i, (str, int)) or isinstance(i, bool)]
    if bad:
        raise ValueError(f"sample_ids: expected str or int ids, got {bad[0]!r}.")
    seen, dups = set(), []
    for i in ids:
        if i in seen:
            dups.append(i)
        seen.add(i)
    if dups:
        raise ValueError(f"sample_ids: expected unique ids, got duplicates {sorted(set(map(str, dups)))}.")
    return ids


def is_builtin_loss(loss_fn) -> bool:
    """Whether ``loss_fn`` is one of ``fisher_ref.losses``' (``None`` means ``causal_lm_loss``)."""
    return loss_fn is None or isinstance(loss_fn, _TokenLoss)


def _check_classifier_keys(batch: dict, loss_fn: ClassifierLoss) -> None:
    if loss_fn.input_key not in batch:
        keys = sorted(k for k in batch if k != "sample_ids")
        raise ValueError(f"batch: expected key {loss_fn.input_key!r} (the classifier's input) for "
                         f"{loss_fn!r}, got keys {keys}.")


def _check_keys(model, batch: dict, loss_fn=None) -> None:
    """The batch's keys fit how the built-in loss calls the model.

    The language-model losses pass every key but ``sample_ids`` and ``labels`` to the
    model's forward (they withhold the labels, so a forward without a ``labels`` argument
    is fine); :class:`~fisher_ref.losses.ClassifierLoss` needs its input key. A custom
    ``loss_fn`` is not checked here: its batch's keys are its own business.
    """
    if not is_builtin_loss(loss_fn):
        return
    if isinstance(loss_fn, ClassifierLoss):
        _check_classifier_keys(batch, loss_fn)
        return
    keys = [k for k in batch if k not in ("sample_ids", "labels")]
    main = getattr(model, "main_input_name", None)
    if isinstance(main, str) and main not in batch and "inputs_embeds" not in batch:
        raise ValueError(f"batch: expected key {main!r} (the model's main input), "
                         f"got keys {sorted(keys)}.")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forwards
        return
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not var_kw or isinstance(main, str):
        unknown = [k for k in keys if k not in params]
        if unknown:
            named = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
            raise ValueError(f"batch: expected keys among {type(model).__name__}.forward's "
                             f"arguments {named}, got unknown keys {unknown}.")
    required = [n for n, p in params.items()
                if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [n for n in required if n not in batch]
    if missing:
        raise ValueError(f"batch: expected keys {missing} (required by "
                         f"{type(model).__name__}.forward), got keys {sorted(keys)}.")


def _check_labels(batch: dict, loss_fn, batch_size: int) -> None:
    if not is_token_loss(loss_fn):
        return
    if "labels" not in batch:
        keys = sorted(k for k in batch if k != "sample_ids")
        raise ValueError(f"batch: expected key 'labels' for {type(loss_fn).__name__}, got keys {keys}.")
    labels = batch["labels"]
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor, got dtype {labels.dtype}.")
    ref = batch.get("input_ids")
    if isinstance(loss_fn, ClassifierLoss):
        if labels.dim() not in (1, 2) or labels.shape[0] != batch_size:
            raise ValueError(f"labels: expected shape [{batch_size}] (one label per row) or "
                             f"[{batch_size}, T] for {loss_fn!r}, got {tuple(labels.shape)}.")
    elif isinstance(loss_fn, SequenceClassificationLoss):
        if tuple(labels.shape) != (batch_size,):
            raise ValueError(f"labels: expected shape {(batch_size,)} for sequence "
                             f"classification, got {tuple(labels.shape)}.")
    elif isinstance(loss_fn, (CausalLMLoss, MaskedLMLoss)):
        if labels.dim() != 2:
            raise ValueError(f"labels: expected shape [B, T], got {tuple(labels.shape)}.")
        if ref is not None and labels.shape != ref.shape:
            raise ValueError(f"labels: expected the shape of input_ids {tuple(ref.shape)}, "
                             f"got {tuple(labels.shape)}.")


def check_batch(model: torch.nn.Module, batch: Batch, loss_fn: LossFn,
                sample_ids: object) -> list[SampleId]:
    """Validate ``batch`` (keys, shapes, ids); return the rows' sample ids.

    Args:
        model: the model whose ``forward`` takes the batch's keys.
        batch: dict of tensors ``Tensor[batch, ...]``, optionally ``sample_ids``.
        loss_fn: the resolved loss (a token loss needs integer ``labels``).
        sample_ids: the caller's ids, or None.

    Returns:
        The rows' sample ids (see :func:`resolve_sample_ids`).
    """
    if not isinstance(batch, dict):
        raise ValueError(f"batch: expected a dict of tensors, got {type(batch).__name__}.")
    tensors = {k: v for k, v in batch.items() if k != "sample_ids"}
    if not tensors:
        raise ValueError(f"batch: expected at least one tensor, got keys {list(batch)}.")
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            raise ValueError(f"batch[{k!r}]: expected a tensor with a leading batch axis, got "
                             f"{type(v).__name__ if not isinstance(v, torch.Tensor) else 'a 0-d tensor'}.")
    sizes = {k: v.shape[0] for k, v in tensors.items()}
    batch_size = next(iter(sizes.values()))
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch: expected one batch size across keys, got {sizes}.")
    if batch_size == 0:
        raise ValueError("batch: expected at least one row, got 0.")
    ref = tensors.get("input_ids") if is_builtin_loss(loss_fn) else None
    for k in _SEQUENCE_KEYS:
        if ref is not None and k in tensors and tensors[k].shape != ref.shape:
            raise ValueError(f"{k}: expected the shape of input_ids {tuple(ref.shape)}, "
                             f"got {tuple(tensors[k].shape)}.")
    _check_keys(model, batch, loss_fn)
    _check_labels(batch, loss_fn, batch_size)
    return resolve_sample_ids(batch, sample_ids, batch_size)


def check_finite_loss(value: torch.Tensor, unit_id: UnitId) -> None:
    """A unit's loss is finite; else name the unit."""
    v = float(value.detach())
    if not math.isfinite(v):
        raise ValueError(f"Non-finite loss for unit {unit_id!r}: expected a finite value, got {v}.")


def check_finite_grad(name: str, grad: torch.Tensor, unit_id: UnitId) -> None:
    """A unit's gradient is finite; else name the parameter and the unit."""
    if not torch.isfinite(grad).all():
        bad = grad[~torch.isfinite(grad)].flatten()[0].item()
        raise ValueError(f"Non-finite gradient of parameter {name!r} for unit {unit_id!r}: "
                         f"expected finite values, got {bad}.")


def check_rows_independent(batched: torch.Tensor, alone: torch.Tensor, row_id: SampleId, rtol: float,
                           atol: float) -> None:
    """Row ``row_id``'s losses in the batched forward equal those of the row run alone.

    Args:
        batched: the row's values from the batched forward (``Tensor[pos]`` per-token NLL
            or a 0-d row loss).
        alone: the same values with the row run on its own.
        row_id: the row's sample id, for the message.
        rtol: relative tolerance.
        atol: absolute tolerance.
    """
    close = torch.isclose(batched, alone, rtol=rtol, atol=atol) | (torch.isnan(batched) & torch.isnan(alone))
    if not bool(close.all()):
        k = int((~close).flatten().nonzero()[0])
        raise ValueError(
            f"loss_fn: expected each row's loss not to depend on the other rows (model in eval "
            f"mode, no cross-row interaction such as dropout or batch statistics), got "
            f"{float(batched.flatten()[k])!r} for row {row_id!r} in the batch and "
            f"{float(alone.flatten()[k])!r} with the row run alone."
        )


def check_positive_int(name: str, value: object) -> int:
    """``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}.")
    return value
