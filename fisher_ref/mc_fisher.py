r"""Model-sampled Fisher: Monte-Carlo labels from the model (``mc_fisher``) and the exact
expectation over the classes for token units (``exact_fisher``).

The true Fisher replaces the data label by a label drawn from the model's own predictive
distribution :math:`p_\theta(\cdot \mid x)`. With teacher forcing kept, each aligned label
position t of a row is drawn independently from :math:`\mathrm{softmax}(z_t)`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from fisher_ref._checks import check_finite_grad, check_positive_int
from fisher_ref._types import Batch, LossFn, SampleId
from fisher_ref.gradient_moments import empirical_fisher_of
from fisher_ref.losses import IGNORE_INDEX
from fisher_ref.results import FisherResult
from fisher_ref.units import prepare, prepared_gradients, trainable_parameters


def row_seed(seed: int, sample_id: SampleId) -> int:
    """The generator seed of one row: ``(seed * 1_000_003 + crc32(str(id))) % 2**63``."""
    return (seed * 1_000_003 + zlib.crc32(str(sample_id).encode())) % 2**63


def draw_labels(logits: torch.Tensor, targets: torch.Tensor, row_ids: Sequence[SampleId],
                n_samples: int, seed: int) -> torch.Tensor:
    r"""Labels drawn from the model; inactive positions stay -100.

    Row i uses ``torch.Generator("cpu").manual_seed(row_seed(seed, id_i))`` and
    ``u = torch.rand((T, n_samples), dtype=float64)``; draw k at position t is the smallest
    c with :math:`\mathrm{cumsum}(\mathrm{softmax}(z_t))_c > u_{t,k}`, clamped to C − 1.
    The draws of a row depend only on its id, ``seed`` and logits, never on the rest of
    the batch.

    Args:
        logits: the aligned logits, ``Tensor[batch, pos, classes]``.
        targets: the aligned targets, ``LongTensor[batch, pos]`` (-100 inactive).
        row_ids: the rows' sample ids, one per row.
        n_samples: n, draws per position.
        seed: the integer seed.

    Returns:
        ``LongTensor[n_samples, batch, pos]``.
    """
    B, T, C = logits.shape
    out = torch.full((n_samples, B, T), IGNORE_INDEX, dtype=torch.long)
    for i, sid in enumerate(row_ids):
        gen = torch.Generator("cpu").manual_seed(row_seed(seed, sid))
        u = torch.rand((T, n_samples), dtype=torch.float64, generator=gen)
        cum = torch.cumsum(torch.softmax(logits[i].detach().double(), dim=-1), dim=-1)
        draws = torch.searchsorted(cum.contiguous(), u.contiguous(), right=True).clamp(max=C - 1)
        active = targets[i] != IGNORE_INDEX
        out[:, i, :] = torch.where(active[None, :], draws.T, torch.full_like(draws.T, IGNORE_INDEX))
    return out


def mc_fisher(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn | None = None,
              unit: str = "sample", weighting: str = "sample",
              sample_ids: Sequence[SampleId] | None = None, n_samples: int = 1,
              seed: int = 0) -> FisherResult:
    r"""Monte-Carlo Fisher: F with labels drawn from the model, averaged over draws.

    .. math:: \hat F_{MC} = \frac{1}{n} \sum_{k=1}^{n} \frac{1}{W} \sum_u w_u
       \big(\nabla_\theta \ell_u(\tilde y^{(k)})\big)^2,
       \quad \tilde y^{(k)}_{i,t} \sim \mathrm{softmax}(z_{i,t}),

    with the same unit, weighting and reduction as :func:`empirical_fisher`, and the
    labels drawn by :func:`draw_labels`. Needs a token loss.

    Args:
        model: any ``torch.nn.Module`` (copied to float64; never modified).
        batch: dict of tensors ``Tensor[batch, ...]``, optionally ``sample_ids``.
        loss_fn: a token loss; ``None`` means ``causal_lm_loss`` (``reduction="mean"``).
        unit: ``"sample"`` or ``"token"``.
        weighting: ``"sample"`` (w = 1) or ``"token"`` (w = K_i for sample units).
        sample_ids: row ids, unless the batch carries them; they seed each row's draws.
        n_samples: number of label draws n (>= 1).
        seed: the integer seed of the draws.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    check_positive_int("n_samples", n_samples)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}.")
    prep = prepare(model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting,
                   sample_ids=sample_ids, needs_token_loss=True)
    with torch.no_grad():
        logits, targets = prep.loss_fn.logits_and_targets(prep.model, prep.batch)
    labels = draw_labels(logits, targets, prep.row_ids, n_samples, seed)
    draws = [empirical_fisher_of(prepared_gradients(prep, targets=labels[k]))
             for k in range(n_samples)]
    first = draws[0]
    mean = {name: sum(f[name] for f in draws) / n_samples for name in first}
    return FisherResult(mean, n_units=first.n_units, total_weight=first.total_weight,
                        empty_ids=first.empty_ids)


