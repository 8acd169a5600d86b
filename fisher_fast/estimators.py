"""The functional API of SPEC §10: one batch in, per-parameter estimates out.

Every function runs the same machinery as ``FisherAccumulator`` on one batch (chunks of
units, one batched forward and backward each) and shares its keyword arguments:

Args:
    model: the model (eval mode, rows independent).
    batch: dict of tensors with a leading batch axis ``[rows, ...]``, optionally
        ``sample_ids``.
    loss_fn: per-row loss ``loss_fn(model, batch) -> Tensor[rows]``; ``None`` is
        ``causal_lm_loss`` (mean over each row's active tokens).
    unit: ``"sample"`` or ``"token"``; weighting: ``"sample"`` or ``"token"`` (SPEC §1).
    sample_ids: one id per row (or ``batch["sample_ids"]``; not both).
    dtype: statistics dtype, float32 (default) or float64.
    chunk_size, memory_budget, allow_tf32, autocast: see ``FisherAccumulator``.

Results are ``FisherResult`` dicts ``{name: Tensor[*param_shape]}`` on the model's device, in
``dtype``.
"""

from __future__ import annotations

import torch
from torch import nn

from .batching.checks import check_positive_int, check_seed, split_batch
from .batching.label_draws import row_uniforms
from .batching.row_losses import chunk_rows
from .batching.units import aligned_targets, with_shared_classes, with_shared_draws
from .capture.plan import build_plan
from .results import FisherResult, LossFn, SampleIds
from .run.batch_statistics import Keep, accumulate_batch
from .run.options import Options
from .stats import readout
from .stats.groups import resolve_groups
from .stats.task_state import TaskState


def _one_batch(model, batch, sample_ids, opts: Options, keep: Keep, *, plan=None,
               expand=None, uniforms=None) -> TaskState:
    """The statistics ``keep`` names of one batch, from a fresh state.

    Args:
        expand: ``(model, loss, tensors) -> (Units -> Units)``: label draws or classes.
        uniforms: ``(model, loss, tensors, ids) -> Tensor``: the MC draws' uniforms.
    """
    tensors, ids = split_batch(batch, sample_ids, model=model)
    extra = {}
    if uniforms is not None:
        extra["uniforms"] = uniforms(model, opts.loss, tensors, ids)
    if expand is not None:
        extra["expand"] = expand(model, opts.loss, tensors)
    return accumulate_batch(model, plan or build_plan(model), tensors, ids, opts, keep,
                            TaskState(), **extra)


def mean_gradient(model: nn.Module, batch: dict, *, loss_fn: LossFn | None = None,
                  unit: str = "sample", weighting: str = "sample", sample_ids: SampleIds | None = None,
                  dtype: torch.dtype | None = None, chunk_size: int | None = None,
                  memory_budget: float | None = None, allow_tf32: bool = False,
                  autocast: torch.dtype | None = None) -> FisherResult:
    r"""Mean gradient :math:`\bar g = \sum_u w_u g_u / W`."""
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget, allow_tf32, autocast)
    return readout.mean_gradient(_one_batch(model, batch, sample_ids, opts, Keep()))


def empirical_fisher(model: nn.Module, batch: dict, *, loss_fn: LossFn | None = None,
                     unit: str = "sample", weighting: str = "sample", sample_ids: SampleIds | None = None,
                     dtype: torch.dtype | None = None, chunk_size: int | None = None,
                     memory_budget: float | None = None, allow_tf32: bool = False,
                     autocast: torch.dtype | None = None) -> FisherResult:
    r"""Empirical Fisher diagonal :math:`F = \sum_u w_u g_u^2 / W` (E[g²]: square each unit's
    gradient, then average). Scaling every loss by c scales F by c²; ``reduction="sum"``
    makes a row's gradient K_i times its ``"mean"`` gradient. No epsilon is added.
    Keeps E[g²] alone per element (``moments.SecondMoment``), not the mean and M2 that
    ``FisherAccumulator`` keeps for every estimator.
    """
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget, allow_tf32, autocast)
    state = _one_batch(model, batch, sample_ids, opts, Keep(second_only=True))
    return readout.empirical_fisher(state, discard=True)


