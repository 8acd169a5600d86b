"""State dicts and safetensors files of ``FisherAccumulator``, verified on load.

A state dict is ``{"format", "config", "model", "tasks": {task: {scalars..., "tensors":
{key: T}}}}`` with tensor keys ``moments/<param>/<W|mean|m2>`` (``<W|f>`` for
``statistics="fisher"``), ``groups/<param>/<W|mean|m2>``,
``micro/<b>/<param>/<closed|open_sum|open_w>`` and ``seen/ids`` (the 64-bit hashes of
every sample id the task has seen, sorted; ``batching.checks.id_hashes``). ``"model"`` is
the model's fingerprint (:func:`model_fingerprint`): its class, every parameter's name,
shape and dtype, and a sha256 of each parameter's values.

On disk, tensors are stored flat as ``<task index>/<key>`` in one safetensors file whose
metadata header ``fisher_fast`` holds the rest as JSON (task names, counts, weights, empty
ids, configuration, fingerprint) and a sha256 of every tensor (``checksums``);
``fisher_fast.sha256`` is the sha256 of that JSON. Loading checks both, so a corrupted
payload under an intact header, or an edited header, is a ``ValueError`` naming the file
and the tensor. Files are written atomically (``file_integrity.atomic_write``).

Format history: 1, the first; 2 added the loss, autocast, group ids and shapes to the
configuration; 3 (this one) added the checksums, the model fingerprint and the seen sample
ids. Format 1 is refused; format 2 loads with a ``UserWarning`` (nothing in it can be
verified: no checksums, no fingerprint, no record of the ids seen).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping

import torch

from ..file_integrity import (
    PathLike,
    atomic_write,
    check_digests,
    readable_file,
    tensor_digest,
    text_digest,
    writable_path,
)
from ..stats.micro_batches import MicroBatchState
from ..stats.moments import Moments, SecondMoment
from ..stats.task_state import TaskState

FORMAT = "fisher_fast.accumulator/3"
LEGACY_FORMAT = "fisher_fast.accumulator/2"  # loads with a warning, unverified
SEEN_KEY = "seen/ids"
_FIELDS = ("W", "mean", "m2")
_META, _META_DIGEST = "fisher_fast", "fisher_fast.sha256"


# the model's fingerprint ----------------------------------------------------------------
def model_fingerprint(model: torch.nn.Module) -> dict:
    """What a saved state records of the model it was computed for (JSON-able).

    ``{"class": "<module>.<qualname>", "parameters": {name: [shape, dtype]}, "weights":
    {name: sha256 of the values}}`` over ``model.named_parameters()`` (tied parameters once,
    frozen ones included: they shape the gradients too). Hashing reads every weight once
    (copied to the CPU one tensor at a time): about a second per GB.
    """
    params = dict(model.named_parameters())
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "parameters": {n: [list(p.shape), str(p.dtype).replace("torch.", "")]
                           for n, p in params.items()},
            "weights": {n: tensor_digest(p) for n, p in params.items()}}


def _listed(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def check_fingerprint(saved: Mapping, here: Mapping, *, allow_weights_change: bool) -> None:
    """A state saved for ``saved`` may be loaded into the model of ``here``.

    The class, the parameter names, shapes and dtypes must agree; the weights too unless
    ``allow_weights_change``.

    Raises:
        ValueError: saying what differs (saved, here).
    """
    if saved.get("class") != here["class"]:
        raise ValueError(f"state: expected a state saved for a {here['class']}, got one saved "
                         f"for a {saved.get('class')}.")
    sp, hp = saved.get("parameters", {}), here["parameters"]
    if sp != hp:
        parts = []
        if set(sp) - set(hp):
            parts.append(f"parameters only in the saved model: {_listed(set(sp) - set(hp))}")
        if set(hp) - set(sp):
            parts.append(f"parameters only in this model: {_listed(set(hp) - set(sp))}")
        diff = [n for n in sp if n in hp and sp[n] != hp[n]]
        parts += [f"{n!r}: [shape, dtype] saved {sp[n]}, here {hp[n]}" for n in diff[:5]]
        raise ValueError("state: expected a state saved for a model with this model's "
                         "parameters, got one saved for another: " + "; ".join(parts) + ".")
    sw, hw = saved.get("weights", {}), here["weights"]
    changed = [n for n in hw if sw.get(n) != hw[n]]
    if changed and not allow_weights_change:
        raise ValueError(f"state: expected a state saved with this model's weights, got one "
                         f"saved with different values in {len(changed)} of {len(hw)} "
                         f"parameters ({_listed(changed, 3)}): its statistics are another "
                         "model's. Pass allow_weights_change=True to load it anyway (further "
                         "updates then mix the statistics of both models).")


# state dicts -------------------------------------------------------------------------------
def _task_to_dict(st: TaskState) -> dict:
    t = {}
    for kind, store in (("moments", st.moments), ("groups", st.group_moments)):
        for name, m in store.items():
            for f in (_FIELDS if isinstance(m, Moments) else ("W", "f")):
                t[f"{kind}/{name}/{f}"] = getattr(m, f).detach().clone()
    seen = {}
    for b, states in st.micro.items():
        for name, s in states.items():
            t[f"micro/{b}/{name}/closed"] = s.closed.clone()
            t[f"micro/{b}/{name}/open_sum"] = s.open_sum.clone()
            t[f"micro/{b}/{name}/open_w"] = s.open_w.clone()
            seen[str(b)] = s.seen
    return {"n_units": st.n_units, "n_rows": st.n_rows, "total_weight": st.total_weight,
            "sum_w2": st.sum_w2, "empty_ids": list(st.empty_ids), "micro_seen": seen,
            "tensors": t}


def _task_from_dict(d: dict, device) -> TaskState:
    st = TaskState(d["n_units"], d["n_rows"], d["total_weight"], d["sum_w2"], list(d["empty_ids"]))
    parts: dict = {}
    for key, v in d["tensors"].items():
        if key == SEEN_KEY:
            continue
        kind, rest = key.split("/", 1)
        if kind == "micro":
            b, name, f = rest.split("/")
            parts.setdefault(("micro", int(b), name), {})[f] = v.to(device)
        else:
            name, f = rest.rsplit("/", 1)
            parts.setdefault((kind, name), {})[f] = v.to(device)
    for key, fields in parts.items():
        if key[0] == "micro":
            _, b, name = key
            st.micro.setdefault(b, {})[name] = MicroBatchState(
                b, fields["closed"], fields["open_sum"], fields["open_w"], d["micro_seen"][str(b)])
        else:
            store = st.moments if key[0] == "moments" else st.group_moments
            store[key[1]] = SecondMoment(fields["W"], fields["f"]) if "f" in fields else \
                Moments(fields["W"], fields["mean"], fields["m2"])
    return st


def task_states_to_dict(tasks: Mapping[str, TaskState], config: dict, model: dict,
                        seen: Mapping[str, torch.Tensor]) -> dict:
    """The state dict of an accumulator.

    Args:
        tasks: ``{task: TaskState}``.
        config: the accumulator's ``config_summary()``.
        model: the model's fingerprint (:func:`model_fingerprint`).
        seen: ``{task: LongTensor[n_seen]}``, the sorted hashes of the task's sample ids.
    """
    out = {}
    for name, st in tasks.items():
        d = _task_to_dict(st)
        d["tensors"][SEEN_KEY] = seen.get(name, torch.zeros(0, dtype=torch.int64)).clone()
        out[name] = d
    return {"format": FORMAT, "config": dict(config), "model": model, "tasks": out}


def _diff(saved, here):
    """``(saved, here)``, narrowed to the differing entries when both are dicts (at most 5)."""
    if isinstance(saved, dict) and isinstance(here, dict):
        keys = [k for k in {**saved, **here} if saved.get(k) != here.get(k)]
        return {k: (saved.get(k), here.get(k)) for k in keys[:5]}
    return saved, here


def task_states_from_dict(state: dict, config: dict, model: dict, device, *,
                          allow_weights_change: bool = False):
    """``(tasks, seen)`` of a state dict, checked against the accumulator that loads it.

    Args:
        state: a state dict of format 3 (or 2, with a ``UserWarning``).
        config: the loading accumulator's ``config_summary()``; must equal the saved one.
        model: the loading model's fingerprint; must agree (:func:`check_fingerprint`).
        device: where the loaded states go.
        allow_weights_change: accept a state saved for other weights of the same parameters.

    Returns:
        ``({task: TaskState}, {task: LongTensor[n_seen]})``.

    Raises:
        ValueError: another format, another configuration, another model.
    """
    got = state.get("format") if isinstance(state, dict) else type(state).__name__
    if got not in (FORMAT, LEGACY_FORMAT):
        raise ValueError(f"state: expected a {FORMAT!r} state dict, got {got!r}.")
    if state["config"] != config:
        diff = {k: _diff(state["config"].get(k), v) for k, v in config.items()
                if state["config"].get(k) != v}
        raise ValueError(f"state: expected the accumulator's configuration, got a state saved "
                         f"with a different one (saved, here): {diff}.")
    if got == LEGACY_FORMAT:
        warnings.warn(f"state: format {LEGACY_FORMAT!r} (before {FORMAT!r}) loaded without "
                      "verification: it has no checksums, no fingerprint of the model it was "
                      "computed for, and no record of the sample ids seen (ids seen before "
                      "it was saved are not refused when given again). Save it again to "
                      "upgrade it.", UserWarning, stacklevel=3)
    else:
        check_fingerprint(state["model"], model, allow_weights_change=allow_weights_change)
    tasks, seen = {}, {}
    for name, d in state["tasks"].items():
        tasks[name] = _task_from_dict(d, device)
        ids = d["tensors"].get(SEEN_KEY)
        seen[name] = torch.zeros(0, dtype=torch.int64) if ids is None else \
            ids.to("cpu", torch.int64).clone()
    return tasks, seen


# files ---------------------------------------------------------------------------------
def save_file(state: dict, path: PathLike) -> None:
    """Write a state dict to ``path`` atomically, with a checksum of every tensor.

    Raises:
        ValueError: ``path`` in a missing directory, or naming a directory.
    """
    from safetensors.torch import save_file as st_save

    target = writable_path(path)
    flat, meta_tasks = {}, []
    for i, name in enumerate(state["tasks"]):
        d = dict(state["tasks"][name])
        for key, v in d.pop("tensors").items():
            flat[f"{i}/{key}"] = v.detach().to("cpu").contiguous()
        meta_tasks.append({"name": name, **d})
    meta = {"format": state["format"], "config": state["config"], "model": state["model"],
            "tasks": meta_tasks, "checksums": {k: tensor_digest(v) for k, v in flat.items()}}
    text = json.dumps(meta)
    with atomic_write(target) as tmp:
        st_save(flat, str(tmp), metadata={_META: text, _META_DIGEST: text_digest(text)})


def _read(path, safe_open) -> tuple[dict, dict]:
    """``(header metadata, {key: tensor})`` of a safetensors file, any failure a ValueError."""
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            if _META not in raw:
                raise ValueError(f"{path}: expected a fisher_fast accumulator file, got no "
                                 f"{_META!r} metadata.")
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: expected a readable safetensors file, got {e}.") from None
    return raw, flat


def load_file(path: PathLike) -> dict:
    """The state dict saved at ``path``, every checksum verified (format 3).

    Raises:
        ValueError: no such file; not a safetensors file or not one of fisher_fast's; a
            header or a tensor whose checksum differs from the one recorded (naming the
            file and the tensor).
    """
    from safetensors import safe_open

    p = readable_file(path)
    raw, flat = _read(p, safe_open)
    text = raw[_META]
    digest = raw.get(_META_DIGEST)
    if digest is not None and digest != text_digest(text):
        raise ValueError(f"{p}: expected the {_META!r} header to have the checksum recorded "
                         "when it was written, got another: the file is corrupted.")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: expected a JSON {_META!r} header, got {e}.") from None
    if meta.get("format") == FORMAT:
        if digest is None:
            raise ValueError(f"{p}: expected a {_META_DIGEST!r} header entry (format "
                             f"{FORMAT!r}), got none.")
        check_digests(p, flat, meta.get("checksums", {}))
    tasks = {}
    for i, t in enumerate(meta["tasks"]):
        t = dict(t)
        name = t.pop("name")
        prefix = f"{i}/"
        t["tensors"] = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        tasks[name] = t
    return {"format": meta["format"], "config": meta["config"], "model": meta.get("model"),
            "tasks": tasks}
