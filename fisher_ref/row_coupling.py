"""Which layer makes a row's loss depend on the other rows, or on chance (SPEC §0).

The oracle takes every unit's gradient from one batched forward, which equals the row's
own gradient only if rows do not interact and the forward is deterministic. Two checks,
each a ``ValueError`` naming the module:

- :func:`check_no_row_coupling`, before any forward: batch norms in training mode (they
  normalise with the batch's statistics) or without running statistics (they do so in
  eval mode too); instance norms that track running statistics in training mode (every
  forward changes them); dropout with a positive rate in training mode, as a module or as
  an attention module's float ``*dropout*`` rate (random gradients: an error, not a
  warning, since an oracle must be reproducible). ``GroupNorm`` and ``LayerNorm`` are per
  row.
- :func:`name_coupled_module`, after the row-independence guard
  (``units.check_batched_forward``) has failed for a row: re-runs the float64 copy on the
  batch and on that row alone, each module's output recorded, and names the first module
  whose output for the row differs. This is the one place the oracle uses hooks; they only
  read outputs to word an error, never compute a number.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EVAL = "Call model.eval() before computing Fisher statistics."


def _reason(module: torch.nn.Module) -> str | None:
    """Why ``module`` makes rows interact or the forward random; ``None`` if it does not."""
    kind = type(module).__name__
    norm = torch.nn.modules.batchnorm
    if isinstance(module, norm._BatchNorm):
        if not module.track_running_stats or module.running_mean is None:
            return (f"{kind} without running statistics normalises each row with the batch's "
                    "mean and variance even in eval mode; give it running statistics or use "
                    "a per-row norm (LayerNorm, GroupNorm).")
        if module.training:
            return f"{kind} in training mode normalises each row with the batch's statistics. {EVAL}"
        return None
    if isinstance(module, torch.nn.modules.instancenorm._InstanceNorm):
        if module.training and module.track_running_stats:
            return (f"{kind} in training mode with track_running_stats=True updates its running "
                    f"statistics from every batch. {EVAL}")
        return None
    if not module.training:
        return None
    if isinstance(module, torch.nn.modules.dropout._DropoutNd):
        return (f"{kind} (p={module.p}) in training mode draws a new mask on every forward, "
                f"so per-sample gradients are random. {EVAL}") if module.p > 0 else None
    rates = {k: v for k, v in vars(module).items() if "dropout" in k
             and type(v) in (int, float) and v > 0}
    if rates:
        attr, rate = sorted(rates.items())[0]
        return (f"{kind} ({attr}={rate}) applies dropout in training mode, so per-sample "
                f"gradients are random. {EVAL}")
    return None


def check_no_row_coupling(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` naming the first module of ``model`` that couples rows or draws
    at random (see the module docstring); nothing is run.
    """
    offenders = [(name, why) for name, m in model.named_modules()
                 if (why := _reason(m)) is not None]
    if not offenders:
        return
    name, why = offenders[0]
    also = f" (and {len(offenders) - 1} more such modules)" if len(offenders) > 1 else ""
    raise ValueError(f"model: expected each row's loss not to depend on the other rows or on "
                     f"chance (SPEC §0), got module {name or '(the model)'!r}{also}: {why}")


def _outputs(model: torch.nn.Module, forward: Callable[[], object]) -> dict:
    """``{(module name, call index): first output tensor}`` of one no-grad ``forward()``."""
    seen: dict = {}
    calls: dict = {}
    order: list = []

    def record(name):
        def hook(module, inputs, output):
            if hasattr(output, "to_tuple"):
                output = output.to_tuple()
            if isinstance(output, (tuple, list)):
                output = output[0] if output else None
            if isinstance(output, torch.Tensor):
                calls[name] = calls.get(name, 0) + 1
                seen[(name, calls[name])] = output.detach().clone()
                order.append((name, calls[name]))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return {k: seen[k] for k in order}


def name_coupled_module(model: torch.nn.Module, batch: dict, row: int,
                        forward: Callable[[dict], object], rtol: float, atol: float) -> str:
    """A sentence naming the first module (in the order forwards finish, innermost first)
    whose output for batch row ``row`` differs between ``forward(batch)`` and
    ``forward(row alone)``, or saying that none does.
    """
    alone_batch = {k: v[row:row + 1] for k, v in batch.items()}
    whole = _outputs(model, lambda: forward(batch))
    alone = _outputs(model, lambda: forward(alone_batch))
    for key, a in alone.items():
        w = whole.get(key)
        if w is None or a.dim() == 0 or w.dim() == 0 or a.shape[0] != 1:
            continue
        if w.shape[0] == 1:
            mine = w[0]
        elif w.shape[0] > row and w.shape[1:] == a.shape[1:]:
            mine = w[row]
        else:
            continue
        same = torch.equal(mine, a[0]) if not mine.is_floating_point() else \
            bool(torch.isclose(mine, a[0], rtol=rtol, atol=atol, equal_nan=True).all())
        if not same:
            name = key[0]
            kind = type(model.get_submodule(name)).__name__
            return (f"The first module whose output for that row changes with the other rows "
                    f"is {name or '(the model)'!r} ({kind}).")
    return "No module's output for that row changes: the loss function itself mixes rows."
