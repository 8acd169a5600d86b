r"""The main job: what the diagonal Fisher says about a model on two tasks, with fisher_fast.

For each task (SPEC §1–§3, sample units, mean per-row loss):

- per layer, :math:`\sum_p F_p` (E[g²], the empirical Fisher) against
  :math:`\sum_p S_p` ((E[g])², the squared mean gradient) and their ratio — how far the
  "square of the batch gradient" shortcut is from the Fisher;
- per attention head and block, the group Fisher :math:`R(F)[l,h,B] = \sum_{p\in I(l,h,B)} F_p`
  (and :math:`R(S)`);
- the impact of the estimator (SPEC §9): Spearman, Kendall and top-k Jaccard between R(F)
  and R(S) over the heads' slices.

Across tasks: QK-OV interference (SPEC §6, per-(l, h) means and the top pairs) of every row of
task A on every row of task B, and per-head conflicts (SPEC §7: mean between-task cosine,
permutation p, BH q) on the first ``n_pairs`` rows of each. ``check=True`` recomputes a subset
with fisher_ref, the float64 oracle, and reports the largest relative differences.
:func:`run` returns a :class:`fishercheck.report_schema.Report` (without ``meta``, which the
CLI adds).

The long steps run in the fixed chunks and scoring blocks of a memory plan
(:mod:`fishercheck.memory_plan`), and with a :class:`fishercheck.run_store.RunStore` resume
from what it holds (:mod:`fishercheck.long_steps`); the interference is scored a tile at a
time (:mod:`fishercheck.interference_blocks`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

import fisher_fast
from fisher_fast.attention.slicing import block_params, per_head_sum
from fisher_ref.impact import estimator_impact
from fishercheck import long_steps, memory_plan
from fishercheck.interference_blocks import slice_names
from fishercheck.progress import OFF, Progress
from fishercheck.report_schema import BLOCKS, LAYER_EMBEDDINGS, LAYER_FINAL
from fishercheck.run_store import RunStore

Batch = dict  # HF-style: input_ids / attention_mask / labels Tensor[batch, pos], sample_ids


def rows(batch: Batch, n: int) -> Batch:
    """The first ``n`` rows of a batch (every tensor and the ``sample_ids`` list)."""
    return {k: v[:n] for k, v in batch.items()}


def parameter_blocks(model: torch.nn.Module, layout: fisher_fast.AttentionLayout) -> dict[str, int]:
    """The block of the model each parameter belongs to, read from the module tree.

    A transformer layer is the child of an ``nn.ModuleList`` that holds the layer's attention
    module (``layout.layers[l].module``); parameters before the first layer (in
    ``named_parameters()`` order) are the embeddings, those after the last are the final
    norm and head.

    Returns:
        ``{parameter name: b}`` with ``b = -1`` (embeddings), ``l`` (layer l in ``[0, L)``)
        or ``L`` (final norm / head); see :func:`block_label`.

    Raises:
        ValueError: an attention module that is not inside a list of layers.
    """
    modules = dict(model.named_modules())
    prefixes = {}
    for la in layout.layers:
        parts = la.module.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if isinstance(modules.get(".".join(parts[:i])), torch.nn.ModuleList):
                prefixes[".".join(parts[:i + 1]) + "."] = la.index
                break
        else:
            raise ValueError(f"main job: expected the attention module {la.module!r} inside a list "
                             f"of layers (torch.nn.ModuleList), got none above it.")
    n_layers, out, seen_layer = len(layout.layers), {}, False
    for name, _ in model.named_parameters():
        layer = next((i for p, i in prefixes.items() if name.startswith(p)), None)
        seen_layer |= layer is not None
        out[name] = layer if layer is not None else (n_layers if seen_layer else -1)
    return out


def block_label(b: int, n_layers: int) -> str:
    """``"embeddings"`` for -1, ``"layer {b}"`` for a layer, ``"final/head"`` for ``n_layers``."""
    if b < 0:
        return LAYER_EMBEDDINGS
    return LAYER_FINAL if b >= n_layers else f"layer {b}"


def moments(model: torch.nn.Module, batch: Batch, *, chunk_rows: int, dtype: torch.dtype,
            advance: Callable[[int], object] | None = None) -> tuple[dict, dict, int]:
    """F and S streamed through one ``FisherAccumulator`` in blocks of ``chunk_rows`` rows.

    Args:
        model: the model.
        batch: one task's rows.
        chunk_rows: rows per ``update``.
        dtype: fisher_fast's accumulation dtype.
        advance: called with the number of rows after each block (a progress bar), or None.

    Returns:
        ``(F, S, n_units)``: ``{name: Tensor[*param_shape]}`` twice, and the units counted.
    """
    acc = fisher_fast.FisherAccumulator(model, dtype=dtype)
    n = batch["input_ids"].shape[0]
    for start in range(0, n, chunk_rows):
        acc.update({k: v[start:start + chunk_rows] for k, v in batch.items()})
        if advance is not None:
            advance(min(chunk_rows, n - start))
    return acc.empirical_fisher(), acc.squared_mean_gradient(), acc.n_units()


def per_layer(F: dict, S: dict, blocks: dict[str, int], n_layers: int) -> list[dict]:
    """ΣF, ΣS and ΣF / ΣS per block of the model (see :func:`parameter_blocks`).

    Args:
        F: E[g²], ``{name: Tensor[*param_shape]}``.
        S: (E[g])², ``{name: Tensor[*param_shape]}``.
        blocks: ``{name: block}`` from :func:`parameter_blocks`.
        n_layers: L.

    Returns:
        ``[{"layer", "E_g2", "Eg_2", "ratio"}]`` in model order (embeddings, layers, final);
        the ratio is ``inf`` where ΣS is 0.
    """
    sums: dict[int, list[float]] = {}
    for name in (n for n in blocks if n in F):  # model order, whatever the dict order of F
        s = sums.setdefault(blocks[name], [0.0, 0.0])
        s[0] += float(F[name].double().sum())
        s[1] += float(S[name].double().sum())
    return [{"layer": block_label(b, n_layers), "E_g2": f, "Eg_2": s,
             "ratio": f / s if s > 0 else float("inf")} for b, (f, s) in sorted(sums.items())]


def head_groups(values: dict, layout: fisher_fast.AttentionLayout) -> np.ndarray:
    r"""``ndarray[L, H, 4]``: R(x)[l, h, B], the sum of ``x`` over each weight slice I(l, h, B).

    One ``per_head_sum`` per (layer, block), in float64; K and V of query heads that share
    a kv head hold that kv head's sum.

    .. math:: R(x)[l, h, B] = \sum_{p \in I(l, h, B)} x_p

    Args:
        values: ``{name: Tensor[*param_shape]}`` holding every attention weight.
        layout: the model's attention layout.
    """
    L, H = len(layout.layers), layout.layers[0].num_heads
    out = np.zeros((L, H, len(BLOCKS)))
    for la in layout.layers:
        for b, block in enumerate(BLOCKS):
            weights = {n: values[n].double() for n, _ in block_params(la, block)}
            out[la.index, :, b] = per_head_sum(weights, la, block).cpu().numpy()
    return out


def interference_summary(result: fisher_fast.InterferenceResult, top: int = 10) -> dict:
    """``{"means": {block: [L][H]}, "top": [the ``top`` largest entries]}`` (report schema)."""
    return {"means": {b: result.means[b].double().cpu().numpy().tolist() for b in BLOCKS},
            "top": [dict(rec, score=float(rec["score"])) for rec in result.top_k[:top]]}


ALPHA = 0.05  # the q-value threshold of the report's conflicts


def conflicts_summary(result: fisher_fast.ConflictResult, layout: fisher_fast.AttentionLayout,
                      alpha: float = ALPHA) -> dict:
    """The conflicts' hypothesis, whether it can be rejected at ``alpha``, and every slice.

    Returns:
        ``{"hypothesis", "alpha", "fdr", "min_attainable_p", "testable", "note", "slices"}``
        (:class:`fishercheck.report_schema.Conflicts`); ``slices`` has one record per
        (l, h, B), in layer, head, block order: ``{"group", "layer", "head", "block",
        "mean_cosine", "p", "q", "effect", "interval"}``.
    """
    min_p = float(result.min_attainable_p)
    testable = min_p < alpha
    note = "" if testable else untestable_note(len(result.ids_a), len(result.ids_b),
                                               result.n_permutations, alpha)
    return {"hypothesis": result.hypothesis, "alpha": alpha, "fdr": result.fdr,
            "min_attainable_p": min_p, "testable": testable, "note": note,
            "slices": _slices(result, layout)}


def untestable_note(n_a: int, n_b: int, n_permutations: int, alpha: float) -> str:
    """Why no p-value of the permutation test can fall below ``alpha`` (empty if one can).

    Args:
        n_a: task A's rows.
        n_b: task B's rows.
        n_permutations: P.
        alpha: the threshold.
    """
    reasons = []
    if 1.0 / (n_permutations + 1) >= alpha:
        reasons.append(f"{n_permutations} permutations cannot give a p-value below "
                       f"1/(P + 1) = {1.0 / (n_permutations + 1):.3g} (use --permutations "
                       f"{math.ceil(1.0 / alpha)} or more)")
    m, labellings = (2 if n_a == n_b else 1), math.comb(n_a + n_b, n_a)
    if m / labellings >= alpha:
        splits = f" ({labellings // 2} distinct splits: each is tied with its mirror image)" \
            if m == 2 else ""
        reasons.append(f"{n_a} + {n_b} rows have only C({n_a + n_b}, {n_a}) = {labellings} "
                       f"labellings{splits}, so the exact test's smallest p-value is "
                       f"{m / labellings:.3g} (use --pairs {_rows_needed(alpha)} or more)")
    if not reasons:
        return ""
    return (f"no slice can reach q < {alpha:g} whatever the gradients: " + "; ".join(reasons)
            + ".")


def _rows_needed(alpha: float) -> int:
    """The fewest rows per task (N_A = N_B = n) whose exact test can give p < alpha."""
    n = 1
    while 2 / math.comb(2 * n, n) >= alpha:
        n += 1
    return n


def _slices(result: fisher_fast.ConflictResult, layout: fisher_fast.AttentionLayout) -> list[dict]:
    """One record per slice (l, h, B), in layer, head, block order, with its indices."""
    out = []
    for la in layout.layers:
        for h in range(la.num_heads):
            for block in BLOCKS:
                group = f"L{la.index}.H{h}.{block}"  # fisher_fast's key of the slice
                rec = result[group]
                out.append({"group": group, "layer": la.index, "head": h, "block": block,
                            "mean_cosine": float(rec["mean_cosine"]), "p": float(rec["p"]),
                            "q": float(rec["q"]), "effect": float(rec["effect"]),
                            "interval": [float(x) for x in rec["interval"]]})
    return out


# a parameter whose values are all below this fraction of the largest value of any parameter
# (or all 0) is scaled by that largest value instead of by its own: float32 cannot resolve
# such values relative to themselves (a BERT key bias has a Fisher of 0 in exact
# arithmetic: ~1e-42 in the oracle, float32 rounding ~1e-25 in fisher_fast)
FLOOR = 1e-6


def relative_difference(fast_values: dict, ref_values: dict) -> float:
    """Max over parameters of max|fast - ref| / max|ref| (normwise, so small entries do not
    explode); a parameter whose max|ref| is below FLOOR times the largest of all parameters
    (or 0) is scaled by that largest value.

    Args:
        fast_values: ``{name: tensor-like}``, fisher_fast's values.
        ref_values: ``{name: tensor-like}``, the oracle's, with the same keys and shapes.
    """
    ref = {k: torch.as_tensor(v).double().cpu() for k, v in ref_values.items()}
    overall = max((float(r.abs().max()) for r in ref.values() if r.numel()), default=0.0)
    worst = 0.0
    for k, r in ref.items():
        f = torch.as_tensor(fast_values[k]).double().cpu()
        scale = float(r.abs().max()) if r.numel() else 0.0
        scale = scale if scale >= FLOOR * overall and scale > 0 else overall
        if scale > 0:
            worst = max(worst, float((f - r).abs().max()) / scale)
    return worst


def oracle_check(model: torch.nn.Module, batch_a: Batch, batch_b: Batch, *, n: int,
                 n_permutations: int, seed: int, dtype: torch.dtype) -> dict:
    """Recompute F, S, interference and conflict p-values on n rows per task with fisher_ref.

    Returns:
        ``{"rows_per_task", "empirical_fisher", "squared_mean_gradient", "interference",
        "conflict_p_max_abs_difference"}`` (see :func:`relative_difference`).
    """
    import copy

    import fisher_ref
    from fisher_ref.conflicts import conflicts as ref_conflicts
    from fisher_ref.interference import interference as ref_interference

    a, b = rows(batch_a, n), rows(batch_b, n)
    n = min(n, a["input_ids"].shape[0], b["input_ids"].shape[0])  # what was actually used
    # the oracle runs on a CPU copy (float64, one unit at a time); fisher_fast where it ran
    cpu = next(model.parameters()).device.type == "cpu"
    ref_model = model if cpu else copy.deepcopy(model).cpu()
    ra, rb = ({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
              for x in (a, b))
    out = {"rows_per_task": n}
    fa, sa, _ = moments(model, a, chunk_rows=n, dtype=dtype)
    out["empirical_fisher"] = relative_difference(fa, fisher_ref.empirical_fisher(ref_model, ra))
    out["squared_mean_gradient"] = relative_difference(
        sa, fisher_ref.squared_mean_gradient(ref_model, ra))
    fi = fisher_fast.interference(model, a, b, dtype=dtype)
    ri = ref_interference(ref_model, ra, rb)
    out["interference"] = relative_difference(dict(fi), dict(ri))
    fc = fisher_fast.conflicts(model, a, b, n_permutations=n_permutations, seed=seed,
                               n_bootstrap=100, dtype=dtype)
    rc = ref_conflicts(ref_model, ra, rb, n_permutations=n_permutations, seed=seed,
                       n_bootstrap=100)
    shared = [g for g in rc if g in fc]
    out["conflict_p_max_abs_difference"] = max(
        (abs(float(fc[g]["p"]) - float(rc[g]["p"])) for g in shared), default=float("nan"))
    return out


STEPS = {"moments A": "task A: E[g²] and (E[g])²", "moments B": "task B: E[g²] and (E[g])²",
         "contributions": "task A: contributions", "interference": "interference",
         "conflicts": "conflicts", "check": "check against fisher_ref"}


def steps(check: bool, mode: str = "memory") -> list[str]:
    """The names of :func:`run`'s steps (one progress step each).

    Args:
        check: whether the oracle check runs.
        mode: the memory plan's mode: task A's contributions are a step of their own unless
            they are computed again for each scoring block (``"recompute"``).
    """
    keys = ["moments A", "moments B"] + (["contributions"] if mode != "recompute" else []) \
        + ["interference", "conflicts"] + (["check"] if check else [])
    return [STEPS[k] for k in keys]


def plan_sizes(model: torch.nn.Module, layout: fisher_fast.AttentionLayout, units_a: Batch,
               units_b: Batch, n_pairs: int, n_permutations: int,
               dtype: torch.dtype) -> memory_plan.Sizes:
    """What :func:`fishercheck.memory_plan.make_plan` needs to know of this job."""
    params = {id(p): p for p in model.parameters()}
    itemsize = torch.finfo(dtype).bits // 8
    attention = sum(dict(model.named_parameters())[n].numel() for n in slice_names(layout))
    la = layout.layers[0]
    distinct = sum(x.num_heads * 2 + x.num_kv_heads * 2 for x in layout.layers)
    return memory_plan.Sizes(
        n_params=sum(p.numel() for p in params.values()), unit_bytes=attention * itemsize,
        itemsize=itemsize, row_bytes=memory_plan.row_bytes(model, units_a["input_ids"].shape[1]),
        rows_a=long_steps.n_rows(units_a), rows_b=long_steps.n_rows(units_b),
        pairs_a=min(n_pairs, long_steps.n_rows(units_a)),
        pairs_b=min(n_pairs, long_steps.n_rows(units_b)), layers=len(layout.layers),
        heads=la.num_heads, slices=distinct, permutations=n_permutations)


def default_plan(model: torch.nn.Module, batch_a: Batch, batch_b: Batch, *, n_pairs: int,
                 n_permutations: int, dtype: torch.dtype, chunk_rows: int,
                 budget: int | None = None, store: bool = False) -> memory_plan.Plan:
    """The memory plan of a job (unbounded when ``budget`` is None: memory mode, one block)."""
    layout = fisher_fast.attention_layout(model)
    sizes = plan_sizes(model, layout, long_steps.units_of(batch_a), long_steps.units_of(batch_b),
                       n_pairs, n_permutations, dtype)
    return memory_plan.make_plan(sizes, budget if budget is not None else 2**62, store=store,
                                 chunk_rows=chunk_rows)


def _check_heads(layout: fisher_fast.AttentionLayout) -> None:
    heads = sorted({la.num_heads for la in layout.layers})
    if len(heads) != 1:
        raise ValueError(f"main job: expected the same number of attention heads in every "
                         f"layer, got {heads}.")


def run(model: torch.nn.Module, batch_a: Batch, batch_b: Batch, *, n_pairs: int = 32,
        n_permutations: int = 1000, seed: int = 0, check: bool = False, check_rows: int = 8,
        dtype: torch.dtype = torch.float32, chunk_rows: int = 32, progress: Progress = OFF,
        plan: memory_plan.Plan | None = None, store: RunStore | None = None,
        checkpoint_interval: float = 60.0) -> dict:
    """Every quantity of the main job, as plain Python data (see the module docstring).

    E[g²] and (E[g])² and the interference of task A on task B use every row of the batches;
    the conflicts' permutation test the first ``n_pairs`` rows of each.

    Args:
        model: a causal LM in eval mode.
        batch_a: task A's rows.
        batch_b: task B's rows.
        n_pairs: rows per task for the conflicts' test.
        n_permutations: permutations of the conflicts' test.
        seed: their seed.
        check: recompute ``check_rows`` rows per task with fisher_ref.
        check_rows: rows per task for ``check``.
        dtype: fisher_fast's accumulation dtype.
        chunk_rows: rows per chunk when no ``plan`` is given.
        progress: where to report each of :func:`steps` (and the rows of the long ones).
        plan: the memory plan (:mod:`fishercheck.memory_plan`); default: unbounded, with
            chunks of ``chunk_rows``.
        store: a ``--store`` to resume from and save to (mode ``"store"`` plans only).
        checkpoint_interval: seconds between saves of an accumulator to ``store``.

    Returns:
        The report (:class:`fishercheck.report_schema.Report`) without ``meta``; with a
        store, ``store`` says what was resumed from it.
    """
    layout = fisher_fast.attention_layout(model)
    _check_heads(layout)
    batch_a, batch_b = (b if "sample_ids" in b else {**b, "sample_ids": list(range(
        b["input_ids"].shape[0]))} for b in (batch_a, batch_b))  # fisher_fast's default ids
    if plan is None:
        plan = default_plan(model, batch_a, batch_b, n_pairs=n_pairs,
                            n_permutations=n_permutations, dtype=dtype, chunk_rows=chunk_rows)
    if (plan.mode == "store") != (store is not None):
        raise ValueError(f"main job: expected a store exactly with a plan of mode 'store', got "
                         f"mode {plan.mode!r} and store={store!r}.")
    timings, results, reused = {}, {"tasks": {}}, {}
    blocks, n_layers = parameter_blocks(model, layout), len(layout.layers)
    t0 = time.perf_counter()
    fhat = {}
    for task, batch in (("A", batch_a), ("B", batch_b)):
        with progress.step(STEPS[f"moments {task}"], rows=long_steps.n_rows(batch)) as advance:
            acc, reused[f"moments_{task}_rows"] = long_steps.task_moments(
                model, batch, task, chunk_rows=plan.chunk_rows, dtype=dtype, advance=advance,
                store=store, interval=checkpoint_interval)
            F, S = acc.empirical_fisher(task), acc.squared_mean_gradient(task)
            RF, RS = head_groups(F, layout), head_groups(S, layout)
        results["tasks"][task] = {
            "n_units": acc.n_units(task), "per_layer": per_layer(F, S, blocks, n_layers),
            "head_fisher": RF.tolist(), "head_squared_mean": RS.tolist(),
            "impact": estimator_impact(RF.reshape(-1), RS.reshape(-1)),
        }
        if task == "A":
            fhat = {n: F[n] for n in slice_names(layout)}
        del acc, F, S
    timings["moments_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["interference"] = _interference(model, batch_a, batch_b, fhat, layout, plan, dtype,
                                            store, progress, reused)
    timings["interference_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    a, b = rows(batch_a, n_pairs), rows(batch_b, n_pairs)
    pairs_used = {"A": int(a["input_ids"].shape[0]), "B": int(b["input_ids"].shape[0])}
    with progress.step(STEPS["conflicts"]):
        def conflicts() -> dict:
            conf = fisher_fast.conflicts(model, a, b, groups="heads",
                                         n_permutations=n_permutations, seed=seed, dtype=dtype)
            return conflicts_summary(conf, layout)

        results["conflicts"] = _saved_step(store, "conflicts", conflicts, reused)
    timings["conflicts_s"] = time.perf_counter() - t0
    if check:
        t0 = time.perf_counter()
        with progress.step(STEPS["check"]):
            results["check"] = _saved_step(store, "check", lambda: oracle_check(
                model, batch_a, batch_b, n=check_rows, n_permutations=min(n_permutations, 200),
                seed=seed, dtype=dtype), reused)
        timings["check_s"] = time.perf_counter() - t0
    results["layout"] = {"layers": n_layers, "heads": layout.layers[0].num_heads,
                         "kv_heads": layout.layers[0].num_kv_heads,
                         "head_dim": layout.layers[0].head_dim, "kind": layout.kind}
    results["settings"] = {"pairs_per_task": pairs_used,
                           "interference_units": {
                               t: long_steps.n_rows(long_steps.units_of(x))
                               for t, x in (("A", batch_a), ("B", batch_b))},
                           "n_permutations": n_permutations, "seed": seed,
                           "dtype": str(dtype).replace("torch.", ""), "unit": "sample",
                           "loss": "causal LM, mean over each row's tokens",
                           "memory": plan.describe()}
    results["timings"] = timings
    if store is not None:
        results["store"] = {"path": str(store.path), "reused": reused}
    return results


def _saved_step(store: RunStore | None, name: str, compute: Callable[[], dict],
                reused: dict) -> dict:
    """A step's result from ``store`` if it finished there before, else computed (and saved)."""
    saved = store.result(name) if store is not None else None
    reused[name] = saved is not None
    if saved is None:
        saved = compute()
        if store is not None:
            store.save_result(name, saved)
    return saved


