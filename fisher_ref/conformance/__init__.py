"""The conformance harness: check any Fisher implementation against the definitions.

- :mod:`~fisher_ref.conformance.adapter`: the adapter protocol (what an implementation
  exposes) and ``load_adapter("package.module:object")``.
- :mod:`~fisher_ref.conformance.cases`: the examples: tiny causal LMs and classifiers, rows
  with caller ids, splits (``size="scale"``: 12 layers, 8 heads, 16+ rows).
- :mod:`~fisher_ref.conformance.properties`: the named properties (``PROPERTIES``), with
  :mod:`estimator_cases`, :mod:`group_properties`, :mod:`true_fisher_properties`,
  :mod:`attention_properties` and :mod:`statistics_properties`.
- :mod:`~fisher_ref.conformance.diagnosis`: what a failing result matches (the catalogue).
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
