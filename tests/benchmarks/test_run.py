"""The benchmark runner's plumbing on tiny shapes: workloads, cross-checks, tables.

No timings are asserted; the peers are optional and may be missing.
"""

import json

import pytest
import torch

from benchmarks import measure, run, workloads
from benchmarks.methods import METHODS


# ids without "gpu": the conftest skips any test whose keywords contain it
@pytest.mark.parametrize("name", ["cpu", "gpu"], ids=["cpu-suite", "device-suite"])
def test_every_workload_names_known_methods_and_is_unique(name):
    suite = workloads.suite(name, quick=True)
    assert len({w.name for w in suite}) == len(suite)
    for w in suite:
        assert w.kind in workloads.KINDS
        assert all(m in METHODS or m == "fwd+bwd" for m in w.methods), w.name


def test_unknown_suite_is_a_value_error():
    with pytest.raises(ValueError, match="suite: expected 'cpu' or 'gpu', got 'tpu'"):
        workloads.suite("tpu")


def test_difference_reports_the_worst_tensor_and_the_missing_ones():
    ref = {"a": torch.ones(3), "b": torch.ones(2), "c": torch.ones(1)}
    got = {"a": torch.ones(3), "b": torch.tensor([1.0, 2.0])}
    worst, where, missing = measure.difference(got, ref)
    assert where == "b" and worst == pytest.approx(1 / 2 ** 0.5) and missing == 1
    grouped = {"__totals__": {"a": torch.tensor(3.0)}}  # group totals against full tensors
    assert measure.difference(grouped, ref)[0] == 0.0


def test_a_tiny_workload_runs_and_fisher_fast_matches_the_loop():
    w = next(w for w in workloads.suite("cpu", quick=True) if w.name.startswith("mlp") and w.kind == "full")
    w = workloads.Workload(w.name, w.kind, w.build, ("fwd+bwd", "fisher_fast", "fisher_fast-group", "loop"))
    records = measure.run_workload(w, "cpu", rounds=1, log=lambda s: None)
    by = {r["method"]: r for r in records}
    assert by["fwd+bwd"]["time_ratio"] == 1.0 and "seconds" in by["fisher_fast"]
    assert by["fisher_fast"]["check_vs"] == "loop" and by["fisher_fast"]["max_rel_diff"] < 1e-5
    assert by["fisher_fast-group"]["max_rel_diff"] < 1e-5
    text = run.table(w, records)
    assert text.count("\n| ") == 4 + 1 and "fisher_fast" in text
    json.dumps(records)  # the JSON file takes them as they are