def _interference(model: torch.nn.Module, batch_a: Batch, batch_b: Batch, fhat: dict,
                  layout: fisher_fast.AttentionLayout, plan: memory_plan.Plan,
                  dtype: torch.dtype, store: RunStore | None, progress: Progress,
                  reused: dict) -> dict:
    """Task A's contributions (kept, filed in the store, or not at all) and the interference."""
    units_a, units_b = long_steps.units_of(batch_a), long_steps.units_of(batch_b)
    names, c = list(fhat), plan.chunk_rows
    kept = contributions = None
    if plan.mode != "recompute":
        with progress.step(STEPS["contributions"], rows=long_steps.n_rows(units_a)) as advance:
            if store is not None:
                contributions = store.contributions(next(model.parameters()).device)
                reused["contributions_A_rows"] = long_steps.file_contributions(
                    model, units_a, names, store=contributions, chunk_rows=c, dtype=dtype,
                    advance=advance)
            else:
                kept = long_steps.kept_contributions(model, units_a, names, chunk_rows=c,
                                                     dtype=dtype, advance=advance)
    pairs = long_steps.n_rows(units_a) * long_steps.n_rows(units_b)
    with progress.step(STEPS["interference"], rows=pairs, unit="pair") as advance:
        summary, reused["interference_blocks"] = long_steps.interference(
            model, units_a, units_b, fhat, layout, plan, dtype=dtype, kept=kept,
            contributions=contributions, store=store, advance=advance)
    return summary
