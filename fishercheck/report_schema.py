"""The keys and types of ``report.json``, in one place.

The main job (:mod:`fishercheck.mainjob`) builds a :class:`Report`, :mod:`fishercheck.reports`
validates it before writing and renders ``report.md`` from it, :mod:`fishercheck.plots` reads
it, and the tests validate a real run's ``report.json`` against it. Each ``TypedDict`` below
is a JSON object with exactly these keys (``total=False`` ones may be absent); per-head
arrays are nested lists ``[layers][heads][blocks]`` with the blocks in :data:`BLOCKS` order.

Floats that are not finite are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"``
(JSON has no such numbers): :data:`Number` accepts either.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Literal, TypedDict, Union

BLOCKS = ("Q", "K", "V", "O")
TASKS = ("A", "B")
LAYER_EMBEDDINGS, LAYER_FINAL = "embeddings", "final/head"
NON_FINITE = ("inf", "-inf", "nan")

Number = float | str  # a float, or one of NON_FINITE
HeadArray = list[list[list[Number]]]  # [layers][heads][4], BLOCKS order
LayerHeadArray = list[list[Number]]  # [layers][heads]


class Meta(TypedDict):
    """What ran: the model, how its weights were loaded, the task files, where."""

    model: str
    trained: bool  # True only if every tensor of the model came from the checkpoint
    weights: Literal["loaded", "partial", "random"]
    missing_tensors: list[str]  # in the model, not in the checkpoint: random (--allow-partial)
    unexpected_tensors: list[str]  # in the checkpoint, not in the model: ignored (--allow-partial)
    task_a: str
    task_b: str
    device: str
    max_length: int
    samples: int  # rows per task asked for (--samples)
    rows: dict[str, int]  # task -> rows used (fewer than samples when its file has fewer)
    plots: list[str]


class MemoryPlan(TypedDict):
    """The memory plan (:mod:`fishercheck.memory_plan`): chunks, blocks, where C_A lived."""

    budget_bytes: int
    mode: Literal["memory", "store", "recompute"]
    chunk_rows: int
    block_rows: int
    peaks_bytes: dict[str, int]  # step -> estimated peak


class Settings(TypedDict):
    """The statistics' settings."""

    pairs_per_task: dict[str, int]  # rows per task of the conflicts' test (--pairs)
    interference_units: dict[str, int]  # units per task of the interference (every row)
    n_permutations: int
    seed: int
    dtype: str
    unit: str
    loss: str
    memory: MemoryPlan


class Layout(TypedDict):
    """The attention layout fisher_fast detected."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    kind: str


class PerLayer(TypedDict):
    """ΣF and ΣS over one block of the model's parameters, and their ratio."""

    layer: str  # LAYER_EMBEDDINGS, "layer {l}" or LAYER_FINAL
    E_g2: Number
    Eg_2: Number
    ratio: Number


class Impact(TypedDict):
    """Rank agreement of R(F) and R(S) over the heads' slices (SPEC §9)."""

    spearman: Number
    kendall: Number
    topk_jaccard_10: Number
    topk_jaccard_20: Number
    pruning_mask_jaccard: Number


class Task(TypedDict):
    """One task's statistics."""

    n_units: int
    per_layer: list[PerLayer]
    head_fisher: HeadArray  # R(F)[l][h][B]
    head_squared_mean: HeadArray  # R(S)[l][h][B]
    impact: Impact


class TopPair(TypedDict):
    """One of the largest interference entries M^B[i, j, l, h]."""

    score: Number
    id_a: str | int
    id_b: str | int
    layer: int
    head: int
    block: str


class Interference(TypedDict):
    """QK-OV interference of task A on task B (SPEC §6)."""

    means: dict[str, LayerHeadArray]  # block -> [L][H] mean over pairs
    top: list[TopPair]


class ConflictSlice(TypedDict):
    """The permutation test of one QK-OV slice I(layer, head, block) (SPEC §7)."""

    group: str
    layer: int
    head: int
    block: str
    mean_cosine: Number
    p: Number
    q: Number
    effect: Number  # (c̄_obs − mean null) / sd null
    interval: list[Number]  # 95 % bootstrap interval of the mean cosine: [low, high]


class Conflicts(TypedDict):
    """Per-head conflicts: the hypothesis tested, whether it can be rejected, and each slice."""

    hypothesis: str  # the null of every slice's permutation test, in words
    alpha: float  # the q threshold the report uses
    fdr: str  # "bh" or "by"
    min_attainable_p: float  # no p-value of the test can be smaller (sizes and permutations)
    testable: bool  # min_attainable_p < alpha
    note: str  # why not testable ("" when testable)
    slices: list[ConflictSlice]


