"""Run the conformance suite inside a project's own pytest: one test per property.

In any test module of your project::

    from fisher_ref.conformance.pytest_plugin import conformance_suite

    test_fisher_conformance = conformance_suite("mypackage.fisher_adapter:MyAdapter")

pytest then collects ``test_fisher_conformance[empirical_fisher_agreement]``, … one item per
property: a broken property fails with the minimal counterexample in the message, a
capability the adapter does not provide is *skipped* ("not provided"), never passed.
The profile is ``quick`` unless the environment variable ``FISHERCHECK_PROFILE`` says
``thorough``; runs are deterministic (derandomized, no example database).
"""

from __future__ import annotations

import os

import pytest

from fisher_ref.conformance.adapter import load_adapter
from fisher_ref.conformance.engine import FAIL, NOT_PROVIDED
from fisher_ref.conformance.properties import PROPERTIES
from fisher_ref.conformance.runner import run_conformance


def conformance_suite(adapter, *, profile: str | None = None, properties=None, marks=()):
    """A pytest test function parametrized over the properties, for ``adapter``.

    Args:
        adapter: an adapter object, or a ``"package.module:object"`` spec (resolved lazily,
            at the first test, so collection stays cheap).
        profile: ``"quick"`` / ``"thorough"`` (default: ``$FISHERCHECK_PROFILE`` or quick).
        properties: the property names to run (default: all).
        marks: pytest marks applied to every generated test (e.g. ``pytest.mark.slow``).
    """
    names = list(PROPERTIES) if properties is None else list(properties)
    unknown = [n for n in names if n not in PROPERTIES]
    if unknown:
        raise ValueError(f"properties: expected names from {sorted(PROPERTIES)}, got {unknown}.")
    resolved: dict = {}

    def get_adapter():
        if "adapter" not in resolved:
            resolved["adapter"] = load_adapter(adapter) if isinstance(adapter, str) else adapter
        return resolved["adapter"]

    @pytest.mark.parametrize("property_name", [pytest.param(n, id=n, marks=marks) for n in names])
    def test_conformance(property_name):
        prof = profile or os.environ.get("FISHERCHECK_PROFILE", "quick")
        report = run_conformance(get_adapter(), profile=prof, properties=[property_name])
        result = report.results[0]
        if result.verdict == NOT_PROVIDED:
            pytest.skip(f"{property_name}: not provided by {report.adapter}")
        if result.verdict == FAIL:
            pytest.fail(report.table(), pytrace=False)

    return test_conformance
