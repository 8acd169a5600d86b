"""One batch's contribution to a task, computed in full before anything is committed.

``accumulate_batch`` runs the chunks (``run.chunks.run_chunks``) into ``MomentSink``s and merges
their states into a fresh ``TaskState`` delta. Any failure — a bad batch, a non-finite loss,
a non-finite per-unit gradient (reported with the parameter and the unit) — raises before
the caller has changed anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..batching.checks import all_finite
from ..batching.units import plan_units, unshared
from ..stats.micro_batches import MicroBatchState
from ..stats.sinks import MomentSink, PerUnitSink
from ..stats.task_state import TaskState
from .chunks import model_device, run_chunks
from .options import Options


@dataclass(frozen=True)
class Keep:
    """Which statistics a batch's delta keeps.

    Attributes:
        elements: per-element moment states of every trainable parameter.
        groups: ``{name: GroupSpec}`` whose group moments are kept.
        micro_batch_sizes: the b of ``batch_squared_gradient(b)`` whose states are kept.
        second_only: per-element E[g²] alone (``SecondMoment``), not the mean and M2.
    """

    elements: bool = True
    groups: dict = field(default_factory=dict)
    micro_batch_sizes: tuple = ()
    second_only: bool = False


def _first_bad_gradient(model, plan, tensors, part, opts: Options, uniforms) -> str:
    part = unshared(part)  # one forward row per label draw: every gradient kept
    sink = PerUnitSink(plan.params, len(part), opts.dtype, model_device(model))
    for _ in run_chunks(model, plan, tensors, part, replace(opts, chunk_size=len(part)),
                        uniforms=uniforms, new_sink=lambda s, n: sink):
        pass
    for what, f in (("a non-finite value", lambda g: g),
                    (f"finite gradients whose squares overflow {opts.dtype}", torch.square)):
        for name, g in sink.out.items():
            bad = ~torch.isfinite(f(g.reshape(g.shape[0], -1))).all(dim=1)
            if bool(bad.any()):
                j = int(torch.nonzero(bad)[0])
                return f"{what} at parameter {name!r}, unit {part.ids[j]!r}"
    return "a statistic that overflowed (a sum of squares, e.g. over a group) at an unidentified parameter"


def accumulate_batch(model, plan, tensors, ids, opts: Options, keep: Keep, prior: TaskState,
                     *, expand=None, uniforms=None, allow_empty=False) -> TaskState:
    """The delta state of one batch (units after ``prior``'s).

    Args:
        expand: ``Units -> Units`` applied after planning (label draws, class enumeration);
            the delta keeps the original units' count, weight and empty ids.
    """
    units = plan_units(model, tensors, ids, opts.loss, opts.unit, opts.weighting, allow_empty)
    base_w = units.weights
    run_units = expand(units) if expand is not None else units
    full = set(plan.params) if keep.elements else set()
    device = model_device(model)
    micro = {b: {name: prior.micro[b][name] if b in prior.micro else
                 MicroBatchState.zeros(b, p.shape, opts.dtype, device)
                 for name, p in plan.params.items()} for b in keep.micro_batch_sizes}
    micro = {b: {k: _on(v, device) for k, v in d.items()} for b, d in micro.items()}
    delta = TaskState(n_units=len(units), n_rows=len(ids), total_weight=float(base_w.sum()),
                      sum_w2=float(base_w.square().sum()), empty_ids=list(units.empty_ids))
    # each chunk's sink continues the micro-batch states the chunk before it left
    carried = {"micro": micro}

    def new_sink(start: int, n: int) -> MomentSink:
        return MomentSink(full, keep.groups, carried["micro"], keep.second_only)

    for _, part, sink in run_chunks(model, plan, tensors, run_units, opts, uniforms=uniforms,
                                    new_sink=new_sink):
        chunk = TaskState(moments=sink.take_moments(), group_moments=sink.group_moments)
        states = [t for m in list(chunk.moments.values()) + list(chunk.group_moments.values())
                  for t in m.arrays()]
        states += [t for d in sink.micro.values() for s in d.values()
                   for t in (s.closed, s.open_sum)]
        if not all_finite(states):
            where = _first_bad_gradient(model, plan, tensors, part, opts, uniforms)
            raise ValueError(f"non-finite gradient: expected finite per-unit gradients and "
                             f"statistics, got {where}.")
        merged = delta.merged(chunk, in_place=True)  # the delta's tensors are its own
        delta = replace(delta, moments=merged.moments, group_moments=merged.group_moments,
                        micro=sink.micro)
        carried["micro"] = sink.micro
    return delta


def _on(state: MicroBatchState, device) -> MicroBatchState:
    return MicroBatchState(state.b, state.closed.to(device), state.open_sum.to(device),
                           state.open_w.to(device), state.seen)
