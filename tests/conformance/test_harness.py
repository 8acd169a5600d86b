"""The harness itself: adapter loading, verdicts, reports and bad input."""

import json

import pytest
import torch
from hypothesis import find

from fisher_ref.conformance.adapter import (
    CAPABILITIES,
    FAMILY_ARCHITECTURES,
    adapter_architectures,
    adapter_dtype,
    adapter_unit_reduction,
    load_adapter,
    provided,
)
from fisher_ref.conformance.builtin_adapters import ReferenceAdapter
from fisher_ref.conformance.cases import (
    DataSpec,
    build_case_model,
    case_loss,
    data_specs,
    describe_case,
    join,
    split_batch,
    tiny_configs,
)
from fisher_ref.conformance.engine import Context, covering_examples
from fisher_ref.conformance.estimator_cases import cover_estimator_cases
from fisher_ref.conformance.outputs import RelabeledLoss
from fisher_ref.conformance.pytest_plugin import conformance_suite
from fisher_ref.conformance.runner import run_conformance
from fisher_ref.losses import causal_lm_loss
from fisher_ref.testing.classifiers import ClassifierConfig
from fisher_ref.testing.models import TinyConfig
from tests.conformance.mutants.collector import CollectorAdapter


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


# ------------------------------------------------------------------ second edition (#10)

class BadFamilies:
    families = ("vision",)


class ArchOutsideFamily:
    families = ("causal_lm",)
    architectures = ("gpt2", "mlp")


class BadUnitReduction:
    unit_reduction = "total"


@pytest.mark.parametrize("fn, adapter, message", [
    pytest.param(adapter_architectures, BadFamilies(), "adapter families: expected", id="families"),
    pytest.param(adapter_architectures, ArchOutsideFamily(), "declare the family", id="arch-family"),
    pytest.param(adapter_unit_reduction, BadUnitReduction(), "unit_reduction: expected", id="reduction"),
])
def test_bad_adapter_declarations(fn, adapter, message):
    with pytest.raises(ValueError, match=message):
        fn(adapter)


def test_default_family_is_the_causal_lm_and_classifiers_are_declared():
    assert adapter_architectures(OnlyQValues()) == FAMILY_ARCHITECTURES["causal_lm"]
    assert "vit" in adapter_architectures(ReferenceAdapter())


class SummedCollector(CollectorAdapter):
    """A collector of the summed-loss convention: F = Σ_u g_u², S = (Σ_u g_u)²."""

    name = "summed collector"
    families = ("classifier",)
    architectures = ("mlp",)

    def empirical_fisher(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        c = self._collect(model, batches, loss_fn)
        return {n: s for n, s in c.sum_sq.items()}


def test_a_summed_convention_passes_once_declared():
    report = run_conformance(SummedCollector(), properties=["empirical_fisher_agreement"])
    (result,) = report.results
    assert result.verdict == "fail" and "empirical_fisher × n_units" in result.diagnosis
    declared = SummedCollector()
    declared.unit_reduction = "sum"
    assert run_conformance(declared, properties=["empirical_fisher_agreement"]).passed


def test_quick_profile_meets_every_architecture_once():
    archs = adapter_architectures(ReferenceAdapter())
    ctx = Context(oracle=ReferenceAdapter(), archs=archs, cover=True)
    examples = covering_examples(ctx, "test", cover_estimator_cases(ctx))
    assert [e[0].arch for e in examples] == list(archs)
    assert not covering_examples(Context(oracle=None, archs=archs), "off", cover_estimator_cases(ctx))


def test_int_ids_never_equal_a_row_position():
    for spec in (DataSpec(seed=0, batch_size=24), DataSpec(seed=0, batch_size=5, id_offset=100)):
        ids = spec.ids()
        assert len(set(ids)) == len(ids) and min(ids) >= 1000
    joined = join([DataSpec(seed=1, batch_size=3).batch(),
                   DataSpec(seed=2, batch_size=3, id_offset=100).batch()])
    ids = joined["sample_ids"]
    assert all(i != k for k, i in enumerate(ids)) and not set(ids) & set(range(len(ids)))


def test_scale_size_draws_twelve_layers_eight_heads_and_sixteen_rows():
    config = find(tiny_configs(("gpt2", "llama"), size="scale"), lambda c: True)
    data = find(data_specs(config, size="scale"), lambda d: True)
    assert (config.num_layers, config.num_heads) == (12, 8) and data.batch_size >= 16
    assert data.seq_len >= 8


def test_relabeled_loss_moves_every_active_label_and_keeps_the_protocol():
    batch = DataSpec(seed=3, batch_size=2, empty_row=1).batch()
    model = build_case_model(TinyConfig(arch="gpt2", num_layers=1))
    loss = RelabeledLoss(causal_lm_loss)
    _, base = causal_lm_loss.logits_and_targets(model, batch)
    logits, moved = loss.logits_and_targets(model, batch)
    active = base != -100
    assert torch.equal(moved[active], (base[active] + 1) % logits.shape[-1])
    assert torch.equal(moved[~active], base[~active])
    assert torch.equal(loss.token_counts(batch), causal_lm_loss.token_counts(batch))
    assert loss(model, batch)[1] == 0  # the empty row stays empty


def test_classifier_cases_rebuild_from_their_description():
    config = ClassifierConfig(arch="vit")
    spec = DataSpec(seed=4, batch_size=3, family="classifier", input_shape=config.input_shape,
                    num_classes=config.num_classes, empty_row=2)
    batch = spec.batch()
    assert batch["input"].shape == (3, 1, 4, 4) and batch["labels"][2] == -100
    assert "ClassifierConfig(arch='vit')" in describe_case(config, spec, [3])
    rows = case_loss(config)(build_case_model(config), batch)
    assert torch.equal(rows[2:], torch.zeros(1, dtype=torch.float64))
