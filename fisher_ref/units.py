r"""Per-unit gradients in float64, one ``torch.autograd.grad`` per unit.

The user's model is deep-copied to float64 on the CPU and never modified. The batched forward is
guarded: each row's loss must equal that of the row run alone (:func:`check_batched_forward`).
One batched forward computes every unit's loss; then each unit's gradient is taken on its own
(``retain_graph=True``). Tied parameters are one parameter (``named_parameters()`` lists
them once), so their per-unit gradient is the sum over all uses.

Building blocks reused by the other estimators (MC/exact Fisher, contributions,
interference, conflicts): :func:`prepare` (validate, copy to float64),
:func:`unit_losses` (the units' scalar losses, optionally with given targets),
:func:`gradients` (their gradients as a :class:`PerUnit`) and :func:`per_unit_gradients`
(both).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fisher_ref._checks import (
    check_batch,
    check_finite_grad,
    check_finite_loss,
    check_model,
    check_options,
    check_rows_independent,
)
from fisher_ref._types import Batch, LossFn, SampleId, UnitId
from fisher_ref.losses import IGNORE_INDEX, is_token_loss, reduce_rows, token_nll
from fisher_ref.results import PerUnit
from fisher_ref.row_coupling import check_no_row_coupling, name_coupled_module


@dataclass
class Prepared:
    """A validated call: the float64 model copy, the float64 batch, the loss and row ids."""

    model: torch.nn.Module
    batch: Batch
    loss_fn: LossFn
    row_ids: list[SampleId]
    unit: str
    weighting: str


@dataclass
class UnitLosses:
    """The units' scalar losses (graph attached), ids, weights ``Tensor[units]``, and the
    empty rows' ids.
    """

    losses: list[torch.Tensor]
    ids: list[UnitId]
    weights: torch.Tensor
    empty_ids: list[SampleId]


def float64_model(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 CPU deep copy of ``model`` (the original is untouched).

    The copy runs the model's own forward, attention implementation included. Caveat:
    some Hugging Face modules compute in float32 even in a float64 model: the RMSNorm of
    LLaMA, Mistral, Qwen2 and Phi-3, and the *eager* attention softmax of those and of
    GPT-NeoX. On them the oracle carries float32 rounding (~1e-9 relative on a loss, up to
    ~1e-7 on small gradient entries); GPT-2 and BERT are float64 throughout
    (docs/definitions.md §0).
    """
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float64)