def squared_mean_gradient(model: nn.Module, batch: dict, *, loss_fn: LossFn | None = None,
                          unit: str = "sample", weighting: str = "sample",
                          sample_ids: SampleIds | None = None,
                          dtype: torch.dtype | None = None, chunk_size: int | None = None,
                          memory_budget: float | None = None, allow_tf32: bool = False,
                          autocast: torch.dtype | None = None) -> FisherResult:
    r"""Squared mean gradient :math:`S = \bar g^2` ((E[g])²); S ≤ F."""
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget, allow_tf32, autocast)
    return readout.squared_mean_gradient(_one_batch(model, batch, sample_ids, opts, Keep()))


def gradient_variance(model: nn.Module, batch: dict, *, loss_fn: LossFn | None = None,
                      unit: str = "sample", weighting: str = "sample", sample_ids: SampleIds | None = None,
                      dtype: torch.dtype | None = None, chunk_size: int | None = None,
                      memory_budget: float | None = None, allow_tf32: bool = False,
                      autocast: torch.dtype | None = None, unbiased: bool = False) -> FisherResult:
    r"""Gradient variance :math:`V = F - S = \sum_u w_u (g_u - \bar g)^2 / W`, from the
    Welford M2 (never negative: M2 is clamped at 0 per chunk against rounding only).
    ``unbiased=True`` multiplies by
    :math:`W^2 / (W^2 - \sum_u w_u^2)` (U/(U−1) for unit weights); needs two units.
    """
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget, allow_tf32, autocast)
    return readout.gradient_variance(_one_batch(model, batch, sample_ids, opts, Keep()), unbiased)


def batch_squared_gradient(model: nn.Module, batch: dict, *, loss_fn: LossFn | None = None,
                           unit: str = "sample", weighting: str = "sample",
                           sample_ids: SampleIds | None = None,
                           dtype: torch.dtype | None = None, chunk_size: int | None = None,
                           memory_budget: float | None = None, allow_tf32: bool = False,
                           autocast: torch.dtype | None = None, micro_batch_size: int = 1) -> FisherResult:
    r"""Legacy estimator :math:`\sum_m W_m \bar g_m^2 / W` over micro-batches of
    ``micro_batch_size`` consecutive units (the last may be shorter). Equals F at b = 1 and
    S at b ≥ U. For measuring the gap only.

    .. warning:: squaring a batch gradient is not the Fisher; this exists for comparison.
    """
    check_positive_int("micro_batch_size", micro_batch_size)
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget, allow_tf32, autocast)
    state = _one_batch(model, batch, sample_ids, opts,
                       Keep(elements=False, micro_batch_sizes=(micro_batch_size,)))
    return readout.batch_squared_gradient(state, micro_batch_size)


def mc_fisher(model: nn.Module, batch: dict, *, loss_fn: LossFn | None = None,
              unit: str = "sample", weighting: str = "sample", sample_ids: SampleIds | None = None,
              dtype: torch.dtype | None = None, chunk_size: int | None = None,
              memory_budget: float | None = None, allow_tf32: bool = False,
              autocast: torch.dtype | None = None, n_samples: int = 1, seed: int = 0) -> FisherResult:
    r"""Monte-Carlo Fisher: F with each unit's labels drawn from the model, averaged over
    ``n_samples`` draws.

    .. math:: \hat F_{MC} = \frac{1}{n}\sum_{k=1}^{n} \frac{1}{W}\sum_u w_u
              \big(\nabla_\theta \ell_u(\tilde y^{(k)})\big)^2

    Draws follow docs/architecture.md exactly (one CPU generator per row, seeded from the
    sample id; see ``batching/label_draws.py``), so they do not depend on chunking or batch order.
    """
    check_positive_int("n_samples", n_samples)
    check_seed(seed)
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget, allow_tf32,
                      autocast, needs_protocol="mc_fisher")

    def uniforms(model, loss, tensors, ids):
        T = aligned_targets(loss, model, tensors).shape[1]
        return row_uniforms(seed, ids, T, n_samples)

    state = _one_batch(model, batch, sample_ids, opts, Keep(second_only=True), uniforms=uniforms,
                       expand=lambda *_: (lambda units: with_shared_draws(units, n_samples)))
    return readout.empirical_fisher(state, discard=True)


