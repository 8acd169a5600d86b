"""The main job's figures (matplotlib, Agg backend, PNG), drawn from a report.

Every plot reads a :class:`fishercheck.report_schema.Report` (the per-head arrays and the
conflict slices' (layer, head, block) indices), never the group names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fishercheck.outputs import replacing
from fishercheck.report_schema import BLOCKS, Report, number


def _plt():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layers_plot(results: Report, path: Path) -> None:
    """Per layer: E[g²] and (E[g])² summed over the layer's parameters, both tasks, log scale."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (task, rec) in zip(axes, results["tasks"].items(), strict=True):
        names = [r["layer"] for r in rec["per_layer"]]
        x = np.arange(len(names))
        ax.bar(x - 0.2, [r["E_g2"] for r in rec["per_layer"]], 0.4, label="E[g²] (Fisher)")
        ax.bar(x + 0.2, [r["Eg_2"] for r in rec["per_layer"]], 0.4, label="(E[g])²")
        for xi, r in zip(x, rec["per_layer"], strict=True):
            ax.text(xi, max(r["E_g2"], r["Eg_2"]), f"×{r['ratio']:.1f}", ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(x, names, rotation=20)
        ax.set_yscale("log")
        ax.set_title(f"task {task}")
    axes[0].set_ylabel("sum over the layer's parameters")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmaps(rows: list[tuple[str, np.ndarray]], path: Path, title: str, cmap: str = "viridis",
              marks: np.ndarray | None = None, symmetric: bool = False) -> None:
    """One row of four heat maps (Q, K, V, O) per ``(label, ndarray[L, H, 4])``; ``marks``
    (``bool ndarray[L, H, 4]``) draws a star on the marked cells.
    """
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 4, figsize=(11, 2.4 * len(rows) + 0.6), squeeze=False)
    for r, (label, arr) in enumerate(rows):  # arr: [L, H, 4]
        vmax = float(np.nanmax(np.abs(arr))) if symmetric else None
        for b, block in enumerate(BLOCKS):
            ax = axes[r][b]
            kw = {"vmin": -vmax, "vmax": vmax} if symmetric and vmax else {}
            im = ax.imshow(arr[:, :, b], cmap=cmap, aspect="auto", **kw)
            ax.set_title(f"{label}: {block}", fontsize=9)
            ax.set_xticks(range(arr.shape[1]))
            ax.set_yticks(range(arr.shape[0]))
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.046)
            if marks is not None:
                ys, xs = np.nonzero(marks[:, :, b])
                ax.scatter(xs, ys, marker="*", color="white", edgecolor="black", s=60)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heads_plot(results: Report, path: Path) -> None:
    """Heat maps of R(F)[l, h, B] per task."""
    rows = [(f"task {t}", _array(rec["head_fisher"])) for t, rec in results["tasks"].items()]
    _heatmaps(rows, path, "Group Fisher R(F) per head and block")


def impact_plot(results: Report, path: Path) -> None:
    """Ranks of the heads' slices under R(F) against R(S)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results["tasks"]), figsize=(9, 4))
    for ax, (task, rec) in zip(np.atleast_1d(axes), results["tasks"].items(), strict=True):
        rf = _array(rec["head_fisher"]).reshape(-1)
        rs = _array(rec["head_squared_mean"]).reshape(-1)
        ax.scatter(np.argsort(np.argsort(-rf)) + 1, np.argsort(np.argsort(-rs)) + 1, s=14)
        imp = rec["impact"]
        ax.set_title(f"task {task}: Spearman {imp['spearman']:.2f}, "
                     f"top-10% Jaccard {imp['topk_jaccard_10']:.2f}", fontsize=9)
        ax.set_xlabel("rank by R(F) = E[g²]")
        ax.set_ylabel("rank by R(S) = (E[g])²")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def interference_plot(results: Report, path: Path) -> None:
    """Heat maps of the mean interference M^B[l, h] over pairs."""
    means = results["interference"]["means"]
    arr = np.stack([_array(means[b]) for b in BLOCKS], axis=-1)
    _heatmaps([("mean M", arr)], path, "QK-OV interference of task A on task B (mean over pairs)")


def conflicts_plot(results: Report, path: Path) -> None:
    """Heat maps of the mean between-task cosine per slice; a star where q < the report's alpha."""
    L, H = results["layout"]["layers"], results["layout"]["heads"]
    alpha = results["conflicts"]["alpha"]
    cos = np.full((L, H, len(BLOCKS)), np.nan)
    sig = np.zeros((L, H, len(BLOCKS)), dtype=bool)
    for rec in results["conflicts"]["slices"]:
        idx = (rec["layer"], rec["head"], BLOCKS.index(rec["block"]))
        cos[idx] = number(rec["mean_cosine"])
        sig[idx] = number(rec["q"]) < alpha
    stars = (f"★: q < {alpha:g}" if results["conflicts"]["testable"] else
             f"no ★ possible: too few rows or permutations for q < {alpha:g}")
    _heatmaps([("mean cosine", cos)], path, f"Between-task gradient cosine per slice ({stars})",
              cmap="coolwarm", marks=sig, symmetric=True)


PLOTS = {
    "layers.png": layers_plot,
    "heads.png": heads_plot,
    "impact.png": impact_plot,
    "interference.png": interference_plot,
    "conflicts.png": conflicts_plot,
}


def _array(nested: list) -> np.ndarray:
    """A nested list of report numbers (``"nan"`` strings included) as a float array."""
    return np.array(nested, dtype=float)


def write_plots(results: Report, out: Path,
                advance: Callable[[int], object] | None = None) -> list[str]:
    """Draw every plot of :data:`PLOTS` into ``out``, each file written whole (a temporary
    name, then renamed); returns the file names written.

    Args:
        results: the report.
        out: the directory.
        advance: called with 1 after each plot (a progress bar), or None.
    """
    written = []
    for name, fn in PLOTS.items():
        with replacing(out / name) as tmp:
            fn(results, tmp)
        written.append(name)
        if advance is not None:
            advance(1)
    return written
