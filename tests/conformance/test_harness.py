"""The harness itself: adapter loading, verdicts, reports and bad input."""

import json

import pytest
import torch

from fisher_ref.conformance.adapter import (
    CAPABILITIES,
    adapter_architectures,
    adapter_dtype,
    load_adapter,
    provided,
)
from fisher_ref.conformance.builtin_adapters import ReferenceAdapter
from fisher_ref.conformance.cases import DataSpec, split_batch
from fisher_ref.conformance.pytest_plugin import conformance_suite
from fisher_ref.conformance.runner import run_conformance


class OnlyQValues:
    """Provides one capability, correctly."""

    name = "only-q"

    def fdr_qvalues(self, pvalues, *, method="bh"):
        return ReferenceAdapter().fdr_qvalues(pvalues, method=method)


class BadDtype:
    dtype = torch.float16


class BadArchs:
    architectures = ("gpt3",)


def test_missing_capabilities_are_not_provided_never_passed():
    report = run_conformance(OnlyQValues(), properties=["qvalues_statsmodels", "loss_scaling"])
    assert [r.verdict for r in report.results] == ["pass", "not provided"]
    assert report.passed and report.counts() == {"pass": 1, "fail": 0, "not provided": 1}


def test_report_json_round_trips(tmp_path):
    report = run_conformance(OnlyQValues(), properties=["qvalues_statsmodels"])
    report.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["adapter"] == "only-q" and data["results"][0]["property"] == "qvalues_statsmodels"
    assert "1 passed, 0 failed, 0 not provided" in report.table()


def test_load_adapter_instantiates_classes_and_keeps_objects():
    adapter = load_adapter("fisher_ref.conformance.builtin_adapters:ReferenceAdapter")
    assert isinstance(adapter, ReferenceAdapter)
    assert "fdr_qvalues" in provided(adapter) and len(provided(adapter)) == len(CAPABILITIES) == 10


def test_split_batch_keeps_ids_with_their_rows():
    batch = DataSpec(seed=3, batch_size=4, seq_len=4, id_style="str").batch()
    parts = split_batch(batch, [1, 3])
    assert parts[0]["sample_ids"] == ["doc_0"] and parts[1]["sample_ids"] == ["doc_a_1", "q_2", "doc_3"]
    assert torch.equal(parts[1]["labels"], batch["labels"][1:])


BAD_INPUT = [
    pytest.param(load_adapter, {"spec": ""}, "expected 'package.module:object'", id="empty-spec"),
    pytest.param(load_adapter, {"spec": "no_such_module_xyz:A"}, "cannot import module", id="no-module"),
    pytest.param(load_adapter, {"spec": "fisher_ref.conformance.adapter:Nope"}, "has no 'Nope'",
                 id="no-object"),
    pytest.param(run_conformance, {"adapter": OnlyQValues(), "profile": "fast"},
                 "profile: expected one of", id="profile"),
    pytest.param(run_conformance, {"adapter": OnlyQValues(), "properties": ["nope"]},
                 "properties: expected names", id="property"),
    pytest.param(adapter_dtype, {"adapter": BadDtype()}, "expected torch.float64 or torch.float32",
                 id="dtype"),
    pytest.param(adapter_architectures, {"adapter": BadArchs()}, "expected a non-empty subset",
                 id="architectures"),
    pytest.param(split_batch, {"batch": DataSpec(seed=0, batch_size=3, seq_len=3).batch(),
                               "sizes": [1, 1]}, "summing to 3", id="split-sizes"),
    pytest.param(conformance_suite, {"adapter": OnlyQValues(), "properties": ["nope"]},
                 "properties: expected names", id="suite-property"),
]


@pytest.mark.parametrize("fn, kwargs, message", BAD_INPUT)
def test_bad_input_raises_value_error(fn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fn(**kwargs)


class _NoCapabilities:
    name = "typo"

    def empirical_fishr(self, model, batches, *, loss_fn):  # misspelt: provides nothing
        raise NotImplementedError


def test_nothing_provided_is_an_error_or_no_pass():
    with pytest.raises(ValueError, match="expected at least one capability method"):
        run_conformance(_NoCapabilities())
    report = run_conformance(OnlyQValues(), properties=["loss_scaling"])
    assert report.counts() == {"pass": 0, "fail": 0, "not provided": 1} and not report.passed
    assert "nothing was checked" in report.table()
