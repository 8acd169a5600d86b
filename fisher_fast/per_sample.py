r"""Per-unit gradients and contributions, all units of a batch at once.

.. math:: g_u = \nabla_\theta \ell_u

computed by one batched forward and one backward per chunk (``capture/hooks.py``); rows never
interact (SPEC §0), which ``check=True`` verifies on the first and last unit (each computed
alone with plain autograd, curvlinops' ``_checks.py`` idea), else ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch

from .batching.checks import split_batch
from .batching.chunk_sizes import default_budget, rows_per_chunk
from .batching.units import plan_units
from .capture.plan import build_plan
from .results import LossFn, PerUnit, SampleIds
from .run.chunks import forward_context, model_device, run_chunks
from .run.options import Options, check_flag
from .stats.sinks import PerUnitSink


def per_sample_gradients(model: torch.nn.Module, batch: dict, *, loss_fn: LossFn | None = None,
                         unit: str = "sample", weighting: str = "sample",
                         sample_ids: SampleIds | None = None, dtype: torch.dtype | None = None,
                         chunk_size: int | None = None,
                         memory_budget: int | float | None = None, check: bool = False,
                         allow_tf32: bool = False, autocast: torch.dtype | None = None,
                         params: list[str] | None = None) -> PerUnit:
    """Every unit's gradient ``g_u`` at full parameter shape.

    Args:
        model: any module whose rows do not interact (eval mode).
        batch: dict of tensors with a leading batch axis ``[rows, ...]``, optionally
            ``sample_ids``.
        loss_fn: per-row loss; ``None`` is ``causal_lm_loss`` (mean over the row's tokens).
        unit: ``"sample"`` (one unit per non-empty row) or ``"token"`` (per active token).
        weighting: ``"sample"`` (w_u = 1) or ``"token"`` (w_u = K_i for sample units).
        sample_ids: one id per row (or in the batch; not both); default ``0..B-1``.
        dtype: float32 (default) or float64, the dtype of the returned gradients.
        chunk_size: forward rows per chunk; default from ``memory_budget``.
        memory_budget: bytes; default a fraction of free device memory (``chunk_sizes.py``).
        check: also recompute the first and last units alone and compare (rows independent).
        allow_tf32: let CUDA matmuls use TF32 (off by default).
        autocast: ``None`` or ``torch.bfloat16`` (see ``FisherAccumulator``).
        params: names of the parameters wanted (default: every trainable one); the others'
            per-row gradients are not computed (e.g. only the attention weights, for
            interference).

    Returns:
        ``PerUnit(tensors={name: Tensor[units, *param_shape]}, ids, weights: Tensor[units],
        empty_ids)`` on the model's device.
    """
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget, allow_tf32, autocast)
    return unit_gradients(model, batch, sample_ids, opts, params, check=check_flag("check", check))


def unit_gradients(model: torch.nn.Module, batch: dict, sample_ids, opts: Options,
                   params: list[str] | None = None, *, check: bool = False) -> PerUnit:
    """``per_sample_gradients`` with checked ``opts``: what the public calls of fisher_fast
    that need every unit's gradient (interference, conflicts) share.
    """
    run = _Batch(model, batch, sample_ids, opts, params)
    sink = PerUnitSink(run.params, len(run.units), opts.dtype, run.device)

    def new_sink(start, n):
        sink.offset = start
        return sink

    for _ in run.chunks(opts, new_sink):
        pass
    result = PerUnit(sink.out, list(run.units.ids), run.units.weights.to(run.device, opts.dtype),
                     list(run.units.empty_ids))
    if check:
        check_rows_independent(model, opts.loss, run.tensors, run.units, result,
                               autocast=opts.autocast)
    return result


def iter_unit_gradients(model: torch.nn.Module, batch: dict, *, loss_fn: LossFn | None = None,
                        unit: str = "sample", weighting: str = "sample",
                        sample_ids: SampleIds | None = None, dtype: torch.dtype | None = None,
                        chunk_size: int | None = None,
                        memory_budget: int | float | None = None, allow_tf32: bool = False,
                        autocast: torch.dtype | None = None,
                        params: list[str] | None = None) -> Iterator[PerUnit]:
    """``per_sample_gradients`` one chunk at a time: yields a ``PerUnit`` per chunk (its units'
    gradients ``Tensor[n, *param_shape]``, ids and weights; the empty rows' ids with the
    first; a batch of empty rows only is a ``ValueError``, as for ``per_sample_gradients``),
    so that only one chunk's gradients exist at once. The default chunk holds at most half
    of the memory budget's worth of per-unit gradients (n · Σ numel · bytes), besides the
    activation bound of ``per_sample_gradients``; the yielded tensors are the caller's.
    """
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget, allow_tf32, autocast)
    return unit_gradient_chunks(model, batch, sample_ids, opts, params)


def unit_gradient_chunks(model: torch.nn.Module, batch: dict, sample_ids, opts: Options,
                         params: list[str] | None = None) -> Iterator[PerUnit]:
    """``iter_unit_gradients`` with checked ``opts`` (what interference and contributions
    share). Checks the batch before the first chunk is asked for.
    """
    run = _Batch(model, batch, sample_ids, opts, params)
    if opts.chunk_size is None:
        budget = default_budget(run.device) if opts.memory_budget is None else int(opts.memory_budget)
        per_unit = sum(p.numel() for p in run.params.values()) * \
            torch.finfo(opts.dtype).bits // 8
        fit = rows_per_chunk(model, run.tensors, budget, max(len(run.units), 1))
        opts = replace(opts, chunk_size=max(1, min(fit, (budget // 2) // max(per_unit, 1))))
    return _chunks_of(run, opts)


def _chunks_of(run: _Batch, opts: Options) -> Iterator[PerUnit]:
    empty = list(run.units.empty_ids)
    for _, part, sink in run.chunks(
            opts, lambda s, n: PerUnitSink(run.params, n, opts.dtype, run.device)):
        yield PerUnit(sink.out, list(part.ids), part.weights.to(run.device, opts.dtype),
                      empty or [])
        empty = None


class _Batch:
    """A batch planned into units, ready for ``run_chunks``."""

    def __init__(self, model, batch, sample_ids, opts: Options, params=None):
        self.model = model
        self.tensors, ids = split_batch(batch, sample_ids, model=model)
        self.units = plan_units(model, self.tensors, ids, opts.loss, opts.unit, opts.weighting)
        self.plan = build_plan(model)
        self.device = model_device(model)
        self.params = self.plan.params if params is None else _select(self.plan.params, params)

    def chunks(self, opts: Options, new_sink):
        return run_chunks(self.model, self.plan, self.tensors, self.units, opts, new_sink=new_sink)


def _select(params: dict, names) -> dict:
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"params: expected a list of parameter names, got {names!r}.")
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise ValueError(f"params: expected names of trainable parameters (e.g. "
                         f"{list(params)[:3]}), got {unknown[:5] or 'none'}.")
    return {n: params[n] for n in params if n in set(names)}


# relative tolerance of the row-independence guard by the coarsest precision involved (the
# returned gradients, the model, autocast): the same row at another batch size differs by
# BLAS blocking, ~1e-16 in float64, ~1e-7 in float32 (amplified through layers), ~4e-3 in
# bfloat16 (8-bit mantissa); dropout or batch statistics move gradients by 1e-2 or more
# of their scale in float32 and float64. In bf16 the guard can only catch gross coupling.
_ROW_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def check_rows_independent(model, loss, tensors, units, result: PerUnit, autocast=None) -> None:
    """Raise ``ValueError`` unless the first and last units' gradients, computed alone (a
    forward of that one row, plain autograd, under the same ``autocast``), equal the batched
    ones (curvlinops' ``f(X) == vmap(f)(X)`` guard) for the parameters in ``result``. A
    batch-coupled model (batch statistics, rows mixed) fails it; the message then names the
    first module whose output for that row changes with the other rows
    (``row_coupling.locate_coupling``).
    """
    from .batching.row_losses import chunk_losses, chunk_rows

    params = {n: p for n, p in model.named_parameters() if p.requires_grad and n in result.tensors}
    device = model_device(model)
    precisions = [next(iter(result.tensors.values())).dtype] + [p.dtype for p in params.values()]
    if autocast is not None:
        precisions.append(autocast)
    tol = max(_ROW_TOL.get(d, 1e-4) for d in precisions)
    for j in sorted({0, len(units) - 1}):
        one = units.take(j, j + 1)
        with forward_context(device, autocast):
            loss_j, _ = chunk_losses(model, loss, chunk_rows(tensors, one.rows, device), one, None)
        grads = torch.autograd.grad(loss_j.sum(), list(params.values()), allow_unused=True)
        wants = [torch.zeros_like(p) if g is None else g
                 for p, g in zip(params.values(), grads, strict=True)]
        scale = max(float(w.abs().max()) for w in wants if w.numel()) or 1e-30
        for name, want in zip(params, wants, strict=True):
            got = result.tensors[name][j].to(want.dtype)
            err = float((got - want).abs().max()) if want.numel() else 0.0
            if err > tol * scale:
                raise ValueError(
                    f"rows interact: expected unit {units.ids[j]!r}'s gradient of {name} "
                    f"computed alone to equal the batched one, got a max difference of "
                    f"{err:.3g} (gradient scale {scale:.3g}). "
                    + _coupled_module(model, loss, tensors, one, device, autocast, tol))


def _coupled_module(model, loss, tensors, one, device, autocast, tol) -> str:
    """The sentence that names where the rows interact: the first module whose output for
    ``one``'s row differs between the whole batch's forward and the row's forward alone.
    """
    from .batching.row_coupling import locate_coupling
    from .batching.row_losses import chunk_rows

    def run(rows):
        def forward():
            with forward_context(device, autocast):
                return loss(model, chunk_rows(tensors, rows, device))
        return forward

    n = next(iter(tensors.values())).shape[0]
    row = int(one.rows[0])
    try:
        where = locate_coupling(model, run(torch.arange(n)), run(one.rows), row, tol)
    except (RuntimeError, ValueError) as e:  # e.g. out of memory for the whole batch at once
        return f"(Re-running the forwards to name the module failed: {e}.)"
    if where is None:
        return ("No module's output differs: the loss itself mixes rows, or the forward is "
                "random. Is the model in eval mode, without batch-coupled layers?")
    cls = type(model if where == "<model>" else model.get_submodule(where)).__name__
    return (f"The first module whose output for that row changes with the other rows is "
            f"{where!r} ({cls}): is the model in eval mode, without batch-coupled layers?")
