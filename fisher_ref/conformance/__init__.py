"""The conformance harness: check any Fisher implementation against the definitions.

- :mod:`~fisher_ref.conformance.adapter`: the adapter protocol (what an implementation
  exposes) and ``load_adapter("package.module:object")``.
- :mod:`~fisher_ref.conformance.properties`: the named properties (``PROPERTIES``), with
  :mod:`attention_properties` and :mod:`statistics_properties`.
- :mod:`~fisher_ref.conformance.runner`: ``run_conformance(adapter, profile=...)``.
- :mod:`~fisher_ref.conformance.report`: ``ConformanceReport`` (table and JSON).
- :mod:`~fisher_ref.conformance.pytest_plugin`: ``conformance_suite`` for a project's pytest.
- :mod:`~fisher_ref.conformance.builtin_adapters`: ``ReferenceAdapter`` over fisher_ref.

See docs/conformance.md.
"""

from fisher_ref.conformance.adapter import CAPABILITIES, load_adapter, provided
from fisher_ref.conformance.report import ConformanceReport
from fisher_ref.conformance.runner import PROFILES, run_conformance

__all__ = ["CAPABILITIES", "PROFILES", "ConformanceReport", "load_adapter", "provided",
           "run_conformance"]
