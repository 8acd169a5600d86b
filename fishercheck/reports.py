"""The main job's report files: report.json (everything) and report.md (the summary).

Both are rendered from a :class:`fishercheck.report_schema.Report`, validated against the
schema before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from fishercheck.memory_plan import human
from fishercheck.outputs import write_text
from fishercheck.report_schema import BLOCKS, Conflicts, Report, number, to_json, validate


def json_text(results: Report) -> str:
    """``report.json``'s text: the results made JSON-safe and checked against the schema.

    Raises:
        ValueError: the results do not fit the schema (a bug in the main job).
    """
    data = to_json(results)
    validate(data)
    return json.dumps(data, indent=1) + "\n"


def write_json(results: Report, path: Path) -> None:
    """Write ``report.json`` whole (see :func:`json_text`); nothing is written if it fails."""
    write_text(path, json_text(results))


def _fmt(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def _top_heads(arr: list, k: int = 6) -> list[tuple[str, float]]:
    """The ``k`` largest entries of a ``[L][H][4]`` head array, named ``L{l}.H{h}.{B}``."""
    flat = [(f"L{layer}.H{h}.{block}", arr[layer][h][b]) for layer in range(len(arr))
            for h in range(len(arr[layer])) for b, block in enumerate(BLOCKS)]
    return sorted(flat, key=lambda t: -t[1])[:k]


def _weights_note(meta: dict) -> str:
    """What the report's model line adds about its weights (nothing when all loaded)."""
    if meta["weights"] == "random":
        return " — **randomly initialised weights**: the numbers describe an untrained model"
    note = ""
    if meta["missing_tensors"]:
        note += (f" — **partially loaded**: {len(meta['missing_tensors'])} of the model's tensors "
                 f"were not in the checkpoint and are randomly initialised: "
                 f"{', '.join(meta['missing_tensors'])}")
    if meta["unexpected_tensors"]:
        note += (f" — {len(meta['unexpected_tensors'])} tensors of the checkpoint are not in the "
                 f"model and were ignored: {', '.join(meta['unexpected_tensors'])}")
    return note


SHOWN_SLICES = 12  # rows of the significant-conflicts table in report.md
_MODES = {"memory": "task A's contributions kept in memory",
          "store": "task A's contributions in --store",
          "recompute": "task A's contributions computed again for each scoring block (they "
                       "would not fit the budget)"}


def _store_note(results: Report) -> str:
    """What a run took from ``--store`` (nothing without one)."""
    store = results.get("store")
    if store is None:
        return ""
    r = store["reused"]
    done = [f"{r[k]} rows of {what}" for k, what in (
        ("moments_A_rows", "task A's moments"), ("moments_B_rows", "task B's moments"),
        ("contributions_A_rows", "task A's contributions")) if r.get(k)]
    done += [f"{r['interference_blocks']} scoring blocks"] if r.get("interference_blocks") else []
    done += [step for step in ("conflicts", "check") if r.get(step) is True]
    return (f"; resumed from {store['path']}: " + ", ".join(done)) if done else \
        f"; saved to {store['path']} as it went"