def float64_batch(batch: Batch) -> Batch:
    """The batch on the CPU, floating tensors cast to float64, integer ``labels`` of any width
    to int64 (the class-index dtype), ``sample_ids`` removed.
    """
    out = {}
    for k, v in batch.items():
        if k == "sample_ids":
            continue
        v = v.detach().to("cpu")
        if k == "labels" and not (v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool):
            v = v.to(torch.int64)
        out[k] = v.to(torch.float64) if v.dtype.is_floating_point else v
    return out


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` for every trainable parameter, tied ones once."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _row_values(model, batch, loss_fn) -> torch.Tensor:
    """What must not depend on other rows: per-token NLL ``[B, T]`` (token loss) or row losses."""
    if is_token_loss(loss_fn):
        logits, targets = loss_fn.logits_and_targets(model, batch)
        return token_nll(logits, targets)
    rows = loss_fn(model, batch)
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1:
        got = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"loss_fn: expected a 1-D tensor of row losses, got {got}.")
    return rows


def check_batched_forward(model: torch.nn.Module, batch: Batch, loss_fn: LossFn,
                          row_ids: Sequence[SampleId]) -> None:
    r"""Guard the batching assumption of SPEC §0: every row's loss from the batched forward
    equals that of the row run on its own (same padding), per token for a token loss.

    Catches a model left in training mode (dropout), batch statistics, or any other
    cross-row interaction, which would make per-row gradients meaningless. Tolerance:
    ``row-independence`` (the same row at two batch sizes; see its reason).

    Args:
        model: the float64 model copy.
        batch: the float64 batch, ``Tensor[batch, ...]`` per key (no ``sample_ids``).
        loss_fn: the resolved loss.
        row_ids: the rows' sample ids, for the message.
    """
    if len(row_ids) < 2:
        return
    from fisher_ref.testing.tolerances import tolerance  # the one tolerance table

    rtol, atol = tolerance("row-independence")
    with torch.no_grad():
        batched = _row_values(model, batch, loss_fn)
        if batched.shape[0] != len(row_ids):
            raise ValueError(f"loss_fn: expected {len(row_ids)} row losses, got {batched.shape[0]}.")
        for i, sid in enumerate(row_ids):
            alone = _row_values(model, {k: v[i:i + 1] for k, v in batch.items()}, loss_fn)
            try:
                check_rows_independent(batched[i], alone[0], sid, rtol, atol)
            except ValueError as e:  # say where: the first module whose output differs
                try:
                    where = name_coupled_module(model, batch, i, lambda b: _row_values(model, b, loss_fn),
                                                rtol, atol)
                except (RuntimeError, ValueError) as failed:
                    where = f"(Re-running the forwards to name the module failed: {failed}.)"
                raise ValueError(f"{e} {where}") from None


def prepare(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn | None = None,
            unit: str = "sample", weighting: str = "sample",
            sample_ids: Sequence[SampleId] | None = None, needs_token_loss: bool = False) -> Prepared:
    """Validate a call, copy model and batch to float64, and check that rows are independent.

    Args:
        model: as :func:`per_sample_gradients`.
        batch: as :func:`per_sample_gradients`.
        loss_fn: as :func:`per_sample_gradients`.
        unit: as :func:`per_sample_gradients`.
        weighting: as :func:`per_sample_gradients`.
        sample_ids: as :func:`per_sample_gradients`.
        needs_token_loss: the estimator needs a token loss (MC and exact Fisher).
    """
    loss_fn = check_options(loss_fn, unit, weighting, needs_token_loss=needs_token_loss)
    check_model(model)
    check_no_row_coupling(model)
    row_ids = check_batch(model, batch, loss_fn, sample_ids)
    prep = Prepared(float64_model(model), float64_batch(batch), loss_fn, row_ids, unit, weighting)
    check_batched_forward(prep.model, prep.batch, loss_fn, row_ids)
    return prep


def _sample_rows(model, batch, loss_fn, targets):
    """Row losses [B] and active-token counts [B] (ones for a plain callable)."""
    if targets is None:
        rows = loss_fn(model, batch)
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1:
            got = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"loss_fn: expected a 1-D tensor of row losses, got {got}.")
        if is_token_loss(loss_fn):
            counts = loss_fn.token_counts(batch)
        else:
            counts = torch.ones(rows.shape[0], dtype=torch.long)
        return rows, counts
    logits, _ = _aligned(model, batch, loss_fn, targets)
    rows = reduce_rows(token_nll(logits, targets), targets, loss_fn.reduction)
    return rows, (targets != IGNORE_INDEX).sum(dim=1)


def _aligned(model, batch, loss_fn, targets):
    logits, default = loss_fn.logits_and_targets(model, batch)
    if targets is None:
        return logits, default
    if targets.shape != default.shape:
        raise ValueError(f"targets: expected shape {tuple(default.shape)}, got {tuple(targets.shape)}.")
    return logits, targets


def unit_losses(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn, unit: str, weighting: str,
                row_ids: Sequence[SampleId], targets: torch.Tensor | None = None) -> UnitLosses:
    r"""Every unit's scalar loss from one forward of ``model`` (already float64).

    ``unit="sample"``: the row loss :math:`\ell_i` for each non-empty row, weight
    :math:`w = 1` or :math:`K_i` (``weighting="token"``). ``unit="token"``: the NLL of each
    active aligned target, row-major, id ``(sample_id, position)``, weight 1.
    ``targets`` (aligned, ``LongTensor[batch, pos]``) replaces the batch's labels, as for
    the MC Fisher.
    """
    if targets is not None and not is_token_loss(loss_fn):
        raise ValueError(f"targets: expected a token loss to apply them, got {type(loss_fn).__name__}.")
    losses, ids, weights = [], [], []
    if unit == "sample":
        rows, counts = _sample_rows(model, batch, loss_fn, targets)
        if rows.shape[0] != len(row_ids):
            raise ValueError(f"loss_fn: expected {len(row_ids)} row losses, got {rows.shape[0]}.")
        empty = [row_ids[i] for i in range(len(row_ids)) if counts[i] == 0]
        for i, sid in enumerate(row_ids):
            if counts[i] > 0:
                losses.append(rows[i])
                ids.append(sid)
                weights.append(float(counts[i]) if weighting == "token" else 1.0)
    else:
        logits, tgt = _aligned(model, batch, loss_fn, targets)
        nll = token_nll(logits, tgt)
        active = tgt != IGNORE_INDEX
        empty = [row_ids[i] for i in range(len(row_ids)) if not active[i].any()]
        for i, t in active.nonzero().tolist():
            losses.append(nll[i, t])
            ids.append((row_ids[i], t))
            weights.append(1.0)
    if not losses:
        raise ValueError(f"batch: expected at least one non-empty row, got none "
                         f"(empty rows: {empty}).")
    for loss, uid in zip(losses, ids, strict=True):
        check_finite_loss(loss, uid)
    return UnitLosses(losses, ids, torch.tensor(weights, dtype=torch.float64), empty)


def gradients(model: torch.nn.Module, units: UnitLosses) -> PerUnit:
    r"""One ``autograd.grad`` per unit: :math:`g_u = \nabla_\theta \ell_u` for every trainable parameter.

    Returns:
        PerUnit: ``tensors[name]`` of shape ``Tensor[units, *param_shape]``.
    """
    named = trainable_parameters(model)
    params = [p for _, p in named]
    per_param: list[list[torch.Tensor]] = [[] for _ in named]
    last = len(units.losses) - 1
    for k, (loss, uid) in enumerate(zip(units.losses, units.ids, strict=True)):
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, params, retain_graph=k < last, allow_unused=True)
        else:
            grads = [None] * len(params)
        for j, ((name, p), g) in enumerate(zip(named, grads, strict=True)):
            g = torch.zeros_like(p) if g is None else g.detach()
            check_finite_grad(name, g, uid)
            per_param[j].append(g)
    tensors = {name: torch.stack(gs) for (name, _), gs in zip(named, per_param, strict=True)}
    return PerUnit(tensors, list(units.ids), units.weights, list(units.empty_ids))


def per_unit_gradients(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn, unit: str,
                       weighting: str, row_ids: Sequence[SampleId],
                       targets: torch.Tensor | None = None) -> PerUnit:
    """:func:`unit_losses` then :func:`gradients`, for a model and batch already in float64."""
    units = unit_losses(model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting,
                        row_ids=row_ids, targets=targets)
    return gradients(model, units)


def prepared_gradients(prep: Prepared, targets: torch.Tensor | None = None) -> PerUnit:
    """Per-unit gradients of a :class:`Prepared` call."""
    return per_unit_gradients(prep.model, prep.batch, loss_fn=prep.loss_fn, unit=prep.unit,
                              weighting=prep.weighting, row_ids=prep.row_ids, targets=targets)


def per_sample_gradients(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn | None = None,
                         unit: str = "sample", weighting: str = "sample",
                         sample_ids: Sequence[SampleId] | None = None) -> PerUnit:
    r"""Per-unit gradients :math:`g_u = \nabla_\theta \ell_u` in float64.

    Args:
        model: any ``torch.nn.Module`` (copied to float64; never modified).
        batch: dict of tensors with a leading batch axis (``input_ids: LongTensor[batch, pos]``,
            ``labels``, ...), optionally ``sample_ids``.
        loss_fn: ``loss_fn(model, batch) -> Tensor[batch]``; a token loss (see
            :mod:`fisher_ref.losses`) for token units or token weighting.
            ``None`` means ``causal_lm_loss``.
        unit: ``"sample"`` (one unit per non-empty row) or ``"token"`` (one per active
            label token, :math:`g_u = \nabla_\theta (-\log p_\theta(y_u))`).
        weighting: ``"sample"`` (:math:`w_u = 1`) or ``"token"`` (:math:`w_u = K_i` for a
            sample unit, 1 for a token unit).
        sample_ids: one id per row (default ``0..B-1``), unless the batch has them.

    Returns:
        PerUnit: ``tensors[name]`` of shape ``Tensor[units, *param_shape]``, unit ``ids``,
        ``weights`` ``Tensor[units]``, ``empty_ids`` (rows with no active label, excluded).
    """
    prep = prepare(model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting,
                   sample_ids=sample_ids)
    return prepared_gradients(prep)
