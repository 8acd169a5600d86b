"""Running one property under Hypothesis and keeping its minimal counterexample.

A property body takes one drawn example and raises ``AssertionError`` (a definition is
broken) or any other exception (the adapter crashed); Hypothesis then shrinks the example.
Its final replay is the minimal failing example, so the last failure recorded here is the
one reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import HypothesisException

from fisher_ref.testing.strategies import float64_tolerance_kind
from fisher_ref.testing.tolerances import tolerance

PASS, FAIL, NOT_PROVIDED = "pass", "fail", "not provided"


@dataclass
class PropertyResult:
    """The verdict of one property for one adapter.

    Attributes:
        name: the property's name.
        verdict: "pass", "fail" or "not provided".
        counterexample: for a failure, the minimal model and batch that show it.
        message: for a failure, what differs (or the exception the adapter raised).
        needs: the capabilities the property exercises.
        examples: how many examples were run (0 when not provided).
        seconds: wall time.
    """

    name: str
    verdict: str
    counterexample: str | None = None
    message: str | None = None
    needs: tuple[str, ...] = ()
    examples: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"property": self.name, "verdict": self.verdict, "needs": list(self.needs),
                "counterexample": self.counterexample, "message": self.message,
                "examples": self.examples, "seconds": round(self.seconds, 3)}


@dataclass
class Context:
    """What every property gets besides the adapter.

    Attributes:
        oracle: the reference adapter (``ReferenceAdapter`` over fisher_ref).
        max_examples: Hypothesis examples per property (before shrinking).
        archs: architectures drawn for models.
        dtype: the dtype models are built in (the adapter's ``dtype``).
        units, weightings: the options the adapter's estimators support.
        derandomize: fixed example sequence (CI), no example database.
        shrink_examples: new examples Hypothesis may try after the first failure to shrink
            it (a count, so the printed counterexample is the same on every run).
        shrink_seconds: a safety cap on the time spent shrinking (for slow adapters); when
            it, not the count, ends shrinking, the report says the example may vary.
    """

    oracle: object
    max_examples: int = 5
    archs: tuple[str, ...] = ("gpt2", "llama", "phi3")
    dtype: torch.dtype = torch.float64
    units: tuple[str, ...] = ("sample",)
    weightings: tuple[str, ...] = ("sample",)
    derandomize: bool = True
    shrink_examples: int = 60
    shrink_seconds: float = 120.0
    cache: dict = field(default_factory=dict)

    def memo(self, key, compute):
        """``compute()`` once per ``key``: oracle results depend on the model and rows only
        (never on the split), so shrinking a split reuses them.
        """
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def tolerance(self, config=None) -> tuple[float, float]:
        """(rtol, atol) for comparing an adapter's results on ``config``'s model with the
        oracle's (or with its own on another split): float64 adapters get the float64 row of
        that architecture (HF RMS norms compute in float32 even in a float64 model), float32
        adapters the float32 row.
        """
        if self.dtype == torch.float64:
            kind = "float64-paths" if config is None else float64_tolerance_kind(config)
            return tolerance(kind, torch.float64)
        return tolerance("float32-fisher", torch.float32)

    def settings(self, max_examples: int | None = None) -> settings:
        n = self.max_examples if max_examples is None else max_examples
        return settings(max_examples=max(1, n), derandomize=self.derandomize, database=None,
                        deadline=None, print_blob=False, report_multiple_bugs=False,
                        suppress_health_check=list(HealthCheck))


def run_property(name: str, needs: tuple[str, ...], strategy, body, describe, ctx: Context,
                 max_examples: int | None = None) -> PropertyResult:
    """Run ``body(example)`` on examples from ``strategy``; shrink and keep the minimal failure.

    ``describe(example) -> str`` renders an example for the report. Shrinking is bounded by
    ``ctx.shrink_examples`` new examples after the first failure (deterministic) and by
    ``ctx.shrink_seconds`` (a safety cap): once either is spent, examples not seen before are
    skipped (count as passing), so Hypothesis stops at the smallest failure found so far and
    replays it.
    """
    record: dict = {"n": 0, "first_failure": None, "after_failure": 0, "timed_out": False}
    seen: set = set()

    def test(example):
        key = repr(example)
        t_fail = record["first_failure"]
        if t_fail is not None and key not in seen:
            if time.perf_counter() - t_fail > ctx.shrink_seconds:
                record["timed_out"] = True
                return
            if record["after_failure"] >= ctx.shrink_examples:
                return
            record["after_failure"] += 1
        seen.add(key)
        record["n"] += 1
        try:
            body(example)
        except Exception as exc:
            record["example"], record["exc"] = example, exc
            if record["first_failure"] is None:
                record["first_failure"] = time.perf_counter()
            raise

    wrapped = ctx.settings(max_examples)(given(strategy)(test))
    start = time.perf_counter()
    try:
        wrapped()
    except HypothesisException as exc:  # e.g. unsatisfiable: a harness problem, not a verdict
        return PropertyResult(name, FAIL, None, f"harness: {type(exc).__name__}: {exc}", needs,
                              record["n"], time.perf_counter() - start)
    except Exception:
        exc = record.get("exc")
        message = _message(exc)
        example = record.get("example")
        text = describe(example) if example is not None else None
        if text is not None and record["timed_out"]:
            text += (f" (shrinking stopped by the {ctx.shrink_seconds:g} s time cap: a rerun may "
                     f"print another example)")
        return PropertyResult(name, FAIL, text, message, needs, record["n"],
                              time.perf_counter() - start)
    return PropertyResult(name, PASS, None, None, needs, record["n"], time.perf_counter() - start)


def _message(exc: BaseException | None) -> str:
    if exc is None:
        return "failed (no detail recorded)"
    if isinstance(exc, AssertionError):
        return str(exc)
    return f"the adapter raised {type(exc).__name__}: {exc}"


def not_provided(name: str, needs: tuple[str, ...]) -> PropertyResult:
    return PropertyResult(name, NOT_PROVIDED, needs=needs)
