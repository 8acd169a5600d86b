r"""The main job: what the diagonal Fisher says about a model on two tasks, with fisher_fast.

For each task (SPEC §1–§3, sample units, mean per-row loss):

- per layer, :math:`\sum_p F_p` (E[g²], the empirical Fisher) against
  :math:`\sum_p S_p` ((E[g])², the squared mean gradient) and their ratio — how far the
  "square of the batch gradient" shortcut is from the Fisher;
- per attention head and block, the group Fisher :math:`R(F)[l,h,B] = \sum_{p\in I(l,h,B)} F_p`
  (and :math:`R(S)`);
- the impact of the estimator (SPEC §9): Spearman, Kendall and top-k Jaccard between R(F)
  and R(S) over the heads' slices.

Across tasks: QK-OV interference (SPEC §6, per-(l, h) means and the top pairs) and per-head
conflicts (SPEC §7: mean between-task cosine, permutation p, BH q). ``check=True``
recomputes a subset with fisher_ref, the float64 oracle, and reports the largest relative
differences.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch

import fisher_fast
from fisher_ref.impact import estimator_impact

BLOCKS = ("Q", "K", "V", "O")
_LAYER = re.compile(r"\.(?:h|layers|layer|blocks)\.(\d+)\.")


def layer_of(name: str) -> str:
    """"layer l" for a transformer block's parameter, else "embeddings" or "head/final"."""
    m = _LAYER.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    return "embeddings" if re.search(r"wte|wpe|embed", name) else "final/head"


def rows(batch: dict, n: int) -> dict:
    """The first n rows of a batch."""
    return {k: v[:n] for k, v in batch.items()}


def moments(model, batch: dict, *, chunk_rows: int, dtype) -> tuple[dict, dict, int]:
    """F and S streamed through a FisherAccumulator in blocks of ``chunk_rows`` rows."""
    acc = fisher_fast.FisherAccumulator(model, dtype=dtype)
    n = batch["input_ids"].shape[0]
    for start in range(0, n, chunk_rows):
        acc.update({k: v[start:start + chunk_rows] for k, v in batch.items()})
    return acc.empirical_fisher(), acc.squared_mean_gradient(), acc.n_units()


def per_layer(F: dict, S: dict) -> list[dict]:
    out: dict[str, dict] = {}
    for name in F:
        rec = out.setdefault(layer_of(name), {"layer": layer_of(name), "E_g2": 0.0, "Eg_2": 0.0})
        rec["E_g2"] += float(F[name].double().sum())
        rec["Eg_2"] += float(S[name].double().sum())
    for rec in out.values():
        rec["ratio"] = rec["E_g2"] / rec["Eg_2"] if rec["Eg_2"] > 0 else float("inf")
    order = lambda r: (r["layer"] != "embeddings", r["layer"] == "final/head",  # noqa: E731
                       int(r["layer"].split()[-1]) if r["layer"].startswith("layer") else 0)
    return sorted(out.values(), key=order)


def head_groups(model, F: dict, layout) -> np.ndarray:
    """R(F)[l, h, B] over the weight slices I(l, h, B)."""
    L, H = len(layout.layers), layout.layers[0].num_heads
    out = np.zeros((L, H, len(BLOCKS)))
    for la in layout.layers:
        for h in range(la.num_heads):
            for b, block in enumerate(BLOCKS):
                masks = fisher_fast.qkov_mask(model, la.index, h, block)
                out[la.index, h, b] = sum(float(F[n].double()[m.to(F[n].device)].sum())
                                          for n, m in masks.items())
    return out


def interference_summary(result, top: int = 10) -> dict:
    return {"means": {b: result.means[b].double().cpu().numpy().tolist() for b in BLOCKS},
            "top": [dict(rec, score=float(rec["score"])) for rec in result.top_k[:top]]}


def conflicts_summary(result) -> list[dict]:
    out = []
    for group, rec in result.items():
        out.append({"group": group, "mean_cosine": float(rec["mean_cosine"]), "p": float(rec["p"]),
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


def oracle_check(model, batch_a: dict, batch_b: dict, *, n: int, n_permutations: int, seed: int,
                 dtype) -> dict:
    """Recompute F, S, interference and conflict p-values on n rows per task with fisher_ref."""
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


def run(model, batch_a: dict, batch_b: dict, *, n_pairs: int = 32, n_permutations: int = 1000,
        seed: int = 0, check: bool = False, check_rows: int = 8, dtype=torch.float32,
        chunk_rows: int = 32) -> dict:
    """Every quantity of the main job, as plain Python data (see the module docstring)."""
    timings, results = {}, {"tasks": {}}
    layout = fisher_fast.attention_layout(model)
    t0 = time.perf_counter()
    groups = {}
    for task, batch in (("A", batch_a), ("B", batch_b)):
        F, S, units = moments(model, batch, chunk_rows=chunk_rows, dtype=dtype)
        RF, RS = head_groups(model, F, layout), head_groups(model, S, layout)
        groups[task] = (RF, RS)
        results["tasks"][task] = {
            "n_units": units, "per_layer": per_layer(F, S),
            "head_fisher": RF.tolist(), "head_squared_mean": RS.tolist(),
            "impact": estimator_impact(RF.reshape(-1), RS.reshape(-1)),
        }
    timings["moments_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    a, b = rows(batch_a, n_pairs), rows(batch_b, n_pairs)
    pairs_used = {"A": int(a["input_ids"].shape[0]), "B": int(b["input_ids"].shape[0])}
    results["interference"] = interference_summary(fisher_fast.interference(model, a, b, dtype=dtype))
    timings["interference_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    conf = fisher_fast.conflicts(model, a, b, groups="heads", n_permutations=n_permutations, seed=seed,
                             dtype=dtype)
    results["conflicts"] = conflicts_summary(conf)
    timings["conflicts_s"] = time.perf_counter() - t0
    if check:
        t0 = time.perf_counter()
        results["check"] = oracle_check(model, batch_a, batch_b, n=check_rows,
                                        n_permutations=min(n_permutations, 200), seed=seed,
                                        dtype=dtype)
        timings["check_s"] = time.perf_counter() - t0
    results["layout"] = {"layers": len(layout.layers), "heads": layout.layers[0].num_heads,
                         "kv_heads": layout.layers[0].num_kv_heads,
                         "head_dim": layout.layers[0].head_dim, "kind": layout.kind}
    results["settings"] = {"pairs_per_task": pairs_used, "n_permutations": n_permutations,
                           "seed": seed, "dtype": str(dtype).replace("torch.", ""),
                           "unit": "sample", "loss": "causal LM, mean over each row's tokens"}
    results["timings"] = timings
    return results
