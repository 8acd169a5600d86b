"""One batch's contribution to a task, computed in full before anything is committed.

``accumulate_batch`` runs the chunks (``engine.run_chunks``) into ``MomentSink``s and merges
their states into a fresh ``TaskState`` delta. Any failure — a bad batch, a non-finite loss,
a non-finite per-unit gradient (reported with the parameter and the unit) — raises before
the caller has changed anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..batching.checks import all_finite
from ..batching.units import plan_units, unshared
from ..run.chunks import model_device, run_chunks
from ..stats.micro_batches import MicroBatchState
from ..stats.sinks import MomentSink, PerUnitSink
from ..stats.task_state import TaskState


@dataclass
class Config:
    dtype: torch.dtype = torch.float32
    unit: str = "sample"
    weighting: str = "sample"
    chunk_size: int | None = None
    memory_budget: int | None = None
    elements: bool = True  # per-element moments
    groups: dict = field(default_factory=dict)  # name -> GroupSpec
    micro_batch_sizes: tuple = ()
    allow_tf32: bool = False
    autocast: torch.dtype | None = None
    second_only: bool = False  # per-element E[g²] only (SecondMoment), not mean and M2


def _first_bad_gradient(model, plan, loss, tensors, part, cfg, uniforms) -> str:
    part = unshared(part)  # one forward row per label draw: every gradient kept
    sink = PerUnitSink(plan.params, len(part), cfg.dtype, model_device(model))
    for _ in run_chunks(model, plan, loss, tensors, part, dtype=cfg.dtype, chunk_size=len(part),
                        memory_budget=cfg.memory_budget, uniforms=uniforms,
                        new_sink=lambda s, n: sink, allow_tf32=cfg.allow_tf32,
                        autocast=cfg.autocast):
        pass
    for what, f in (("a non-finite value", lambda g: g),
                    (f"finite gradients whose squares overflow {cfg.dtype}", torch.square)):
        for name, g in sink.out.items():
            bad = ~torch.isfinite(f(g.reshape(g.shape[0], -1))).all(dim=1)
            if bool(bad.any()):
                j = int(torch.nonzero(bad)[0])
                return f"{what} at parameter {name!r}, unit {part.ids[j]!r}"
    return "a statistic that overflowed (a sum of squares, e.g. over a group) at an unidentified parameter"


def accumulate_batch(model, plan, loss, tensors, ids, cfg: Config, prior: TaskState,
                     *, expand=None, uniforms=None, allow_empty=False) -> TaskState:
    """The delta state of one batch (units after ``prior``'s).

    Args:
        expand: ``Units -> Units`` applied after planning (label draws, class enumeration);
            the delta keeps the original units' count, weight and empty ids.
    """
    units = plan_units(model, tensors, ids, loss, cfg.unit, cfg.weighting, allow_empty)
    base_w = units.weights
    run_units = expand(units) if expand is not None else units
    full = set(plan.params) if cfg.elements else set()
    device = model_device(model)
    micro = {b: {name: prior.micro[b][name] if b in prior.micro else
                 MicroBatchState.zeros(b, p.shape, cfg.dtype, device)
                 for name, p in plan.params.items()} for b in cfg.micro_batch_sizes}
    micro = {b: {k: _on(v, device) for k, v in d.items()} for b, d in micro.items()}
    delta = TaskState(n_units=len(units), n_rows=len(ids), total_weight=float(base_w.sum()),
                      sum_w2=float(base_w.square().sum()), empty_ids=list(units.empty_ids))
    for start, part, sink in run_chunks(
            model, plan, loss, tensors, run_units, dtype=cfg.dtype, chunk_size=cfg.chunk_size,
            memory_budget=cfg.memory_budget, uniforms=uniforms, allow_tf32=cfg.allow_tf32,
            autocast=cfg.autocast,
            new_sink=lambda s, n: MomentSink(full, cfg.groups, micro, cfg.second_only)):
        chunk = TaskState(moments=sink.take_moments(), group_moments=sink.group_moments)
        states = [t for m in list(chunk.moments.values()) + list(chunk.group_moments.values())
                  for t in m.arrays()]
        states += [t for d in sink.micro.values() for s in d.values()
                   for t in (s.closed, s.open_sum)]
        if not all_finite(states):
            where = _first_bad_gradient(model, plan, loss, tensors, part, cfg, uniforms)
            raise ValueError(f"non-finite gradient: expected finite per-unit gradients and "
                             f"statistics, got {where}.")
        merged = delta.merged(chunk, in_place=True)  # the delta's tensors are its own
        delta = replace(delta, moments=merged.moments, group_moments=merged.group_moments,
                        micro=sink.micro)
        micro = sink.micro
    return delta


def _on(state: MicroBatchState, device) -> MicroBatchState:
    return MicroBatchState(state.b, state.closed.to(device), state.open_sum.to(device),
                           state.open_w.to(device), state.seen)
