r"""One pass for Phase 5/6: each task's per-unit gradients computed once, for everything.

The separate public calls each recompute what they need: ``per_sample_contributions`` of
task A and of task B, then ``interference`` (A's and B's gradients of the attention slices
again) and ``conflicts`` (a third time). ``cross_task`` computes each task's per-unit
gradients once (one batched forward and backward per chunk, ``per_sample.py``) and feeds,
from them,

- the contributions :math:`C_u = g_u^2` (SPEC §5) of the attention slices' parameters or of
  every parameter, returned and/or filed in a ``ContributionStore`` under each task's name;
- QK-OV interference of A on B (SPEC §6, ``interference.interference_from_units``);
- per-head (or per-parameter) conflicts with their permutation test (SPEC §7,
  ``conflicts.conflicts_from_units``).

The numbers are those of the separate calls (the same per-unit gradients, the same
scoring code); only the gradient passes are shared: 2 instead of 6 when all three are asked.
What is held at once: both tasks' signed gradients of the parameters the scores need (the
attention slices, or every parameter for ``groups="parameters"`` conflicts), and one chunk
of the rest while its contributions are filed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .attention.layouts import AttentionLayout, attention_layout
from .conflicts import ConflictResult, conflicts_from_units
from .interference import InterferenceResult, _layout_names, interference_from_units
from .per_sample import unit_gradient_chunks, unit_gradients
from .results import LossFn, PerUnit, SampleIds
from .run.options import Options
from .store.contribution_store import ContributionStore

CONTRIBUTIONS = ("attention", "all", None)
INTERFERENCE_OPTIONS = ("fisher", "signed", "eps", "ridge_rel", "top_k", "score_rows")
CONFLICT_OPTIONS = ("groups", "n_permutations", "seed", "n_bootstrap", "fdr")


@dataclass
class CrossTaskResult:
    """What ``cross_task`` computed.

    Attributes:
        contributions: ``{task name: PerUnit}`` of C_u = g_u² (``tensors[name]`` is
            ``[U, *param.shape]``), empty when none were asked or ``return_contributions``
            is False (the ids and weights are still there).
        interference: the ``InterferenceResult`` of A on B, or ``None``.
        conflicts: the ``ConflictResult``, or ``None``.
        tasks: the two task names, A's first.
    """

    contributions: dict = field(default_factory=dict)
    interference: InterferenceResult | None = None
    conflicts: ConflictResult | None = None
    tasks: tuple = ("a", "b")


def _options(value, allowed: tuple, what: str) -> dict | None:
    """``True`` -> defaults, ``False``/``None`` -> not computed, a dict -> those options."""
    if value is True:
        return {}
    if value is False or value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{what}: expected True, False or a dict of its options, got {value!r}.")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: expected options among {allowed}, got {unknown}.")
    return dict(value)


def _check_tasks(tasks) -> tuple:
    if (not isinstance(tasks, (tuple, list)) or len(tasks) != 2
            or not all(isinstance(t, str) for t in tasks) or tasks[0] == tasks[1]):
        raise ValueError(f"tasks: expected two distinct task names (str), got {tasks!r}.")
    return tuple(tasks)


def cross_task(model: torch.nn.Module, batch_a: dict, batch_b: dict, *,
               contributions: str | None = "attention", store: ContributionStore | None = None,
               return_contributions: bool = True, interference: bool | dict = True,
               conflicts: bool | dict = True, tasks: tuple = ("a", "b"),
               layout: AttentionLayout | dict | None = None,
               include_bias: bool = False, loss_fn: LossFn | None = None, unit: str = "sample",
               weighting: str = "sample", dtype: torch.dtype | None = None,
               chunk_size: int | None = None, memory_budget: float | None = None,
               sample_ids_a: SampleIds | None = None,
               sample_ids_b: SampleIds | None = None) -> CrossTaskResult:
    """Contributions, interference and conflicts of two tasks from one gradient pass each.

    Args:
        model: the model (eval mode, rows independent); its attention layout is detected
            unless ``layout`` is given.
        batch_a: task A's batch.
        batch_b: task B's batch.
        contributions: ``"attention"`` (C_u of the attention slices' parameters),
            ``"all"`` (of every trainable parameter) or ``None``.
        store: a ``ContributionStore`` to file the contributions in, under ``tasks``; the
            whole call is one ``store.transaction()`` (all filed, or none).
        return_contributions: also return the contributions (``False`` with a store:
            only ids and weights come back).
        interference: ``True`` (defaults), ``False``, or a dict of ``interference``'s
            options (``fisher``, ``signed``, ``eps``, ``ridge_rel``, ``top_k``,
            ``score_rows``).
        conflicts: ``True``, ``False``, or a dict of ``conflicts``' options (``groups``,
            ``n_permutations``, ``seed``, ``n_bootstrap``, ``fdr``).
        tasks: the two task names (for the store and the result).
        layout: a declared attention layout (``None``: detected).
        include_bias: slices also hold the Q/K/V bias entries.
        loss_fn: per-row loss (``None``: ``causal_lm_loss``).
        unit: ``"sample"`` or ``"token"``.
        weighting: ``"sample"`` or ``"token"``.
        dtype: statistics dtype, float32 (default) or float64.
        chunk_size: forward rows per chunk (default: from the memory budget).
        memory_budget: bytes (default: a fraction of free memory).
        sample_ids_a: task A's sample ids, if not in its batch.
        sample_ids_b: task B's sample ids, if not in its batch.

    Returns:
        CrossTaskResult.

    Raises:
        ValueError: for an unknown option, nothing asked, or a store with nothing to file.
    """
    tasks = _check_tasks(tasks)
    i_opts = _options(interference, INTERFERENCE_OPTIONS, "interference")
    c_opts = _options(conflicts, CONFLICT_OPTIONS, "conflicts")
    if contributions not in CONTRIBUTIONS:
        raise ValueError(f"contributions: expected one of {CONTRIBUTIONS}, got {contributions!r}.")
    if store is not None and contributions is None:
        raise ValueError("store: expected contributions='attention' or 'all' to file, got "
                         "contributions=None.")
    if store is None and not return_contributions and i_opts is None and c_opts is None:
        raise ValueError("cross_task: expected something to compute (contributions, "
                         "interference or conflicts), got none.")
    opts = Options.of(loss_fn, unit, weighting, dtype, chunk_size, memory_budget)
    by_parameter = c_opts is not None and c_opts.get("groups", "heads") == "parameters"
    needs_layout = i_opts is not None or (c_opts is not None and not by_parameter) or \
        contributions == "attention"
    lay = attention_layout(model, layout) if needs_layout else None
    slices = _layout_names(lay, include_bias) if lay is not None else []
    every = [n for n, p in model.named_parameters() if p.requires_grad]
    scored = every if by_parameter else (slices if i_opts is not None or c_opts is not None else [])
    filed = {"attention": slices, "all": every, None: []}[contributions]
    if not return_contributions and store is None:
        filed = []
    wanted = [n for n in every if n in set(scored) | set(filed)]
    with store.transaction() if store is not None else contextlib.nullcontext():
        runs = [_gradients_once(model, batch, ids, opts, wanted, scored, filed, store, task,
                                return_contributions)
                for batch, ids, task in ((batch_a, sample_ids_a, tasks[0]),
                                         (batch_b, sample_ids_b, tasks[1]))]
        (ga, ca), (gb, cb) = runs
        result = CrossTaskResult(tasks=tasks)
        if contributions is not None:
            result.contributions = {tasks[0]: ca, tasks[1]: cb}
        if i_opts is not None:
            result.interference = interference_from_units(lay, ga, gb, include_bias=include_bias,
                                                          names=slices, **i_opts)
        if c_opts is not None:
            c_opts.setdefault("groups", "heads")
            result.conflicts = conflicts_from_units(ga, gb, layout=lay, include_bias=include_bias,
                                                    **c_opts)
    return result


def _gradients_once(model, batch, sample_ids, opts: Options, wanted, scored, filed, store,
                    task, keep_contributions) -> tuple[PerUnit, PerUnit]:
    """One task's per-unit gradients: the ``scored`` parameters' signed gradients are kept
    (for the scores), the ``filed`` ones squared into contributions (filed in ``store``; kept
    if ``keep_contributions``, and then computed into one buffer per tensor; otherwise chunk
    by chunk, so that only one chunk of the unscored ones exists at a time). Returns
    ``(gradients, contributions)``.
    """
    scored, filed = set(scored), set(filed)
    if keep_contributions:  # everything is held anyway: one buffer per tensor, no per-chunk copies
        g = unit_gradients(model, batch, sample_ids, opts, wanted)
        c = {n: t.square() if n in scored else t.square_() for n, t in g.tensors.items()
             if n in filed}
        if store is not None and g.ids and c:
            store.add(task, g.ids, c)
        kept = {n: t for n, t in g.tensors.items() if n in scored}
        return (PerUnit(kept, list(g.ids), g.weights, list(g.empty_ids)),
                PerUnit(c, list(g.ids), g.weights, list(g.empty_ids)))
    grads = {n: [] for n in wanted if n in scored}
    contrib = {}
    ids, weights, empty = [], [], []
    chunks = unit_gradient_chunks(model, batch, sample_ids, opts, wanted)
    with contextlib.closing(chunks):
        for g in chunks:
            c = {}
            for n, t in g.tensors.items():
                if n in scored:
                    grads[n].append(t)
                if n in filed:  # in place unless the signed gradient is kept as well
                    c[n] = t.square() if n in scored else t.square_()
            if store is not None and g.ids and c:
                store.add(task, g.ids, c)
            for n in contrib:
                contrib[n].append(c[n])
            ids += g.ids
            weights.append(g.weights)
            empty += g.empty_ids
    w = torch.cat(weights)

    def stacked(parts: dict) -> dict:  # one chunk (the usual case) is not copied
        return {n: ts[0] if len(ts) == 1 else torch.cat(ts) for n, ts in parts.items() if ts}

    return (PerUnit(stacked(grads), list(ids), w, list(empty)),
            PerUnit(stacked(contrib), list(ids), w, list(empty)))
