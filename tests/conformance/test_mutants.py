"""Every mutant of the zoo fails a named property; correct implementations pass them all."""

import importlib

import pytest

from fisher_ref.conformance.builtin_adapters import ReferenceAdapter
from fisher_ref.conformance.properties import PROPERTIES
from fisher_ref.conformance.runner import run_conformance
from tests.conformance.mutants import MUTANTS
from tests.conformance.mutants.collector import CollectorAdapter

# Imported as ``tests.conformance.mutants`` (the repository root is on sys.path under
# ``python -m pytest``), the same dotted path ``fishercheck conform --impl`` takes.


def _mutant(name):
    return importlib.import_module(f"tests.conformance.mutants.{name}")


@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_declares_named_properties(name):
    mod = _mutant(name)
    assert mod.FAILS and set(mod.FAILS) <= set(PROPERTIES), mod.FAILS


# The property that must catch each mutant because of its defect (the most direct one of
# its FAILS): a failure there, on a definition and not a crash, while the correct collector
# it subclasses passes the same property (test_correct_collector_passes_what_it_provides).
CAUGHT_BY = {
    "sum_then_square": "empirical_fisher_agreement",
    "square_per_microbatch": "empirical_fisher_agreement",
    "token_count_division": "duplication_invariance",
    "ema_bias_corrected": "empirical_fisher_agreement",
    "batch_contribution": "contributions_agreement",
    "grouped_contributions": "contributions_full_shape",
    "gpt2_o_columns": "slices_semantic",
    "fused_gqa_v_offset": "slices_partition",
    "head_dim_from_hidden": "slices_partition",
    "units_confused": "empirical_fisher_agreement",
    "hf_batch_mean_loss": "empirical_fisher_agreement",
    "tied_squared_per_use": "empirical_fisher_agreement",
    "float16_accumulation": "loss_scaling",
    "permutation_unchanged": "pvalues_calibrated",
    "wrong_bh": "qvalues_statsmodels",
    "p_zero": "pvalues_positive",
    "ids_split_underscore": "contributions_keyed_by_ids",
    "interference_signed": "interference_nonnegative",
    "pvalue_wrong_tail": "pvalues_direction",
    "pvalue_two_sided": "pvalues_direction",
    "squared_mean_over_tokens": "distinct_rows_agreement",
    "ridge_1e8": "empirical_fisher_agreement",
    "float16_contributions": "contributions_agreement",
    "first_8_samples": "empirical_fisher_agreement",
    "layer_substring": "slices_partition",
    "signed_ignored": "interference_signed_agreement",
    "neox_blocks": "slices_agreement",
    "group_fisher_last_batch": "group_fisher_invariance",
    "ignores_loss_fn": "uses_callers_loss",
    "classifier_batch_mean_loss": "empirical_fisher_agreement",
    "argmax_labels": "mc_fisher_converges",
}
SCALE = [name for name in MUTANTS if getattr(_mutant(name), "PROFILE", "quick") == "scale"]


def test_every_mutant_has_its_catching_property():
    assert sorted(CAUGHT_BY) == sorted(MUTANTS)
    assert all(prop in _mutant(name).FAILS for name, prop in CAUGHT_BY.items())


def _catch(name, profile):
    mod = _mutant(name)
    report = run_conformance(mod.Adapter(), profile=profile, properties=[CAUGHT_BY[name]],
                             shrink_examples=15)
    (result,) = report.results
    assert result.verdict == "fail", f"{mod.DEFECT!r} was not caught:\n{report.table()}"
    assert not result.message.startswith(("the adapter raised", "harness:")), report.table()
    assert result.counterexample, report.table()  # a minimal model and batch are reported
    if hasattr(mod, "DIAGNOSIS"):  # the blind spots of the first edition: named, not only caught
        assert result.diagnosis and mod.DIAGNOSIS in result.diagnosis, report.table()
    return report


@pytest.mark.parametrize("name", [n for n in MUTANTS if n not in SCALE])
def test_mutant_fails_its_named_property(name):
    _catch(name, "quick")


@pytest.mark.slow
@pytest.mark.parametrize("name", SCALE)
def test_scale_profile_catches_what_tiny_cases_miss(name):
    assert _catch(name, "scale").results[0].verdict == "fail"
    quick = run_conformance(_mutant(name).Adapter(), profile="quick", properties=[CAUGHT_BY[name]])
    assert quick.results[0].verdict == "pass", quick.table()  # the blind spot: tiny cases pass


@pytest.mark.slow
@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_fails_every_declared_property(name):
    mod = _mutant(name)
    report = run_conformance(mod.Adapter(), profile=getattr(mod, "PROFILE", "quick"),
                             properties=sorted(mod.FAILS))
    assert not [r.name for r in report.results if r.verdict != "fail"], report.table()


# The oracle's own Monte-Carlo Fisher (a backward pass per draw per unit) and the 8 repeats
# of the calibration property are minutes for fisher_ref: those two run in the slow tier.
ORACLE_SLOW = ("mc_fisher_converges", "pvalues_calibrated")


def test_reference_adapter_passes_everything():
    report = run_conformance(ReferenceAdapter(), profile="quick",
                             properties=[p for p in PROPERTIES if p not in ORACLE_SLOW])
    assert report.passed and report.counts()["not provided"] == 0, report.table()


@pytest.mark.slow
def test_reference_adapter_passes_the_statistical_properties():
    report = run_conformance(ReferenceAdapter(), profile="quick", properties=list(ORACLE_SLOW))
    assert report.passed and report.counts()["not provided"] == 0, report.table()


def test_correct_collector_passes_what_it_provides():
    report = run_conformance(CollectorAdapter(), profile="quick")
    assert report.passed, report.table()
    assert report.verdict("group_fisher_agreement") == "not provided"
