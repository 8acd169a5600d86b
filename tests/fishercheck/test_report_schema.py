"""report.json's schema: a hand-built report passes, each kind of defect is named."""

import copy

import pytest

from fishercheck.report_schema import to_json, validate


def _report():
    """A minimal valid report: 1 layer, 2 heads, written by hand."""
    heads = [[[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]]]
    task = {"n_units": 3,
            "per_layer": [{"layer": "embeddings", "E_g2": 2.0, "Eg_2": 1.0, "ratio": 2.0}],
            "head_fisher": heads, "head_squared_mean": heads,
            "impact": {"spearman": 1.0, "kendall": 1.0, "topk_jaccard_10": 1.0,
                       "topk_jaccard_20": 1.0, "pruning_mask_jaccard": 1.0}}
    return {
        "meta": {"model": "m", "trained": True, "weights": "loaded", "missing_tensors": [],
                 "unexpected_tensors": [], "task_a": "a.txt", "task_b": "b.txt",
                 "device": "cpu", "max_length": 8, "samples": 3, "rows": {"A": 3, "B": 3},
                 "plots": []},
        "settings": {"pairs_per_task": {"A": 3, "B": 3}, "interference_units": {"A": 3, "B": 3},
                     "n_permutations": 9, "seed": 0, "dtype": "float32", "unit": "sample",
                     "loss": "causal LM",
                     "memory": {"budget_bytes": 2**30, "mode": "memory", "chunk_rows": 32,
                                "block_rows": 3, "peaks_bytes": {"moments": 1000}}},
        "layout": {"layers": 1, "heads": 2, "kv_heads": 2, "head_dim": 4, "kind": "gpt2"},
        "tasks": {"A": task, "B": copy.deepcopy(task)},
        "interference": {"means": {b: [[0.0, 1.0]] for b in "QKVO"},
                         "top": [{"score": 1.0, "id_a": "a_0", "id_b": 3, "layer": 0, "head": 1,
                                  "block": "V"}]},
        "conflicts": {"hypothesis": "H0", "alpha": 0.05, "fdr": "bh", "min_attainable_p": 0.1,
                      "testable": False, "note": "too few", "slices": [
                          {"group": "L0.H1.K", "layer": 0, "head": 1, "block": "K",
                           "mean_cosine": -0.1, "p": 0.1, "q": 0.2, "effect": float("nan"),
                           "interval": [-0.2, 0.0]}]},
        "timings": {"total_s": 1.0},
    }


def test_a_hand_built_report_fits_before_and_after_json():
    report = _report()
    validate(report)
    validate(to_json(report))  # nan becomes "nan", still a number
    assert to_json(report)["conflicts"]["slices"][0]["effect"] == "nan"


def _set(path, value):
    def change(report):
        *keys, last = path
        target = report
        for k in keys:
            target = target[k]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return change


DEFECTS = [
    pytest.param(_set(("meta", "trained"), KeyError), r"report\.meta: expected the keys of Meta .*"
                 r"1 missing \['trained'\]", id="missing-key"),
    pytest.param(_set(("meta", "colour"), "red"), r"report\.meta: .*1 unknown \['colour'\]",
                 id="unknown-key"),
    pytest.param(_set(("meta", "trained"), "yes"), r"report\.meta\.trained: expected bool, got 'yes'",
                 id="wrong-type"),
    pytest.param(_set(("meta", "weights"), "some"),
                 r"report\.meta\.weights: expected one of \['loaded', 'partial', 'random'\], got 'some'",
                 id="literal"),
    pytest.param(_set(("meta", "max_length"), True), r"report\.meta\.max_length: expected int, got True",
                 id="bool-is-not-int"),
    pytest.param(_set(("tasks", "A", "per_layer", 0, "ratio"), "big"),
                 r"report\.tasks\.A\.per_layer\[0\]\.ratio: expected a number", id="not-a-number"),
    pytest.param(_set(("tasks", "B", "head_fisher"), [[[1.0, 2.0, 3.0, 4.0]]]),
                 r"report\.tasks\.B\.head_fisher\[0\]: expected 2 entries along this axis, got 1",
                 id="head-array-shape"),
    pytest.param(_set(("interference", "means", "O"), [[1.0, 2.0, 3.0]]),
                 r"report\.interference\.means\.O\[0\]: expected 2 entries", id="means-shape"),
    pytest.param(_set(("conflicts", "slices", 0, "head"), 2),
                 r"report\.conflicts\.slices\[0\]: expected layer in \[0, 1\), head in \[0, 2\)",
                 id="slice-out-of-range"),
    pytest.param(_set(("conflicts", "slices", 0, "interval"), [0.0]),
                 r"report\.conflicts\.slices\[0\]\.interval: expected \[low, high\]", id="interval"),
    pytest.param(_set(("conflicts", "testable"), "no"),
                 r"report\.conflicts\.testable: expected bool, got 'no'", id="conflicts-testable"),
    pytest.param(_set(("interference", "top", 0, "id_a"), None),
                 r"report\.interference\.top\[0\]\.id_a: expected one of \['str', 'int'\], got None",
                 id="sample-id"),
]


@pytest.mark.parametrize("defect, message", DEFECTS)
def test_each_defect_is_named(defect, message):
    report = _report()
    defect(report)
    with pytest.raises(ValueError, match=message):
        validate(report)


def test_check_is_optional_but_checked_when_present():
    report = _report()
    report["check"] = {"rows_per_task": 2, "empirical_fisher": 1e-7, "squared_mean_gradient": 1e-7,
                       "interference": 1e-7, "conflict_p_max_abs_difference": 0.0}
    validate(report)
    del report["check"]["interference"]
    with pytest.raises(ValueError, match=r"report\.check: .*missing \['interference'\]"):
        validate(report)


def test_the_store_and_the_memory_plan_are_checked():
    report = _report()
    report["store"] = {"path": "/s", "reused": {"moments_A_rows": 3, "conflicts": True}}
    validate(report)
    report["store"]["reused"]["conflicts"] = "yes"
    with pytest.raises(ValueError, match=r"report\.store\.reused\.conflicts: expected one of "
                                         r"\['int', 'bool'\], got 'yes'"):
        validate(report)
    report = _report()
    report["settings"]["memory"]["mode"] = "swap"
    with pytest.raises(ValueError, match=r"report\.settings\.memory\.mode: expected one of "
                                         r"\['memory', 'store', 'recompute'\], got 'swap'"):
        validate(report)
