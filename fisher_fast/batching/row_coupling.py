"""Layers that couple the rows of a batch, or make a forward random, found and named.

SPEC §0: a row's loss must not depend on the other rows, and per-row gradients are only
meaningful for a deterministic forward. Three lines of defence, each a ``ValueError`` that
names the module and says what to do:

1. **Before the first forward** (:func:`check_row_coupling`, called on every batch by
   ``checks.split_batch``): the modules known to couple rows or to draw at random —
   batch norms (``BatchNorm*``, ``SyncBatchNorm``, lazy ones) in training mode, or
   without running statistics in any mode; instance norms tracking running statistics in
   training mode (each forward updates them from the batch, i.e. changes the model);
   dropout (``Dropout*``, ``AlphaDropout``, and attention modules' float ``*dropout*``
   attributes, the functional dropout of HF attention) with a positive rate in training
   mode. Group and layer norms are per row, and fine in either mode.
2. **While capturing** (:func:`stateful_forward_error`): a module that updates a tensor it
   holds in its forward fails inside ``torch.func`` with "mutate a captured Tensor"; the
   capture turns that into an error naming the module.
3. **When the row-independence guard fails** (``per_sample_gradients(check=True)``,
   :func:`locate_coupling`): the forward is re-run on the whole batch and on the failing
   row alone with every module's output recorded, and the first module whose output for
   that row differs is named.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_FIX = "Call model.eval() before computing per-sample statistics."


def _coupling(module: nn.Module) -> str | None:
    """Why ``module`` couples rows or makes the forward random, or ``None``."""
    cls = type(module).__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if getattr(module, "running_mean", None) is None:
            return (f"({cls} without running statistics, track_running_stats=False): it "
                    "normalises every row with the batch's own mean and variance in either "
                    "mode, so each row's loss depends on the other rows. Give it running "
                    "statistics, or use a per-row norm (LayerNorm, GroupNorm).")
        if module.training:
            return (f"({cls} in training mode): it normalises every row with the batch's "
                    "own mean and variance, so each row's loss depends on the other rows "
                    f"(and it updates its running statistics). {_FIX}")
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.training \
            and module.track_running_stats:
        return (f"({cls} in training mode with track_running_stats=True): each forward "
                f"updates its running statistics from the batch, changing the model. {_FIX}")
    if module.training:
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return (f"({cls}, p={module.p:g}, in training mode): each forward draws a new "
                    "dropout mask, so per-sample gradients would be random (and a row's "
                    f"gradient would differ from that of the row run alone). {_FIX}")
        for attr, v in vars(module).items():
            if "dropout" in attr and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and v > 0:
                return (f"({cls}, {attr}={v:g}, in training mode): its forward applies "
                        "dropout, so per-sample gradients would be random. " + _FIX)
    return None


def coupling_modules(model: nn.Module) -> list[tuple[str, str]]:
    """``(module path, why)`` for every module of ``model`` that couples rows or draws at
    random (module 1 of the module docstring), in ``named_modules()`` order.
    """
    found = []
    for name, module in model.named_modules():
        why = _coupling(module)
        if why is not None:
            found.append((name or type(model).__name__, why))
    return found


def check_row_coupling(model: nn.Module) -> None:
    """Refuse a model with a layer that couples rows or draws at random.

    Raises:
        ValueError: naming the first such module (and how many more there are).
    """
    found = coupling_modules(model)
    if found:
        name, why = found[0]
        more = f" (and {len(found) - 1} more modules like it)" if len(found) > 1 else ""
        raise ValueError(f"model: expected rows that do not interact and a deterministic "
                         f"forward (SPEC §0), got module {name!r}{more} {why}")


def stateful_forward_error(err: BaseException, name: str, module: nn.Module) -> ValueError | None:
    """The ``ValueError`` to raise for ``err``, raised while the capture re-ran module
    ``name`` under ``torch.func``, when ``err`` says that its forward mutates a tensor it
    holds; otherwise ``None`` (re-raise ``err`` as it is).
    """
    if "mutate a captured Tensor" not in str(err):
        return None
    fix = _FIX if module.training else \
        "It does so in eval mode too: such a module is not supported."
    return ValueError(
        f"model: expected modules whose forward does not change the tensors they hold, got "
        f"module {name!r} ({type(module).__name__}) updating one in place (running "
        "statistics, a counter or a cache): its per-row gradients cannot be taken, and each "
        f"forward changes the model. {fix}")


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):  # a Hugging Face ModelOutput
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _record(model: nn.Module, run: Callable[[], object]) -> list[tuple[tuple[str, int], torch.Tensor]]:
    """Run ``run`` (a forward of ``model``) without grad, recording every module's first
    output tensor: ``[((path, call number), output)]`` in the order the modules finished.
    """
    out, calls = [], {}

    def hook_for(name):
        def hook(module, args, output):
            t = _first_tensor(output)
            if isinstance(t, torch.Tensor):
                k = calls[name] = calls.get(name, -1) + 1
                out.append(((name, k), t.detach()))
        return hook

    handles = [m.register_forward_hook(hook_for(n or "<model>")) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return out


def locate_coupling(model: nn.Module, run_batch: Callable[[], object],
                    run_row: Callable[[], object], row: int, rtol: float) -> str | None:
    """The first module whose output for batch row ``row`` differs between ``run_batch()``
    (a forward of the whole batch) and ``run_row()`` (a forward of that row alone), by more
    than ``rtol`` of the output's scale; ``None`` if every module agrees (the coupling is
    then in the loss, outside any module).

    Modules are compared in the order their forwards finish, so the innermost module where
    the row's values first change is named (a batch norm, not the block around it).
    """
    batched = dict(_record(model, run_batch))
    for key, alone in _record(model, run_row):
        whole = batched.get(key)
        if whole is None or alone.dim() == 0 or whole.dim() == 0 or alone.shape[0] != 1:
            continue
        if whole.shape[0] == 1:  # broadcast over the batch (position ids): the same row
            mine = whole[0]
        elif whole.shape[0] > row and whole.shape[1:] == alone.shape[1:]:
            mine = whole[row]
        else:
            continue
        if not (mine.is_floating_point() or mine.is_complex()):
            if not torch.equal(mine, alone[0]):
                return key[0]
            continue
        b = alone[0]
        if b.numel() and float((mine - b).abs().max()) > rtol * max(float(b.abs().max()), 1e-30):
            return key[0]
    return None
