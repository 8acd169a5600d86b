"""The main job's long steps, chunked as the memory plan says and resumable from ``--store``.

Every step processes its rows in the plan's fixed chunks (``c`` rows) and blocks (``b`` rows
of task B), from the first row, whatever was done before: a resumed run therefore makes the
same floating-point operations in the same order as an uninterrupted one and gives the same
numbers, bit for bit. With a :class:`fishercheck.run_store.RunStore`:

- :func:`task_moments` saves the accumulator after a chunk whenever ``interval`` seconds have
  passed since the last save (and after the last chunk), and starts from the latest save;
- :func:`file_contributions` files each chunk of task A's contributions in the store, one
  transaction per chunk, skipping the rows whose sample ids the store already has;
- :func:`interference` saves each finished scoring block and skips the saved ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import fisher_fast
from fishercheck.interference_blocks import Scores, inverse_fisher, score_tile, task_b_views
from fishercheck.interrupts import deferred
from fishercheck.memory_plan import Plan
from fishercheck.run_store import RunStore

Batch = dict  # HF-style: input_ids / attention_mask / labels Tensor[batch, pos], sample_ids
Advance = Callable[[int], object]
TASK_A = "A"  # the contribution store's task of task A's contributions


def _none(n: int) -> None:
    return None


def rows_of(batch: Batch, index: slice | list[int]) -> Batch:
    """The rows ``index`` of a batch (every tensor and the ``sample_ids`` list)."""
    if isinstance(index, slice):
        return {k: v[index] for k, v in batch.items()}
    out = {k: v[index] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["sample_ids"] = [batch["sample_ids"][i] for i in index]
    return out


def units_of(batch: Batch) -> Batch:
    """The rows with a label to predict (the causal-LM loss's units; SPEC §0: empty rows,
    whose labels after the shift are all -100, are no unit).
    """
    keep = (batch["labels"][:, 1:] != -100).any(dim=1)
    return rows_of(batch, keep.nonzero().flatten().tolist())


def n_rows(batch: Batch) -> int:
    """Rows of a batch."""
    return int(batch["input_ids"].shape[0])


def task_moments(model: torch.nn.Module, batch: Batch, task: str, *, chunk_rows: int,
                 dtype: torch.dtype, advance: Advance = _none, store: RunStore | None = None,
                 interval: float = 60.0) -> tuple[fisher_fast.FisherAccumulator, int]:
    """F and S of one task streamed through a ``FisherAccumulator``, ``chunk_rows`` at a time.

    Args:
        model: the model.
        batch: the task's rows.
        task: ``"A"`` or ``"B"`` (the accumulator's task and the saved state's name).
        chunk_rows: rows per update (and per forward: the accumulator's ``chunk_size``).
        dtype: the accumulation dtype.
        advance: called with the rows of each chunk done (a progress bar).
        store: where to save and resume the state, or None.
        interval: seconds between saves (0: after every chunk).

    Returns:
        ``(accumulator, rows resumed from the store)``.
    """
    acc = fisher_fast.FisherAccumulator(model, dtype=dtype, chunk_size=chunk_rows)
    n = n_rows(batch)
    done = store.load_moments(acc, task) if store is not None else 0
    if done > n or (done % chunk_rows and done != n):
        raise ValueError(f"--store: expected a saved state of task {task} after a whole number "
                         f"of {chunk_rows}-row chunks of its {n} rows, got one after {done} rows.")
    advance(done)
    last = time.monotonic()
    for start in range(done, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        acc.update(rows_of(batch, slice(start, stop)), task=task)
        if store is not None and (stop == n or time.monotonic() - last >= interval):
            store.save_moments(acc, task, stop)
            last = time.monotonic()
        advance(stop - start)
    return acc, done


def file_contributions(model: torch.nn.Module, units: Batch, names: list[str], *,
                       store: fisher_fast.ContributionStore, chunk_rows: int,
                       dtype: torch.dtype, advance: Advance = _none) -> int:
    """Task A's contributions C_A of ``names``, filed in ``store`` a chunk at a time.

    Rows whose sample ids the store already holds are skipped. Returns how many were.
    """
    skipped, n = 0, n_rows(units)
    for start in range(0, n, chunk_rows):
        chunk = rows_of(units, slice(start, min(start + chunk_rows, n)))
        missing = [k for k, sid in enumerate(chunk["sample_ids"])
                   if not store.contains(TASK_A, sid)]
        skipped += n_rows(chunk) - len(missing)
        if missing:
            part = chunk if len(missing) == n_rows(chunk) else rows_of(chunk, missing)
            with deferred():  # a signal mid-commit must not roll back a committed chunk
                fisher_fast.per_sample_contributions(model, part, store=store, task=TASK_A,
                                                     return_tensors=False, params=names,
                                                     chunk_size=chunk_rows, dtype=dtype)
        advance(n_rows(chunk))
    return skipped


def kept_contributions(model: torch.nn.Module, units: Batch, names: list[str], *,
                       chunk_rows: int, dtype: torch.dtype,
                       advance: Advance = _none) -> list[dict]:
    """Task A's contributions C_A of ``names``, one dict per chunk, kept in memory."""
    out, n = [], n_rows(units)
    for start in range(0, n, chunk_rows):
        chunk = rows_of(units, slice(start, min(start + chunk_rows, n)))
        out.append(chunk_contributions(model, chunk, names, chunk_rows, dtype))
        advance(n_rows(chunk))
    return out


def chunk_contributions(model: torch.nn.Module, chunk: Batch, names: list[str],
                        chunk_rows: int, dtype: torch.dtype) -> dict:
    """``{name: Tensor[rows, *param_shape]}``: C_u = g_u² of one chunk's rows."""
    return fisher_fast.per_sample_contributions(model, chunk, params=names,
                                                chunk_size=chunk_rows, dtype=dtype).tensors


def interference(model: torch.nn.Module, units_a: Batch, units_b: Batch, fhat: dict,
                 layout: fisher_fast.AttentionLayout, plan: Plan, *, dtype: torch.dtype,
                 kept: list[dict] | None = None,
                 contributions: fisher_fast.ContributionStore | None = None,
                 store: RunStore | None = None, advance: Advance = _none) -> tuple[dict, int]:
    """The report's interference of task A on task B, scored a tile at a time.

    Task A's contributions come from ``kept`` (memory mode), from ``contributions`` (store
    mode) or are computed again for every block of B (recompute mode: neither given).

    Args:
        model: the model.
        units_a: task A's non-empty rows.
        units_b: task B's non-empty rows.
        fhat: F̂, task A's empirical Fisher of the attention weights.
        layout: the attention layout.
        plan: the chunks (A) and blocks (B).
        dtype: the gradients' dtype.
        kept: C_A by chunk (memory mode).
        contributions: the store holding C_A (store mode).
        store: where finished blocks are saved and found, or None.
        advance: called with the pairs (i, j) of each tile scored.

    Returns:
        ``({"means", "top"}, blocks resumed from the store)``.
    """
    c, b = plan.chunk_rows, plan.block_rows
    names = list(fhat)
    ids_a, ids_b = list(units_a["sample_ids"]), list(units_b["sample_ids"])
    n_a, n_b = len(ids_a), len(ids_b)
    device = next(iter(fhat.values())).device
    inv = inverse_fisher(fhat, layout)
    total = Scores(layout.num_layers, layout.layers[0].num_heads)
    resumed = 0
    for j, j0 in enumerate(range(0, n_b, b)):
        j1 = min(j0 + b, n_b)
        saved = store.block(j) if store is not None else None
        if saved is not None:
            total.merge(Scores.from_data(saved))
            resumed += 1
            advance(n_a * (j1 - j0))
            continue
        gb = fisher_fast.per_sample_gradients(model, rows_of(units_b, slice(j0, j1)),
                                              params=names, chunk_size=c, dtype=dtype)
        views = task_b_views(gb.tensors, layout)
        del gb
        block = Scores(layout.num_layers, layout.layers[0].num_heads)
        for k, i0 in enumerate(range(0, n_a, c)):
            i1 = min(i0 + c, n_a)
            if kept is not None:
                ca = kept[k]
            elif contributions is not None:
                ca = contributions.get_stacked(TASK_A, ids_a[i0:i1], device=device)
            else:
                ca = chunk_contributions(model, rows_of(units_a, slice(i0, i1)), names, c, dtype)
            block.add(score_tile(ca, inv, views, layout), i0, j0)
            del ca
            advance((i1 - i0) * (j1 - j0))
        if store is not None:
            store.save_block(j, {"rows_b": [j0, j1], **block.to_data()})
        total.merge(block)
    return total.summary(ids_a, ids_b), resumed
