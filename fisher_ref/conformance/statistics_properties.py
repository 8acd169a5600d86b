r"""The named properties for conflict p-values (SPEC §7) and FDR q-values.

``pvalues_agreement`` compares p-values with the oracle's for the same permutation stream
(``PCG64(seed)``, ``.permutation`` in order), up to ties. ``pvalues_direction`` needs no
shared stream: it builds two tasks whose answer is certain whatever the permutations,

- *conflict*: task A is one row repeated 4 times, task B another row repeated 4 times
  (fresh ids). With unit vectors :math:`u \ne v` and :math:`k` copies of :math:`u` in
  pseudo-task A, the mean between-task cosine is
  :math:`[2k(4-k) + (k^2 + (4-k)^2)\cos(u, v)] / 16 \ge \cos(u, v)`, with equality only for
  the task split itself (k = 4) and its mirror (k = 0): the observed statistic is the
  smallest, and a one-sided p is at the floor but for the few permutations that reproduce
  the split (probability 2/70 each);
- *alignment*: task B repeats task A's 6 rows (fresh ids). With :math:`a` the sum of pseudo
  task A's unit vectors and :math:`t = 2s` the total, the statistic is
  :math:`a \cdot (t - a) / 36 \le |s|^2 / 36`, the observed value: it is the largest, so the
  one-sided p is 1 but for rounding ties (at most 64 of the 924 splits tie exactly).

A test in the wrong tail, or a two-sided test, gives a large p for the conflict or a small p
for the alignment: p <= 1/2 is required of the groups where the oracle's p is small in the
conflict, p >= 1/2 of those where it is large in the alignment.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st

from fisher_ref.conformance.adapter import provided
from fisher_ref.conformance.builtin_adapters import has_attention, ref
from fisher_ref.conformance.cases import (
    DataSpec,
    build_case_model,
    case_loss,
    data_specs,
    describe_model,
    family_of,
    tiny_configs,
)
from fisher_ref.conformance.engine import Context, PropertyResult, not_provided, run_property
from fisher_ref.testing.tolerances import tolerance

N_PERMUTATIONS = 19  # small: p-values live on the grid k / 20
CALIBRATION_REPEATS = 8
CALIBRATION_MEAN = (0.2, 0.8)  # mean of null p-values; ~3 sd of 8 repeats around 1/2
DIRECTION_SPLIT = 0.5  # a one-sided p on the certain side is far from 1/2
ORACLE_SMALL, ORACLE_LARGE = 0.3, 0.7  # groups whose oracle p says the construction worked


def _pvalues(adapter, model, a: DataSpec, b: DataSpec, seed: int, config,
             n_permutations: int = N_PERMUTATIONS) -> dict:
    loss = case_loss(config)
    result = adapter.conflict_pvalues(model, [a.batch()], [b.batch()], loss_fn=loss,
                                      n_permutations=n_permutations, seed=seed)
    if not hasattr(result, "items") or not result:
        raise AssertionError(f"conflict_pvalues: expected a non-empty dict group -> p, got {result!r}")
    return {str(g): float(p) for g, p in result.items()}


def oracle_conflicts(model, config, a: DataSpec, b: DataSpec, seed: int,
                     n_permutations: int = N_PERMUTATIONS) -> dict:
    """fisher_ref's conflicts of two tasks grouped by parameter and, where the model has an
    attention layout, by QK-OV slice: ``{group: (p, observed, null)}``.
    """
    out = {}
    groupings = ("parameters", "heads") if has_attention(model) else ("parameters",)
    for groups in groupings:
        result = ref("conflicts")(model, a.batch(), b.batch(), loss_fn=case_loss(config),
                                  groups=groups, n_permutations=n_permutations, seed=seed,
                                  n_bootstrap=1)
        for g, rec in result.items():
            out[str(g)] = (float(rec["p"]), float(rec["mean_cosine"]), np.asarray(result.nulls[g]))
    return out


@st.composite
def _distinct_tasks(draw, ctx: Context, archs=None):
    config = draw(tiny_configs(archs or ctx.archs, max_layers=1))
    a = draw(data_specs(config, dtype=ctx.dtype, min_rows=2, max_rows=4, tokens="low", allow_empty=False))
    b = draw(data_specs(config, dtype=ctx.dtype, min_rows=2, max_rows=4, tokens="high", allow_empty=False,
                        id_offset=100))
    return config, a, b, draw(st.integers(0, 3))


def _cover_tasks(ctx: Context):
    return lambda arch: _distinct_tasks(ctx, archs=(arch,)) if arch in ctx.archs else None


def _describe_tasks(example) -> str:
    config, a, b, seed = example
    return (f"{describe_model(config)}; task A {a.describe()}; task B {b.describe()}; "
            f"n_permutations={N_PERMUTATIONS}, seed={seed}")


def pvalues_positive(adapter, ctx: Context) -> PropertyResult:
    """Permutation p-values are never 0: p >= 1 / (P + 1) and p <= 1, even when the tasks
    differ so much that no permutation reaches the observed statistic.
    """
    name, needs = "pvalues_positive", ("conflict_pvalues",)
    if needs[0] not in provided(adapter):
        return not_provided(name, needs)

    def body(example):
        config, a, b, seed = example
        ps = _pvalues(adapter, build_case_model(config, ctx.dtype), a, b, seed, config)
        floor = 1.0 / (N_PERMUTATIONS + 1)
        bad = {g: p for g, p in ps.items() if not (floor - 1e-12 <= p <= 1.0) or math.isnan(p)}
        if bad:
            model = build_case_model(config, ctx.dtype)
            raise PValueMismatch(f"with P = {N_PERMUTATIONS} permutations p must lie in "
                                 f"[1/(P+1), 1] = [{floor:.4g}, 1]; got {bad}", ps,
                                 oracle_conflicts(model, config, a, b, seed))

    return run_property(name, needs, _distinct_tasks(ctx), body, _describe_tasks, ctx,
                        cover=_cover_tasks(ctx), diagnose=_diagnose_p)


def pvalues_calibrated(adapter, ctx: Context) -> PropertyResult:
    """Under the null (both tasks' rows drawn from one distribution) p-values are not
    piled up at 0 or 1: over 8 repeats, their mean lies in [0.2, 0.8].
    """
    name, needs = "pvalues_calibrated", ("conflict_pvalues",)
    if needs[0] not in provided(adapter):
        return not_provided(name, needs)

    def body(example):
        config, base = example
        model = build_case_model(config, ctx.dtype)
        ps, first = [], None
        for r in range(CALIBRATION_REPEATS):
            a = _spec(config, ctx.dtype, seed=base + 2 * r, batch_size=4)
            b = _spec(config, ctx.dtype, seed=base + 2 * r + 1, batch_size=4, id_offset=100)
            got = _pvalues(adapter, model, a, b, r, config)
            first = first or (got, a, b, r)
            ps += list(got.values())
        mean = float(np.mean(ps))
        lo, hi = CALIBRATION_MEAN
        if not lo <= mean <= hi:
            got, a, b, r = first
            raise PValueMismatch(f"null p-values over {CALIBRATION_REPEATS} repeats "
                                 f"({len(ps)} values) have mean {mean:.3f}, outside [{lo}, {hi}]; "
                                 f"fraction at 1: {np.mean(np.array(ps) >= 1.0):.2f}, "
                                 f"at the floor: {np.mean(np.array(ps) <= 1 / (N_PERMUTATIONS + 1)):.2f}"
                                 f" (diagnosed on the first repeat)", got,
                                 oracle_conflicts(model, config, a, b, r))

    strategy = st.tuples(tiny_configs(ctx.archs, max_layers=1), st.integers(0, 2**16))
    def describe(e):
        return (f"{describe_model(e[0])}; for r < {CALIBRATION_REPEATS}: task A "
                f"DataSpec(seed={e[1]} + 2r, batch_size=4), task B "
                f"DataSpec(seed={e[1]} + 2r + 1, batch_size=4), "
                f"n_permutations={N_PERMUTATIONS}, seed=r")

    return run_property(name, needs, strategy, body, describe, ctx,
                        max_examples=max(1, ctx.max_examples // 3),
                        cover=lambda arch: st.tuples(tiny_configs((arch,), max_layers=1),
                                                     st.integers(0, 2**16)),
                        diagnose=_diagnose_p)


def _spec(config, dtype=torch.float64, **kwargs) -> DataSpec:
    """A ``DataSpec`` of ``config``'s family (causal-LM rows of 5 tokens; classifier inputs
    in ``dtype``).
    """
    if family_of(config) == "classifier":
        kwargs.update(family="classifier", input_shape=config.input_shape,
                      num_classes=config.num_classes,
                      input_dtype=str(dtype).removeprefix("torch."))
    else:
        kwargs.setdefault("seq_len", 5)
    return DataSpec(**kwargs)


def _tie_allowance(observed: float, null: np.ndarray, atol: float) -> int:
    """How many permuted statistics lie within ``atol`` of the observed one (ties that
    another summation order may count on either side).
    """
    return int(np.sum(np.abs(null - observed) <= atol))


PVALUE_FORMULAS = {
    "the SPEC's one-sided p (1 + #{null <= obs}) / (P + 1)":
        lambda obs, null, tie: (1 + np.sum(null <= obs + tie)) / (len(null) + 1),
    "the upper tail (1 + #{null >= obs}) / (P + 1): the wrong tail":
        lambda obs, null, tie: (1 + np.sum(null >= obs - tie)) / (len(null) + 1),
    "a two-sided p (1 + #{|null - mean| >= |obs - mean|}) / (P + 1)":
        lambda obs, null, tie: (1 + np.sum(np.abs(null - null.mean())
                                           >= np.abs(obs - null.mean()) - tie)) / (len(null) + 1),
    "#{null <= obs} / P (no +1: p can be 0)":
        lambda obs, null, tie: np.sum(null <= obs + tie) / len(null),
    "the strict (1 + #{null < obs}) / (P + 1) (ties not counted)":
        lambda obs, null, tie: (1 + np.sum(null < obs - tie)) / (len(null) + 1),
    "p = 1 for every group: the permuted statistic never moves (the permutation is not applied)":
        lambda obs, null, tie: 1.0,
}


def diagnose_pvalues(got: dict, oracle: dict, atol: float | None = None) -> str:
    """Which p-value formula, applied to the oracle's observed and null statistics, gives
    the adapter's p-values (the share of groups it matches, up to ties within ``atol``).
    """
    atol = tolerance("pvalue-tie")[1] if atol is None else atol
    groups = [g for g in got if g in oracle]
    if not groups:
        return "no diagnosis (no group name in common with fisher_ref's)"
    scores = []
    for label, formula in PVALUE_FORMULAS.items():
        hits = 0
        for g in groups:
            _, obs, null = oracle[g]
            slack = (_tie_allowance(obs, null, atol) + 1e-9) / len(null)  # (+1 or not)
            want = float(formula(obs, null, atol))
            hits += abs(got[g] - want) <= slack
        scores.append((hits, label))
    hits, label = max(scores, key=lambda t: t[0])
    if hits == 0:
        return "no known p-value formula fits these p-values"
    return f"matches {label} on {hits}/{len(groups)} groups"


FLOAT32_RESOLUTION = 1e-4  # a group's gradients below this share of the largest: rounding


def resolved_groups(model, config, a: DataSpec, b: DataSpec) -> set:
    """The groups whose largest unit gradient is at least ``FLOAT32_RESOLUTION`` of the
    largest over all groups (oracle): the others' cosines are float32 rounding noise.
    """
    from fisher_ref.conflicts import head_groups, parameter_groups

    loss = case_loss(config)
    grads = {}
    for batch in (a.batch(), b.batch()):
        for n, g in ref("per_sample_gradients")(model, batch, loss_fn=loss).tensors.items():
            grads[n] = torch.cat([grads[n], g]) if n in grads else g
    defs = parameter_groups(grads)
    if has_attention(model):
        defs |= head_groups(ref("attention_layout")(model), {n: g.shape[1:] for n, g in grads.items()})
    norms = {}
    for name, group in defs.items():
        cols = [grads[n].flatten(1) if m is None else grads[n][:, m] for n, m in group.items()]
        norms[name] = float(torch.cat(cols, dim=1).norm(dim=1).max())
    top = max(norms.values())
    return {g for g, v in norms.items() if v >= FLOAT32_RESOLUTION * top}


class PValueMismatch(AssertionError):
    """p-values differ; ``got`` and ``oracle`` (group -> (p, obs, null)) for the diagnosis."""

    def __init__(self, message: str, got: dict, oracle: dict):
        super().__init__(message)
        self.got, self.oracle = got, oracle


def _diagnose_p(example, exc):
    return diagnose_pvalues(exc.got, exc.oracle) if isinstance(exc, PValueMismatch) else None


def pvalues_agreement(adapter, ctx: Context) -> PropertyResult:
    """p-values equal fisher_ref's for the same permutation stream (``PCG64(seed)``,
    ``.permutation`` in order), up to ties: a permuted statistic within ``pvalue-tie`` of
    the observed one may be counted on either side. Groups are matched by name (parameter
    names, or fisher_ref's ``"L{l}.H{h}.{B}"``); an adapter sharing no group name fails.
    """
    name, needs = "pvalues_agreement", ("conflict_pvalues",)
    if needs[0] not in provided(adapter):
        return not_provided(name, needs)
    atol = tolerance("pvalue-tie", ctx.dtype)[1]

    def body(example):
        config, a, b, seed = example
        model = build_case_model(config, ctx.dtype)
        got = _pvalues(adapter, model, a, b, seed, config)
        oracle = ctx.memo(("conflicts", config, a, b, seed),
                          lambda: oracle_conflicts(model, config, a, b, seed))
        common = [g for g in got if g in oracle]
        if ctx.dtype != torch.float64:  # groups at float32's rounding level decide nothing
            resolved = ctx.memo(("resolved", config, a, b),
                                lambda: resolved_groups(model, config, a, b))
            common = [g for g in common if g in resolved]
        if not common:
            raise AssertionError(f"conflict_pvalues: expected groups named by parameter or by "
                                 f"QK-OV slice as fisher_ref names them (e.g. "
                                 f"{sorted(oracle)[:3]}), got {sorted(got)[:6]}")
        bad = []
        for g in common:
            p, obs, null = oracle[g]
            slack = (_tie_allowance(obs, null, atol) + 1e-9) / (len(null) + 1)
            if abs(got[g] - p) > slack:
                bad.append(f"{g}: got {got[g]:.4g}, expected {p:.4g} (ties allow ±{slack:.3g})")
        if bad:
            raise PValueMismatch(f"{len(bad)}/{len(common)} p-values differ from fisher_ref's on the "
                                 f"same permutation stream:\n  " + "\n  ".join(bad[:6]), got, oracle)

    return run_property(name, needs, _distinct_tasks(ctx), body, _describe_tasks, ctx,
                        cover=_cover_tasks(ctx), diagnose=_diagnose_p)


def _direction_specs(config, seed: int, dtype=torch.float64) -> dict:
    """The conflict and alignment tasks of ``pvalues_direction`` (see the module docstring)."""
    one_a = _spec(config, dtype, seed=seed, batch_size=4, repeat=4)
    # task B of the conflict: another row (of another seed), repeated
    one_b = _spec(config, dtype, seed=seed + 1, batch_size=4, repeat=4, id_offset=100)
    six = _spec(config, dtype, seed=seed, batch_size=6)
    return {"conflict": (one_a, one_b), "alignment": (six, _same_rows(six))}


def _same_rows(spec: DataSpec) -> DataSpec:
    """The same rows with fresh ids (offset 100)."""
    from dataclasses import replace

    return replace(spec, id_offset=100)


def pvalues_direction(adapter, ctx: Context) -> PropertyResult:
    """One-sided in the right tail, with any permutation stream: on a task pair whose
    statistic is the smallest possible (a certain conflict) p <= 1/2, and on one whose
    statistic is the largest possible (a certain alignment) p >= 1/2, for every group
    where fisher_ref's p shows the construction (module docstring). A test in the wrong
    tail, or a two-sided test, fails one of the two.
    """
    name, needs = "pvalues_direction", ("conflict_pvalues",)
    if needs[0] not in provided(adapter):
        return not_provided(name, needs)

    def body(example):
        config, seed = example
        model = build_case_model(config, ctx.dtype)
        specs = _direction_specs(config, seed, ctx.dtype)
        problems, got_all, oracle_all = [], {}, {}
        for case, want_small in (("conflict", True), ("alignment", False)):
            a, b = specs[case]
            oracle = ctx.memo(("direction", case, config, seed),
                              lambda a=a, b=b: oracle_conflicts(model, config, a, b, 0))
            got = _pvalues(adapter, model, a, b, 0, config)
            sure = [g for g, (p, _, _) in oracle.items()
                    if (p <= ORACLE_SMALL if want_small else p >= ORACLE_LARGE)]
            if not sure:
                continue  # e.g. no group differs between the two rows: nothing to decide
            for g in sure:
                if g in got and ((got[g] > DIRECTION_SPLIT) if want_small else (got[g] < DIRECTION_SPLIT)):
                    problems.append(f"{case}: {g} p = {got[g]:.3g}, expected "
                                    f"{'<=' if want_small else '>='} {DIRECTION_SPLIT}")
            got_all.update({f"{case}:{g}": p for g, p in got.items()})
            oracle_all.update({f"{case}:{g}": v for g, v in oracle.items()})
            unnamed = [g for g in got if g not in oracle]
            if unnamed and not any(g in got for g in sure):
                # groups of its own: decide on all of them
                bad = [g for g in unnamed if (got[g] > DIRECTION_SPLIT if want_small
                                              else got[g] < DIRECTION_SPLIT)]
                if len(bad) == len(unnamed):
                    problems.append(f"{case}: every p on the wrong side of {DIRECTION_SPLIT} "
                                    f"({bad[:3]} ...)")
        if problems:
            raise PValueMismatch("p-values on the wrong side (wrong tail or two-sided test):\n  "
                                 + "\n  ".join(problems[:6]), got_all, oracle_all)

    strategy = st.tuples(tiny_configs(ctx.archs, max_layers=1), st.integers(0, 2**8))
    return run_property(
        name, needs, strategy, body,
        lambda e: (f"{describe_model(e[0])}; conflict: task A = row of DataSpec(seed={e[1]}) x 4, "
                   f"task B = row of DataSpec(seed={e[1] + 1}) x 4; alignment: task A = "
                   f"DataSpec(seed={e[1]}, batch_size=6), task B = the same rows (fresh ids); "
                   f"n_permutations={N_PERMUTATIONS}, seed=0"),
        ctx, max_examples=max(1, ctx.max_examples // 3),
        cover=lambda arch: st.tuples(tiny_configs((arch,), max_layers=1), st.integers(0, 2**8)),
        diagnose=_diagnose_p)


_P_GRID = [1e-6, 1e-4, 0.001, 0.01, 0.02, 0.03, 0.04, 0.05, 0.2, 0.5, 0.9, 1.0]
_pvalue_lists = st.lists(st.sampled_from(_P_GRID) | st.floats(1e-8, 1.0), min_size=1, max_size=20)


def qvalues_statsmodels(adapter, ctx: Context) -> PropertyResult:
    """BH (and BY, when supported) q-values equal statsmodels ``multipletests``."""
    name, needs = "qvalues_statsmodels", ("fdr_qvalues",)
    if needs[0] not in provided(adapter):
        return not_provided(name, needs)
    from statsmodels.stats.multitest import multipletests

    rtol, atol = tolerance("fdr-any-implementation")

    def body(ps):
        for method, sm in (("bh", "fdr_bh"), ("by", "fdr_by")):
            try:
                got = np.asarray(adapter.fdr_qvalues(list(ps), method=method), dtype=float)
            except (NotImplementedError, TypeError):
                if method == "by":
                    continue  # BY is optional
                raise
            want = multipletests(np.asarray(ps), method=sm)[1]
            if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=atol):
                exc = QValueMismatch(f"{method} q-values for p = {list(ps)}: expected (statsmodels "
                                     f"{sm}) {want.tolist()}, got {got.tolist()}")
                exc.got = got
                raise exc

    return run_property(name, needs, _pvalue_lists, body, lambda ps: f"p = {list(ps)}", ctx,
                        max_examples=max(20, ctx.max_examples * 4), diagnose=_diagnose_q)


class QValueMismatch(AssertionError):
    """q-values differ from statsmodels'."""


def qvalue_candidates(ps) -> dict:
    """Known q-value formulas (and classic mistakes) for p-values ``ps``."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(ps, dtype=float)
    m = len(p)
    ranks = np.argsort(np.argsort(p)) + 1
    return {"BH (statsmodels fdr_bh)": multipletests(p, method="fdr_bh")[1],
            "BY (statsmodels fdr_by)": multipletests(p, method="fdr_by")[1],
            "p * m / rank without the step-up minimum": np.minimum(p * m / ranks, 1.0),
            "Bonferroni p * m": np.minimum(p * m, 1.0),
            "the p-values themselves": p}


def _diagnose_q(ps, exc):
    if not isinstance(exc, QValueMismatch):
        return None
    method = "by" if str(exc).startswith("by") else "bh"
    got = np.asarray(exc.got if hasattr(exc, "got") else [], dtype=float)
    if got.size == 0:
        return None
    rtol, atol = tolerance("fdr-any-implementation")
    for label, q in qvalue_candidates(ps).items():
        if q.shape == got.shape and np.allclose(got, q, rtol=rtol, atol=atol):
            return f"matches {label} (asked for {method.upper()})"
    return "no known q-value formula fits"
