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


@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_fails_a_named_property(name):
    mod = _mutant(name)
    primary = sorted(mod.FAILS)[0]
    report = run_conformance(mod.Adapter(), profile="quick", properties=[primary], shrink_seconds=1.0)
    (result,) = report.results
    assert result.verdict == "fail", f"{mod.DEFECT!r} was not caught:\n{report.table()}"
    assert result.counterexample, report.table()  # a minimal model and batch are reported


@pytest.mark.slow
@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_fails_every_declared_property(name):
    mod = _mutant(name)
    report = run_conformance(mod.Adapter(), profile="quick", properties=sorted(mod.FAILS))
    assert not [r.name for r in report.results if r.verdict != "fail"], report.table()


def test_reference_adapter_passes_everything():
    report = run_conformance(ReferenceAdapter(), profile="quick")
    assert report.passed and report.counts()["not provided"] == 0, report.table()


def test_correct_collector_passes_what_it_provides():
    report = run_conformance(CollectorAdapter(), profile="quick")
    assert report.passed, report.table()
    assert report.verdict("group_fisher_agreement") == "not provided"
