"""Run the properties for what an adapter provides, under a profile, and collect a report.

Profiles:

- ``quick`` (CI): few examples per property, models drawn from GPT-2, LLaMA (GQA, explicit
  head_dim) and Phi-3 (fused Q/K/V with GQA).
- ``thorough``: many examples, every architecture the adapter supports.

Both are deterministic by default (``derandomize=True``, no example database), so a CI gate
gives the same verdict on every run; ``derandomize=False`` explores new examples each run.
"""

from __future__ import annotations

import time

from fisher_ref.conformance.adapter import (
    adapter_architectures,
    adapter_dtype,
    adapter_name,
    adapter_option,
    provided,
)
from fisher_ref.conformance.engine import FAIL, Context, PropertyResult
from fisher_ref.conformance.properties import PROPERTIES
from fisher_ref.conformance.report import ConformanceReport

PROFILES = {
    "quick": {"max_examples": 10, "archs": ("gpt2", "llama", "phi3"), "shrink_examples": 60,
              "shrink_seconds": 120.0},
    "thorough": {"max_examples": 60, "archs": None, "shrink_examples": 400,
                 "shrink_seconds": 600.0},
}


def run_conformance(adapter, *, profile: str = "quick", properties=None, derandomize: bool = True,
                    oracle=None, progress=None, shrink_examples: int | None = None,
                    shrink_seconds: float | None = None) -> ConformanceReport:
    """Check ``adapter`` (see :mod:`fisher_ref.conformance.adapter`) against the properties.

    Args:
        adapter: the implementation under test.
        profile: ``"quick"`` or ``"thorough"``.
        properties: names to run (default: all of ``PROPERTIES``).
        derandomize: deterministic examples (True for CI).
        oracle: the reference adapter (default: ``ReferenceAdapter`` over fisher_ref).
        progress: optional callable receiving each ``PropertyResult`` as it completes.
        shrink_examples: how many new examples a failing property may try to shrink its
            counterexample (default: the profile's, 60 quick, 400 thorough). A count, not a
            time, so the printed counterexample is the same on every run and machine.
        shrink_seconds: a safety cap on the time spent shrinking (default: the profile's,
            120 s quick, 600 s thorough); a counterexample cut short by it says so.

    Returns:
        ConformanceReport: one verdict per property: pass, fail (with the minimal
        counterexample) or not provided.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {sorted(PROFILES)}, got {profile!r}.")
    names = list(PROPERTIES) if properties is None else list(properties)
    unknown = [n for n in names if n not in PROPERTIES]
    if unknown:
        raise ValueError(f"properties: expected names from {sorted(PROPERTIES)}, got {unknown}.")
    if not provided(adapter):
        from fisher_ref.conformance.adapter import CAPABILITIES

        raise ValueError(f"adapter {adapter_name(adapter)!r}: expected at least one capability "
                         f"method ({', '.join(CAPABILITIES)}), got none: check the method names.")
    if oracle is None:
        from fisher_ref.conformance.builtin_adapters import ReferenceAdapter

        oracle = ReferenceAdapter()
    conf = PROFILES[profile]
    supported = adapter_architectures(adapter)
    archs = tuple(a for a in (conf["archs"] or supported) if a in supported) or supported
    ctx = Context(oracle=oracle, max_examples=conf["max_examples"], archs=archs,
                  dtype=adapter_dtype(adapter),
                  units=tuple(adapter_option(adapter, "units", ("sample",))),
                  weightings=tuple(adapter_option(adapter, "weightings", ("sample",))),
                  derandomize=derandomize,
                  shrink_examples=_or(shrink_examples, conf["shrink_examples"]),
                  shrink_seconds=_or(shrink_seconds, conf["shrink_seconds"]))
    start = time.perf_counter()
    results = []
    for name in names:
        try:
            result = PROPERTIES[name](adapter, ctx)
        except Exception as exc:  # a harness or adapter error outside an example
            result = PropertyResult(name, FAIL, None, f"{type(exc).__name__}: {exc}")
        results.append(result)
        if progress is not None:
            progress(result)
    return ConformanceReport(adapter=adapter_name(adapter), profile=profile, results=results,
                             provided=provided(adapter), seconds=time.perf_counter() - start)


def _or(value, default):
    return default if value is None else value
