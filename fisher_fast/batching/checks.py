"""Argument and batch checks; every failure is a ValueError saying what was expected."""

from __future__ import annotations

import hashlib

import torch

from ..losses import causal_lm_loss, has_token_protocol
from .row_coupling import check_row_coupling

UNITS = ("sample", "token")
WEIGHTINGS = ("sample", "token")


def check_choice(name: str, value: object, choices) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}.")


def resolve_loss(loss_fn, *, unit: str, weighting: str, needs_protocol: str | None = None):
    """The loss to use (``None`` means ``causal_lm_loss``), checked against what is asked."""
    check_choice("unit", unit, UNITS)
    check_choice("weighting", weighting, WEIGHTINGS)
    loss = causal_lm_loss if loss_fn is None else loss_fn
    if not callable(loss):
        raise ValueError(f"loss_fn: expected a callable loss(model, batch) -> Tensor[B], "
                         f"got {type(loss).__name__}.")
    wants = needs_protocol or ("unit='token'" if unit == "token" else
                               "weighting='token'" if weighting == "token" else None)
    if wants and not has_token_protocol(loss):
        raise ValueError(f"{wants} needs a loss with the token-loss protocol "
                         f"(logits_and_targets, token_counts, reduction); got {loss!r}.")
    return loss


# Keys that carry one entry per token of ``input_ids`` (labels only when they are per token).
_PER_TOKEN_KEYS = ("attention_mask", "token_type_ids", "position_ids", "labels")


def _check_token_axes(tensors: dict) -> None:
    """Per-token keys must have the shape of ``input_ids``."""
    ids = tensors.get("input_ids")
    if ids is None:
        return
    for k in _PER_TOKEN_KEYS:
        v = tensors.get(k)
        if v is None or (k == "labels" and v.dim() < 2):
            continue
        if v.shape != ids.shape:
            raise ValueError(f"batch[{k!r}]: expected the shape of input_ids {tuple(ids.shape)}, "
                             f"got {tuple(v.shape)}.")