def exact_fisher(model: nn.Module, batch: dict, *, loss_fn: LossFn | None = None,
                 unit: str = "token", weighting: str = "sample", sample_ids: SampleIds | None = None,
                 dtype: torch.dtype | None = None, chunk_size: int | None = None,
                 memory_budget: float | None = None, allow_tf32: bool = False,
                 autocast: torch.dtype | None = None) -> FisherResult:
    r"""Exact Fisher diagonal for token units, enumerating the C classes.

    .. math:: F_{exact} = \frac{1}{W}\sum_u w_u \sum_c p_{u,c}\,
              \big(\nabla_\theta(-\log p_{u,c})\big)^2

    (p_{u,c} a weight, not differentiated). Each token's forward row carries its classes
    like ``mc_fisher``'s label draws (one forward, one backward per class; tiny models:
    one forward row per (token, class)). C backward passes per token: for small
    vocabularies, to check ``mc_fisher``.
    """
    if unit != "token":
        raise ValueError(f"exact_fisher: expected unit='token', got unit={unit!r}.")
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget, allow_tf32,
                      autocast, needs_protocol="exact_fisher")

    def expand(model, loss, tensors):
        with torch.no_grad():
            first = chunk_rows(tensors, torch.tensor([0]), next(model.parameters()).device)
            C = loss.logits_and_targets(model, first)[0].shape[-1]
        return lambda units: with_shared_classes(units, C)

    state = _one_batch(model, batch, sample_ids, opts, Keep(second_only=True), expand=expand)
    return readout.empirical_fisher(state, discard=True)


def group_fisher(model: nn.Module, batch: dict, *, loss_fn: LossFn | None = None,
                 unit: str = "sample", weighting: str = "sample", sample_ids: SampleIds | None = None,
                 dtype: torch.dtype | None = None, chunk_size: int | None = None,
                 memory_budget: float | None = None, allow_tf32: bool = False,
                 autocast: torch.dtype | None = None, groups: str | dict = "generic",
                 layout: dict | None = None) -> FisherResult:
    r"""Per-group statistics of :math:`f_u[k] = \sum_{p \in k} g_{u,p}^2`: ``mean``
    (= R(F)), ``variance`` (weighted, population), ``stderr`` (sqrt(variance / U)), ``snr``
    (mean / stderr) and ``n`` (U), each a 1-D tensor over the parameter's groups.

    Linear and Conv1D weights grouped by output unit take the Gram-product path when it is
    cheaper than materialising per-row gradients (T (d_in + d_out) < d_in d_out):
    :math:`f_u[o] = \sum_{t,s} \delta_{to}\delta_{so}\, x_t \cdot x_s`.

    Args:
        groups: ``"generic"``, ``"heads"`` (attention heads via
            ``fisher_fast.attention.slicing``) or a dict ``{name: (ids, n_groups)}``.
        layout: attention layout for ``groups="heads"``.
    """
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget, allow_tf32, autocast)
    plan = build_plan(model)
    specs = resolve_groups(model, groups, layout, roles=plan.roles)
    state = _one_batch(model, batch, sample_ids, opts, Keep(elements=False, groups=specs), plan=plan)
    return readout.group_fisher(state)
