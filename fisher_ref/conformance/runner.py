"""Run the properties for what an adapter provides, under a profile, and collect a report.

Profiles:

- ``quick`` (CI): few examples per property; the smallest example of every architecture the
  adapter supports is run first, so each (GPT-2, LLaMA, Mistral, Qwen2, Phi-3, GPT-NeoX; MLP,
  CNN, LayerNorm/GELU, ViT) is met at least once.
- ``thorough``: many examples, every architecture the adapter supports.
- ``scale``: a few examples of what tiny cases miss: 12 layers, 8 heads, 16-24 rows of 8-12
  tokens (a collector that keeps only the first 8 samples, or matches layer ``h.1`` to
  ``h.11``, fails here); minutes on a CPU.

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
    adapter_row_reductions,
    adapter_unit_reduction,
    provided,
)
from fisher_ref.conformance.engine import FAIL, Context, PropertyResult
from fisher_ref.conformance.properties import PROPERTIES
from fisher_ref.conformance.report import ConformanceReport

PROFILES = {
    "quick": {"max_examples": 6, "size": "tiny", "cover": True, "shrink_examples": 60,
              "shrink_seconds": 120.0},
    "thorough": {"max_examples": 60, "size": "tiny", "cover": True, "shrink_examples": 400,
                 "shrink_seconds": 600.0},
    "scale": {"max_examples": 2, "size": "scale", "cover": False, "shrink_examples": 8,
              "shrink_seconds": 300.0},
}


def run_conformance(adapter, *, profile: str = "quick", properties=None, derandomize: bool = True,
                    oracle=None, progress=None, shrink_examples: int | None = None,
                    shrink_seconds: float | None = None) -> ConformanceReport:
    """Check ``adapter`` (see :mod:`fisher_ref.conformance.adapter`) against the properties.

    Args:
        adapter: the implementation under test.
        profile: ``"quick"``, ``"thorough"`` or ``"scale"``.
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
    ctx = Context(oracle=oracle, max_examples=conf["max_examples"],
                  archs=adapter_architectures(adapter), dtype=adapter_dtype(adapter),
                  units=tuple(adapter_option(adapter, "units", ("sample",))),
                  weightings=tuple(adapter_option(adapter, "weightings", ("sample",))),
                  row_reductions=adapter_row_reductions(adapter),
                  unit_reduction=adapter_unit_reduction(adapter),
                  custom_loss=bool(adapter_option(adapter, "custom_loss", True)),
                  size=conf["size"], cover=conf["cover"], derandomize=derandomize,
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
