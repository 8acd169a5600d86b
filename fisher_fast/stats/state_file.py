"""State dicts and safetensors files of ``FisherAccumulator``.

A state dict is ``{"format", "config", "tasks": {task: {scalars..., "tensors": {key: T}}}}``
with tensor keys ``moments/<param>/<W|mean|m2>`` (``<W|f>`` for ``statistics="fisher"``),
``groups/<param>/<W|mean|m2>`` and
``micro/<b>/<param>/<closed|open_sum|open_w>``. On disk, tensors are stored flat as
``<task index>/<key>`` in one safetensors file whose metadata header ``fisher_fast`` holds
the rest as JSON (task names, counts, weights, empty ids, configuration).
"""

from __future__ import annotations

import json

from ..stats.micro_batches import MicroBatchState
from ..stats.moments import Moments, SecondMoment
from ..stats.task_state import TaskState

FORMAT = "fisher_fast.accumulator/2"  # 2: the loss, autocast, group ids and shapes in the config
_FIELDS = ("W", "mean", "m2")


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


def task_states_to_dict(tasks: dict, config: dict) -> dict:
    return {"format": FORMAT, "config": dict(config),
            "tasks": {name: _task_to_dict(st) for name, st in tasks.items()}}


def _diff(saved, here):
    """``(saved, here)``, narrowed to the differing entries when both are dicts (at most 5)."""
    if isinstance(saved, dict) and isinstance(here, dict):
        keys = [k for k in {**saved, **here} if saved.get(k) != here.get(k)]
        return {k: (saved.get(k), here.get(k)) for k in keys[:5]}
    return saved, here


def task_states_from_dict(state: dict, config: dict, device) -> dict:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"state: expected a {FORMAT!r} state dict, got "
                         f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}.")
    if state["config"] != config:
        diff = {k: _diff(state["config"].get(k), v) for k, v in config.items()
                if state["config"].get(k) != v}
        raise ValueError(f"state: expected the accumulator's configuration, got a state saved "
                         f"with a different one (saved, here): {diff}.")
    return {name: _task_from_dict(d, device) for name, d in state["tasks"].items()}


def save_file(state: dict, path) -> None:
    from safetensors.torch import save_file as st_save

    names = list(state["tasks"])
    flat, meta_tasks = {}, []
    for i, name in enumerate(names):
        d = dict(state["tasks"][name])
        for key, v in d.pop("tensors").items():
            flat[f"{i}/{key}"] = v.detach().to("cpu").contiguous()
        meta_tasks.append({"name": name, **d})
    meta = {"format": state["format"], "config": state["config"], "tasks": meta_tasks}
    st_save(flat, str(path), metadata={"fisher_fast": json.dumps(meta)})


def load_file(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        if "fisher_fast" not in raw:
            raise ValueError(f"{path}: expected a fisher_fast accumulator file, got no "
                             "'fisher_fast' metadata.")
        meta = json.loads(raw["fisher_fast"])
        flat = {k: f.get_tensor(k) for k in f.keys()}
    tasks = {}
    for i, t in enumerate(meta["tasks"]):
        t = dict(t)
        name = t.pop("name")
        prefix = f"{i}/"
        t["tensors"] = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        tasks[name] = t
    return {"format": meta["format"], "config": meta["config"], "tasks": tasks}