def markdown(results: Report) -> str:
    """``report.md``: the summary tables of a report, with links to its plots."""
    meta = results["meta"]
    lines = ["# fishercheck report", "", f"- model: {meta['model']}" + _weights_note(meta)]
    for task in ("A", "B"):
        rows, asked = meta["rows"][task], meta["samples"]
        fewer = (f" — **{rows} of the {asked} rows asked for** (--samples): the file has no more"
                 if rows < asked else "")
        lines.append(f"- task {task}: {meta[f'task_{task.lower()}']} "
                     f"({results['tasks'][task]['n_units']} samples){fewer}")
    memory = results["settings"]["memory"]
    lines += [f"- computed with fisher_fast ({results['settings']['dtype']}), unit = sample, "
              f"{results['settings']['loss']}; attention: {results['layout']}",
              f"- memory: {_MODES[memory['mode']]}, in chunks of {memory['chunk_rows']} rows and "
              f"scoring blocks of {memory['block_rows']} rows of task B, within a budget of "
              f"{human(memory['budget_bytes'])}" + _store_note(results), "",
             "## E[g²] (empirical Fisher) against (E[g])² per layer", "",
             "The ratio is how much the square of the mean gradient underestimates the Fisher.", "",
             "| task | layer | E[g²] | (E[g])² | ratio |", "|---|---|---|---|---|"]
    for task, rec in results["tasks"].items():
        for r in rec["per_layer"]:
            lines.append(f"| {task} | {r['layer']} | {_fmt(r['E_g2'])} | {_fmt(r['Eg_2'])} | "
                         f"{_fmt(r['ratio'])} |")
    lines += ["", "## Impact of the estimator on head rankings (R(F) against R(S))", "",
              "| task | Spearman | Kendall | top-10% Jaccard | top-20% Jaccard "
              "| pruning-mask Jaccard (50%) |",
              "|---|---|---|---|---|---|"]
    for task, rec in results["tasks"].items():
        i = rec["impact"]
        lines.append(f"| {task} | {_fmt(i['spearman'])} | {_fmt(i['kendall'])} | "
                     f"{_fmt(i['topk_jaccard_10'])} | {_fmt(i['topk_jaccard_20'])} | "
                     f"{_fmt(i['pruning_mask_jaccard'])} |")
    lines += ["", "## Heads with the largest group Fisher R(F)", ""]
    for task, rec in results["tasks"].items():
        tops = ", ".join(f"{g} ({_fmt(v)})" for g, v in _top_heads(rec["head_fisher"]))
        lines.append(f"- task {task}: {tops}")
    lines += ["", "## QK-OV interference of task A on task B", "", "Largest pairs:", "",
              "| score | task-A id | task-B id | layer | head | block |", "|---|---|---|---|---|---|"]
    for t in results["interference"]["top"][:8]:
        lines.append(f"| {_fmt(t['score'])} | {t['id_a']} | {t['id_b']} | {t['layer']} | "
                     f"{t['head']} | {t['block']} |")
    lines += ["", "## Per-head conflicts (permutation test, BH q-values)", ""]
    lines += _conflicts_section(results["conflicts"], results["settings"]["n_permutations"])
    if "check" in results:
        ck = results["check"]
        lines += ["", "## Check against fisher_ref (the float64 oracle)", "",
                  f"On the first {ck['rows_per_task']} rows of each task; largest difference "
                  f"relative to the largest oracle value:", ""]
        for k, v in ck.items():
            if k != "rows_per_task":
                lines.append(f"- {k}: {_fmt(v)}")
    lines += ["", "## Plots", ""] + [f"- ![{p}]({p})" for p in meta["plots"]]
    t = results["timings"]
    lines += ["", "Timings: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), ""]
    return "\n".join(lines)


def _conflicts_section(conf: Conflicts, n_permutations: int) -> list[str]:
    """The conflicts' hypothesis in words, then what the test can say and the slices it flags.

    Untestable sizes (too few rows or permutations for any p below ``alpha``) are said
    instead of a table of p = 1-like values.
    """
    alpha = conf["alpha"]
    lines = [f"Tested for each slice: {conf['hypothesis']}", ""]
    if not conf["testable"]:
        return lines + [f"**Not testable with these sizes**: {conf['note']} Per-slice p- and "
                        f"q-values are therefore not shown (report.json keeps them, with "
                        f"`conflicts.testable` false)."]
    slices = conf["slices"]
    sig = sorted([c for c in slices if number(c["q"]) < alpha], key=lambda c: number(c["mean_cosine"]))
    below = sum(number(c["interval"][1]) < 0 for c in sig)
    above = sum(number(c["interval"][0]) > 0 for c in sig)
    lines += [f"{len(sig)} of {len(slices)} slices have q < {alpha:g} ({n_permutations} "
              f"permutations; the smallest attainable p is {conf['min_attainable_p']:.3g}): on "
              f"these the two tasks' gradients differ. A conflict — gradients pointing against "
              f"each other — is a 95% interval of the mean cosine below 0: {below} of them; "
              f"{len(sig) - below - above} have an interval containing 0 (they differ, with no "
              f"conflict shown) and {above} one above 0."
              + (f" The {SHOWN_SLICES} most negative mean cosines are listed (all in "
                 f"report.json)." if len(sig) > SHOWN_SLICES else "")]
    if sig:
        lines += ["", "| slice | mean cosine | q | 95% interval of the mean cosine | p | effect (z) |",
                  "|---|---|---|---|---|---|"]
        for c in sig[:SHOWN_SLICES]:
            lines.append(f"| {c['group']} | {_fmt(c['mean_cosine'])} | {_fmt(c['q'])} | "
                         f"[{_fmt(c['interval'][0])}, {_fmt(c['interval'][1])}] | "
                         f"{_fmt(c['p'])} | {_fmt(c['effect'])} |")
    return lines


def write_markdown(results: Report, path: Path) -> None:
    """Write ``report.md`` whole (see :func:`markdown`)."""
    write_text(path, markdown(results))