class _CheckRequired(TypedDict):
    rows_per_task: int
    empirical_fisher: Number
    squared_mean_gradient: Number
    interference: Number
    conflict_p_max_abs_difference: Number


class Check(_CheckRequired):
    """``--check``: the largest relative differences of fisher_fast from fisher_ref."""


class _ReportRequired(TypedDict):
    meta: Meta
    settings: Settings
    layout: Layout
    tasks: dict[str, Task]
    interference: Interference
    conflicts: Conflicts
    timings: dict[str, Number]


class StoreInfo(TypedDict):
    """``--store``: where it is and what this run took from it instead of computing it."""

    path: str
    reused: dict[str, int | bool]  # moments_A_rows, contributions_A_rows, interference_blocks, …


class Report(_ReportRequired, total=False):
    """The whole of ``report.json``; ``check`` only with ``--check``, ``store`` with ``--store``."""

    check: Check
    store: StoreInfo


def to_json(x: object) -> object:
    """JSON-safe copy of ``x``: non-finite floats become strings, tuples lists, keys str."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    return x


def number(x: Number) -> float:
    """A :data:`Number` as a float (``"inf"`` -> ``inf``)."""
    return float(x)


def validate(report: object) -> None:
    """Check ``report`` (a ``report.json`` as loaded, or the main job's result) against the schema.

    Checks every key and type, and that the per-head arrays and conflict slices fit the
    layout (``[layers][heads][4]``, indices in range).

    Raises:
        ValueError: naming the first offending path, what was expected and what came.
    """
    _check(report, Report, "report")
    L, H = report["layout"]["layers"], report["layout"]["heads"]
    for task, rec in report["tasks"].items():
        for key in ("head_fisher", "head_squared_mean"):
            _shape(rec[key], (L, H, len(BLOCKS)), f"report.tasks.{task}.{key}")
    for block, arr in report["interference"]["means"].items():
        _shape(arr, (L, H), f"report.interference.means.{block}")
    if sorted(report["interference"]["means"]) != sorted(BLOCKS):
        raise ValueError(f"report.interference.means: expected the blocks {list(BLOCKS)}, got "
                         f"{sorted(report['interference']['means'])}.")
    for k, s in enumerate(report["conflicts"]["slices"]):
        where = f"report.conflicts.slices[{k}]"
        if not (0 <= s["layer"] < L and 0 <= s["head"] < H and s["block"] in BLOCKS):
            raise ValueError(f"{where}: expected layer in [0, {L}), head in [0, {H}), block in "
                             f"{BLOCKS}, got ({s['layer']}, {s['head']}, {s['block']!r}).")
        if len(s["interval"]) != 2:
            raise ValueError(f"{where}.interval: expected [low, high], got {s['interval']!r}.")


def _shape(arr: list, shape: tuple[int, ...], where: str) -> None:
    if not shape:
        return
    if len(arr) != shape[0]:
        raise ValueError(f"{where}: expected {shape[0]} entries along this axis, got {len(arr)}.")
    for k, sub in enumerate(arr):
        _shape(sub, shape[1:], f"{where}[{k}]")


def _check(value: object, kind: object, where: str) -> None:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType) and set(args) == {float, str}:  # Number
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or value in NON_FINITE
        if not ok:
            raise ValueError(f"{where}: expected a number (or one of {NON_FINITE}), got {value!r}.")
        return
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                _check(value, option, where)
                return
            except ValueError:
                continue
        raise ValueError(f"{where}: expected one of {[_name(a) for a in args]}, got {value!r}.")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: expected one of {list(args)}, got {value!r}.")
        return
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}.")
        for k, item in enumerate(value):
            _check(item, args[0], f"{where}[{k}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object, got {type(value).__name__}.")
        for key, item in value.items():
            _check(key, args[0], f"{where} key")
            _check(item, args[1], f"{where}.{key}")
        return
    if isinstance(kind, type) and issubclass(kind, dict):  # a TypedDict
        _check_object(value, kind, where)
        return
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}.")
        return
    if kind is bool or kind is int or kind is str:
        good = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not good:
            raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}.")
        return
    raise TypeError(f"report schema: no check for {kind!r} at {where}.")


def _check_object(value: object, kind: type, where: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object ({kind.__name__}), got {type(value).__name__}.")
    hints = typing.get_type_hints(kind)
    missing = sorted(kind.__required_keys__ - set(value))
    unknown = sorted(set(value) - set(hints))
    if missing or unknown:
        raise ValueError(f"{where}: expected the keys of {kind.__name__} ({sorted(hints)}), got "
                         f"{len(missing)} missing {missing} and {len(unknown)} unknown {unknown}.")
    for key, item in value.items():
        _check(item, hints[key], f"{where}.{key}")


def _name(kind: object) -> str:
    return getattr(kind, "__name__", str(kind))