def all_finite(tensors) -> bool:
    """All entries of all ``tensors`` finite. Fast path: a finite sum of each (one pass, no
    copy) proves it; only a non-finite sum (a non-finite entry, or finite ones overflowing)
    is checked entry-wise. One host sync on a GPU.
    """
    tensors = list(tensors)
    if not tensors:
        return True
    if bool(torch.isfinite(torch.stack([t.sum() for t in tensors])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def check_token_ids(model, tensors: dict) -> None:
    """``input_ids`` within the model's input embedding table, where the model names one
    (``get_input_embeddings``): an id past it would be an IndexError on the CPU and a
    device-side assert (a lost CUDA context) on a GPU. One host sync per batch on a GPU.
    """
    ids = tensors.get("input_ids")
    get = getattr(model, "get_input_embeddings", None)
    if ids is None or ids.numel() == 0 or not callable(get):
        return
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"batch['input_ids']: expected integer token ids, got {ids.dtype}.")
    try:
        n = getattr(get(), "num_embeddings", None)
    except (NotImplementedError, AttributeError):  # HF models without an embedding table
        return
    if not isinstance(n, int):
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= n:
        raise ValueError(f"batch['input_ids']: expected token ids in [0, {n}), got "
                         f"{lo if lo < 0 else hi}.")


def _integer_labels(tensors: dict) -> dict:
    """Integer ``labels`` of any width (int8, int16, int32, uint8, ...) as int64, the index
    dtype the losses need; other dtypes are left for the loss to judge.
    """
    labels = tensors.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dtype != torch.int64 \
            and not (labels.dtype.is_floating_point or labels.dtype.is_complex
                     or labels.dtype == torch.bool):
        tensors = {**tensors, "labels": labels.long()}
    return tensors


def check_model(model) -> None:
    """``model`` is a ``torch.nn.Module``."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}.")


def split_batch(batch, sample_ids=None, *, id_offset: int = 0, model=None):
    """``(tensors, ids)``: the model's tensors and one sample id per row.

    Ids come from ``batch["sample_ids"]`` or the ``sample_ids`` argument (not both); default
    ``id_offset + 0 .. B-1``. Ids are str or int (an int tensor or array is read as ints)
    and must be unique within the call. Integer ``labels`` of any width become int64. With
    ``model``, ``input_ids`` are checked against its embedding table (``check_token_ids``)
    and the model against layers that couple rows (``row_coupling.check_row_coupling``).
    """
    if not isinstance(batch, dict):
        raise ValueError(f"batch: expected a dict of tensors, got {type(batch).__name__}.")
    tensors = {k: v for k, v in batch.items() if k != "sample_ids"}
    if not tensors:
        raise ValueError("batch: expected at least one tensor, got none.")
    sizes = {}
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"batch[{k!r}]: expected a tensor, got {type(v).__name__}.")
        if v.dim() == 0:
            raise ValueError(f"batch[{k!r}]: expected a leading batch axis, got a scalar.")
        sizes[k] = v.shape[0]
    B = next(iter(sizes.values()))
    if any(s != B for s in sizes.values()):
        raise ValueError(f"batch: expected the same leading batch size for every tensor, got {sizes}.")
    if B == 0:
        raise ValueError("batch: expected at least one row, got 0.")
    _check_token_axes(tensors)
    tensors = _integer_labels(tensors)
    if "sample_ids" in batch and sample_ids is not None:
        raise ValueError("sample_ids: expected them in the batch or as the argument, got both.")
    ids = batch.get("sample_ids", sample_ids)
    if ids is None:
        ids = list(range(id_offset, id_offset + B))
    else:
        # tensors and numpy arrays become Python ints (a 0-d tensor hashes by identity)
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if not isinstance(ids, list):
            raise ValueError(f"sample_ids: expected a sequence of {B} ids, got a scalar {ids!r}.")
        if len(ids) != B:
            raise ValueError(f"sample_ids: expected {B} ids (one per row), got {len(ids)}.")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (str, int)):
                raise ValueError(f"sample_ids: expected str or int ids, got {i!r} "
                                 f"({type(i).__name__}).")
        seen = set()
        for i in ids:
            if i in seen:
                raise ValueError(f"sample_ids: expected unique ids, got {i!r} twice.")
            seen.add(i)
    if model is not None:
        check_model(model)
        check_token_ids(model, tensors)
        check_row_coupling(model)
    return tensors, ids


def id_hashes(ids: list) -> torch.Tensor:
    """``LongTensor[len(ids)]``: a 64-bit hash (BLAKE2b) of each sample id, ints and strs
    apart (``1`` and ``"1"`` are different ids), to remember the ids a task has seen in 8
    bytes each. Two different ids share a hash with probability ~n²/2⁶⁵ among n ids
    (3·10⁻⁸ for a million).
    """
    out = []
    for i in ids:
        tag = "i:" if isinstance(i, int) else "s:"
        digest = hashlib.blake2b(f"{tag}{i}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little", signed=True))
    return torch.tensor(out, dtype=torch.int64)


def check_unseen_ids(ids: list, hashes: torch.Tensor, seen: torch.Tensor | None,
                     task: str) -> None:
    """None of ``ids`` (hashed: ``hashes``) is among the ids ``task`` has seen (``seen``,
    hashes) in earlier updates: each sample counts once per task.

    Raises:
        ValueError: naming the first repeated id and how many of the batch's ids repeat.
    """
    if seen is None or seen.numel() == 0:
        return
    hit = torch.isin(hashes, seen)
    if bool(hit.any()):
        j, n = int(hit.nonzero()[0]), int(hit.sum())
        raise ValueError(
            f"sample_ids: expected ids not seen before in task {task!r}, got {ids[j]!r}, "
            f"counted in an earlier update ({n} of this batch's {len(ids)} ids were). A "
            "sample counts once per task (Welford states cannot take a unit back): give "
            "each pass over the data its own ids (e.g. f'{epoch}:{i}'), or use another task "
            "or accumulator.")


def check_positive_int(name: str, value: int) -> int:
    """A positive int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}.")
    return value


def check_seed(seed: int) -> int:
    """An int seed (not a bool)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}.")
    return seed
