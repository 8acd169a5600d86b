"""The main job's report files: report.json (everything) and report.md (the summary).

Both are rendered from a :class:`fishercheck.report_schema.Report`, validated against the
schema before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from fishercheck.report_schema import BLOCKS, Report, to_json, validate


def json_text(results: Report) -> str:
    """``report.json``'s text: the results made JSON-safe and checked against the schema.

    Raises:
        ValueError: the results do not fit the schema (a bug in the main job).
    """
    data = to_json(results)
    validate(data)
    return json.dumps(data, indent=1) + "\n"


def write_json(results: Report, path: Path) -> None:
    """Write ``report.json`` (see :func:`json_text`)."""
    path.write_text(json_text(results))


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


def markdown(results: Report) -> str:
    """``report.md``: the summary tables of a report, with links to its plots."""
    meta = results["meta"]
    lines = ["# fishercheck report", "", f"- model: {meta['model']}" + _weights_note(meta),
             f"- task A: {meta['task_a']} ({results['tasks']['A']['n_units']} samples)",
             f"- task B: {meta['task_b']} ({results['tasks']['B']['n_units']} samples)",
             f"- computed with fisher_fast ({results['settings']['dtype']}), unit = sample, "
             f"{results['settings']['loss']}; attention: {results['layout']}", "",
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
    conf = results["conflicts"]
    sig = sorted([c for c in conf if c["q"] < 0.05], key=lambda c: c["mean_cosine"])
    lines += ["", "## Per-head conflicts (permutation test, BH q-values)", "",
              f"{len(sig)} of {len(conf)} slices have q < 0.05 "
              f"({results['settings']['n_permutations']} permutations)"
              + (f"; the {SHOWN_SLICES} most negative mean cosines are listed (all in "
                 f"report.json)." if len(sig) > SHOWN_SLICES else "."), ""]
    if sig:
        lines += ["| slice | mean cosine | p | q | effect | 95% interval |", "|---|---|---|---|---|---|"]
        for c in sig[:SHOWN_SLICES]:
            lines.append(f"| {c['group']} | {_fmt(c['mean_cosine'])} | {_fmt(c['p'])} | "
                         f"{_fmt(c['q'])} | {_fmt(c['effect'])} | "
                         f"[{_fmt(c['interval'][0])}, {_fmt(c['interval'][1])}] |")
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


def write_markdown(results: Report, path: Path) -> None:
    """Write ``report.md`` (see :func:`markdown`)."""
    path.write_text(markdown(results))