def exact_fisher(model: torch.nn.Module, batch: Batch, *, loss_fn: LossFn | None = None,
                 unit: str = "token", weighting: str = "sample",
                 sample_ids: Sequence[SampleId] | None = None) -> FisherResult:
    r"""Exact (true) Fisher diagonal for token units, enumerating the classes.

    .. math:: F_{exact} = \frac{1}{W} \sum_u w_u \sum_{c=1}^{C} p_{u,c}
       \big(\nabla_\theta (-\log p_{u,c})\big)^2,

    :math:`p_{u,c}` the model's probability of class c at token u (a weight, not
    differentiated); :math:`w_u = 1` for token units. ``mc_fisher`` converges to it as
    ``n_samples`` grows. Costs C backward passes per token: for small vocabularies.

    Args:
        model: any ``torch.nn.Module`` (copied to float64; never modified).
        batch: dict of tensors ``Tensor[batch, ...]``, optionally ``sample_ids``.
        loss_fn: a token loss; ``None`` means ``causal_lm_loss`` (``reduction="mean"``).
        unit: must be ``"token"`` (the default here).
        weighting: validated as for :func:`empirical_fisher`; token units weigh 1 either way.
        sample_ids: row ids, unless the batch carries them.

    Returns:
        FisherResult: parameter name -> float64 ``Tensor[*param_shape]``.
    """
    if unit != "token":
        raise ValueError(f"exact_fisher: expected unit='token', got unit={unit!r}.")
    prep = prepare(model, batch, loss_fn=loss_fn, unit=unit, weighting=weighting,
                   sample_ids=sample_ids, needs_token_loss=True)
    named = trainable_parameters(prep.model)
    params = [p for _, p in named]
    logits, targets = prep.loss_fn.logits_and_targets(prep.model, prep.batch)
    logp = torch.log_softmax(logits, dim=-1)
    active = (targets != IGNORE_INDEX).nonzero().tolist()
    empty = [sid for i, sid in enumerate(prep.row_ids) if not (targets[i] != IGNORE_INDEX).any()]
    if not active:
        raise ValueError(f"batch: expected at least one non-empty row, got none (empty rows: {empty}).")
    acc = [torch.zeros_like(p) for p in params]
    for i, t in active:
        probs = logp[i, t].detach().exp()
        for c in range(logp.shape[-1]):
            grads = torch.autograd.grad(-logp[i, t, c], params, retain_graph=True, allow_unused=True)
            for j, ((name, _), g) in enumerate(zip(named, grads, strict=True)):
                if g is not None:
                    check_finite_grad(name, g, (prep.row_ids[i], t))
                    acc[j] += probs[c] * g.square()
    U = len(active)
    return FisherResult({name: a / U for (name, _), a in zip(named, acc, strict=True)}, n_units=U,
                        total_weight=float(U), empty_ids=empty)
