"""The functional estimators on sharded data: each rank passes its rows, every rank gets
the estimate of all the ranks' rows (rank-major order), through a ``ShardedAccumulator``.

Every function takes ``(model, batch, *, group=None, timeout=..., sample_ids=None,
**options)``, where ``batch`` is this rank's rows (``None`` or a batch of 0 rows for a rank
without any), ``sample_ids`` this rank's ids (required with more than one rank), and
``options`` the keyword arguments of the ``fisher_fast`` function of the same name
(``loss_fn``, ``unit``, ``weighting``, ``dtype``, ``chunk_size``, …). ``exact_fisher`` is not
offered (the accumulator keeps no class expansion); see docs/distributed.md.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..batching.checks import check_positive_int
from ..results import FisherResult, SampleIds
from .collectives import DEFAULT_TIMEOUT
from .sharded import ShardedAccumulator


def _has_rows(batch: dict | None) -> bool:
    if batch is None:
        return False
    if not isinstance(batch, dict):
        raise ValueError(f"batch: expected a dict of tensors or None, got {type(batch).__name__}.")
    sizes = [v.shape[0] for k, v in batch.items() if k != "sample_ids" and hasattr(v, "shape") and v.dim()]
    return not sizes or sizes[0] > 0  # a batch without tensors fails in update, loudly


def _reduced(model, batch, sample_ids, group, timeout, options: dict, acc_options: dict):
    acc = ShardedAccumulator(model, options.pop("loss_fn", None), group=group, timeout=timeout,
                             **options, **acc_options)
    if _has_rows(batch):
        acc.update(batch, task="default", sample_ids=sample_ids)
    return acc.all_reduce()


def mean_gradient(model: nn.Module, batch: dict | None, *, group: dist.ProcessGroup | None = None,
                  timeout: float = DEFAULT_TIMEOUT, sample_ids: SampleIds | None = None,
                  **options: object) -> FisherResult:
    r""":math:`\bar g = \sum_u w_u g_u / W` over every rank's units."""
    return _reduced(model, batch, sample_ids, group, timeout, options, {}).mean_gradient()


def empirical_fisher(model: nn.Module, batch: dict | None, *, group: dist.ProcessGroup | None = None,
                     timeout: float = DEFAULT_TIMEOUT, sample_ids: SampleIds | None = None,
                     **options: object) -> FisherResult:
    r""":math:`F = \sum_u w_u g_u^2 / W` over every rank's units (E[g²] states only)."""
    return _reduced(model, batch, sample_ids, group, timeout, options,
                    {"statistics": "fisher"}).empirical_fisher()


def squared_mean_gradient(model: nn.Module, batch: dict | None, *, group: dist.ProcessGroup | None = None,
                          timeout: float = DEFAULT_TIMEOUT, sample_ids: SampleIds | None = None,
                          **options: object) -> FisherResult:
    r""":math:`S = \bar g^2` over every rank's units."""
    return _reduced(model, batch, sample_ids, group, timeout, options, {}).squared_mean_gradient()


def gradient_variance(model: nn.Module, batch: dict | None, *, group: dist.ProcessGroup | None = None,
                      timeout: float = DEFAULT_TIMEOUT, sample_ids: SampleIds | None = None,
                      unbiased: bool = False, **options: object) -> FisherResult:
    r""":math:`V = \sum_u w_u (g_u - \bar g)^2 / W` over every rank's units (``unbiased``:
    times :math:`W^2 / (W^2 - \sum_u w_u^2)`).
    """
    acc = _reduced(model, batch, sample_ids, group, timeout, options, {})
    return acc.gradient_variance(unbiased=unbiased)


def batch_squared_gradient(model: nn.Module, batch: dict | None, *, group: dist.ProcessGroup | None = None,
                           timeout: float = DEFAULT_TIMEOUT, sample_ids: SampleIds | None = None,
                           micro_batch_size: int = 1, **options: object) -> FisherResult:
    r""":math:`\sum_m W_m \bar g_m^2 / W` over micro-batches of ``micro_batch_size``
    consecutive units in rank-major order; every non-empty rank but the last must hold a
    multiple of ``micro_batch_size`` units (else ``ValueError`` on every rank).
    """
    b = check_positive_int("micro_batch_size", micro_batch_size)
    acc = _reduced(model, batch, sample_ids, group, timeout, options,
                   {"statistics": "fisher", "micro_batch_sizes": (b,)})
    return acc.batch_squared_gradient(b)


def mc_fisher(model: nn.Module, batch: dict | None, *, group: dist.ProcessGroup | None = None,
              timeout: float = DEFAULT_TIMEOUT, sample_ids: SampleIds | None = None,
              n_samples: int = 1, seed: int = 0, **options: object) -> FisherResult:
    r"""Monte-Carlo Fisher over every rank's units: labels drawn per sample id exactly as
    ``fisher_fast.mc_fisher`` (so the draws do not depend on the sharding).
    """
    acc = _reduced(model, batch, sample_ids, group, timeout, options,
                   {"statistics": "fisher", "labels": "mc", "n_samples": n_samples, "seed": seed})
    return acc.empirical_fisher()


def group_fisher(model: nn.Module, batch: dict | None, *, group: dist.ProcessGroup | None = None,
                 timeout: float = DEFAULT_TIMEOUT, sample_ids: SampleIds | None = None,
                 groups: str | dict = "generic", layout: dict | None = None,
                 **options: object) -> FisherResult:
    r"""Per-group mean, variance, stderr, snr and n of :math:`f_u = R(g_u^2)` over every
    rank's units.
    """
    acc = _reduced(model, batch, sample_ids, group, timeout, options,
                   {"groups": groups, "layout": layout, "elements": False})
    return acc.group_fisher()
