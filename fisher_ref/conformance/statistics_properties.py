"""The named properties for conflict p-values (SPEC §7) and FDR q-values."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

from fisher_ref.conformance.adapter import provided
from fisher_ref.conformance.cases import DataSpec, build_case_model, data_specs, describe_model, tiny_configs
from fisher_ref.conformance.engine import Context, PropertyResult, not_provided, run_property
from fisher_ref.losses import causal_lm_loss
from fisher_ref.testing.tolerances import tolerance

N_PERMUTATIONS = 19  # small: p-values live on the grid k / 20
CALIBRATION_REPEATS = 8
CALIBRATION_MEAN = (0.2, 0.8)  # mean of null p-values; ~3 sd of 8 repeats around 1/2


def _pvalues(adapter, model, a: DataSpec, b: DataSpec, seed: int) -> dict:
    result = adapter.conflict_pvalues(model, [a.batch()], [b.batch()], loss_fn=causal_lm_loss,
                                      n_permutations=N_PERMUTATIONS, seed=seed)
    if not hasattr(result, "items") or not result:
        raise AssertionError(f"conflict_pvalues: expected a non-empty dict group -> p, got {result!r}")
    return {str(g): float(p) for g, p in result.items()}


@st.composite
def _distinct_tasks(draw, ctx: Context):
    config = draw(tiny_configs(ctx.archs, max_layers=1))
    a = draw(data_specs(min_rows=2, max_rows=4, tokens="low", allow_empty=False))
    b = draw(data_specs(min_rows=2, max_rows=4, tokens="high", allow_empty=False, id_offset=100))
    return config, a, b, draw(st.integers(0, 3))


def pvalues_positive(adapter, ctx: Context) -> PropertyResult:
    """Permutation p-values are never 0: p >= 1 / (P + 1) and p <= 1, even when the tasks
    differ so much that no permutation reaches the observed statistic.
    """
    name, needs = "pvalues_positive", ("conflict_pvalues",)
    if needs[0] not in provided(adapter):
        return not_provided(name, needs)

    def body(example):
        config, a, b, seed = example
        ps = _pvalues(adapter, build_case_model(config, ctx.dtype), a, b, seed)
        floor = 1.0 / (N_PERMUTATIONS + 1)
        bad = {g: p for g, p in ps.items() if not (floor - 1e-12 <= p <= 1.0) or math.isnan(p)}
        if bad:
            raise AssertionError(f"with P = {N_PERMUTATIONS} permutations p must lie in "
                                 f"[1/(P+1), 1] = [{floor:.4g}, 1]; got {bad}")

    def describe(example):
        config, a, b, seed = example
        return (f"{describe_model(config)}; task A {a.describe()}; task B {b.describe()}; "
                f"n_permutations={N_PERMUTATIONS}, seed={seed}")

    return run_property(name, needs, _distinct_tasks(ctx), body, describe, ctx)


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
        ps = []
        for r in range(CALIBRATION_REPEATS):
            a = DataSpec(seed=base + 2 * r, batch_size=4, seq_len=5)
            b = DataSpec(seed=base + 2 * r + 1, batch_size=4, seq_len=5, id_offset=100)
            ps += list(_pvalues(adapter, model, a, b, seed=r).values())
        mean = float(np.mean(ps))
        lo, hi = CALIBRATION_MEAN
        if not lo <= mean <= hi:
            raise AssertionError(f"null p-values over {CALIBRATION_REPEATS} repeats "
                                 f"({len(ps)} values) have mean {mean:.3f}, outside [{lo}, {hi}]; "
                                 f"fraction at 1: {np.mean(np.array(ps) >= 1.0):.2f}, "
                                 f"at the floor: {np.mean(np.array(ps) <= 1 / (N_PERMUTATIONS + 1)):.2f}")

    strategy = st.tuples(tiny_configs(ctx.archs, max_layers=1), st.integers(0, 2**16))
    return run_property(name, needs, strategy, body,
                        lambda e: f"{describe_model(e[0])}; for r < {CALIBRATION_REPEATS}: task A "
                                  f"DataSpec(seed={e[1]} + 2r, batch_size=4, seq_len=5), task B "
                                  f"DataSpec(seed={e[1]} + 2r + 1, batch_size=4, seq_len=5), "
                                  f"n_permutations={N_PERMUTATIONS}, seed=r", ctx,
                        max_examples=max(1, ctx.max_examples // 3))


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
                raise AssertionError(f"{method} q-values for p = {list(ps)}: expected (statsmodels "
                                     f"{sm}) {want.tolist()}, got {got.tolist()}")

    return run_property(name, needs, _pvalue_lists, body, lambda ps: f"p = {list(ps)}", ctx,
                        max_examples=max(20, ctx.max_examples * 4))
