"""Running one property under Hypothesis and keeping its minimal counterexample.

A property body takes one drawn example and raises ``AssertionError`` (a definition is
broken) or any other exception (the adapter crashed); Hypothesis then shrinks the example.
Its final replay is the minimal failing example, so the last failure recorded here is the
one reported. A property may also pass

- ``cover(arch) -> strategy``: the example strategy restricted to one architecture; when the
  context asks for coverage, the smallest example of every architecture drawn is run first
  (``@example``), so that a profile of a few examples still meets each architecture once;
- ``diagnose(example, exc) -> str``: called once on the final (minimal) failure, it says what
  the implementation's result matches (:mod:`fisher_ref.conformance.diagnosis`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import example as explicit_example
from hypothesis.errors import HypothesisException, NoSuchExample

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
        diagnosis: for a failure, what the implementation's result matches (e.g.
            ``"matches squared_mean_gradient / n_tokens to 2e-07"``), or that nothing does.
    """

    name: str
    verdict: str
    counterexample: str | None = None
    message: str | None = None
    needs: tuple[str, ...] = ()
    examples: int = 0
    seconds: float = 0.0
    diagnosis: str | None = None

    def to_dict(self) -> dict:
        """The result as JSON-ready data."""
        return {"property": self.name, "verdict": self.verdict, "needs": list(self.needs),
                "counterexample": self.counterexample, "message": self.message,
                "diagnosis": self.diagnosis, "examples": self.examples,
                "seconds": round(self.seconds, 3)}


@dataclass
class Context:
    """What every property gets besides the adapter.

    Attributes:
        oracle: the reference adapter (``ReferenceAdapter`` over fisher_ref).
        max_examples: Hypothesis examples per property (before shrinking).
        archs: architectures drawn for models (both families).
        dtype: the dtype models are built in (the adapter's ``dtype``).
        units, weightings: the options the adapter's estimators support.
        row_reductions: the per-row loss reductions drawn.
        unit_reduction: ``"mean"`` or ``"sum"``, the adapter's estimators' convention.
        custom_loss: whether the adapter computes with any ``loss_fn`` it is given.
        size: ``"tiny"`` or ``"scale"`` (12 layers, 8 heads, 16+ rows; see ``cases``).
        cover: run the smallest example of every architecture first.
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
    row_reductions: tuple[str, ...] = ("mean",)
    unit_reduction: str = "mean"
    custom_loss: bool = True
    size: str = "tiny"
    cover: bool = False
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
            kind = "float64-paths" if config is None or not hasattr(config, "num_layers") \
                else float64_tolerance_kind(config)
            return tolerance(kind, torch.float64)
        return tolerance("float32-fisher", torch.float32)

    def close(self, config=None, quantity: str = "squares") -> dict:
        """``rtol``, ``atol`` and ``atol_scale`` for ``compare_dicts``: float64 as
        :meth:`tolerance`; float32 with an atol proportional to each tensor's largest value
        (rows ``float32-squares-scaled`` for sums of squares, ``float32-signed-scaled`` for
        quantities with cancellation such as (E[g])²), so that a 1e-8 ridge or float16
        flushing is caught where an absolute 1e-7 would hide it.
        """
        if self.dtype == torch.float64:
            rtol, atol = self.tolerance(config)
            return {"rtol": rtol, "atol": atol, "atol_scale": 0.0}
        kind = "float32-squares-scaled" if quantity == "squares" else "float32-signed-scaled"
        rtol, scale = tolerance(kind, torch.float32)
        return {"rtol": rtol, "atol": 0.0, "atol_scale": scale}

    def unit_scale(self, estimator: str, total_weight: float) -> float:
        """The factor between the adapter's convention and the SPEC's mean over units:
        1 for ``unit_reduction="mean"``; W for F-like sums and W² for S = (Σ w g)² under
        ``"sum"``.
        """
        if self.unit_reduction == "mean":
            return 1.0
        return total_weight ** 2 if estimator == "squared_mean_gradient" else total_weight

    def settings(self, max_examples: int | None = None) -> settings:
        """Hypothesis settings of the profile (deterministic unless ``derandomize=False``)."""
        n = self.max_examples if max_examples is None else max_examples
        return settings(max_examples=max(1, n), derandomize=self.derandomize, database=None,
                        deadline=None, print_blob=False, report_multiple_bugs=False,
                        suppress_health_check=list(HealthCheck))


def covering_examples(ctx: Context, key, cover) -> list:
    """The simplest example of each architecture of ``ctx.archs`` that ``cover(arch)`` can
    draw (``hypothesis.find``, derandomized; cached per property ``key``).
    """
    if not ctx.cover or cover is None:
        return []

    def compute():
        out = []
        # the generate phase only: Hypothesis tries the simplest choice sequence first, so the
        # first example found is the smallest (no shrinking, no explain phase: milliseconds)
        quiet = settings(database=None, derandomize=True, max_examples=50, deadline=None,
                         phases=(Phase.generate,), suppress_health_check=list(HealthCheck))
        for arch in ctx.archs:
            try:
                strategy = cover(arch)
            except ValueError:
                continue  # the property does not draw this architecture
            if strategy is None:
                continue
            try:
                out.append(find(strategy, lambda _: True, settings=quiet))
            except NoSuchExample:
                continue
        return out

    return ctx.memo(("cover", key), compute)


def run_property(name: str, needs: tuple[str, ...], strategy, body, describe, ctx: Context,
                 max_examples: int | None = None, cover=None, diagnose=None) -> PropertyResult:
    """Run ``body(example)`` on examples from ``strategy``; shrink and keep the minimal failure.

    ``describe(example) -> str`` renders an example for the report; ``cover`` and
    ``diagnose`` are described in the module docstring. Shrinking is bounded by
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

    wrapped = given(strategy)(test)
    for ex in reversed(covering_examples(ctx, name, cover)):
        wrapped = explicit_example(ex)(wrapped)
    wrapped = ctx.settings(max_examples)(wrapped)
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
        diagnosis = _diagnosis(diagnose, example, exc)
        return PropertyResult(name, FAIL, text, message, needs, record["n"],
                              time.perf_counter() - start, diagnosis)
    return PropertyResult(name, PASS, None, None, needs, record["n"], time.perf_counter() - start)


def _diagnosis(diagnose, example, exc) -> str | None:
    """``diagnose(example, exc)`` for a failed definition (not a crash); its own failure is
    reported in words, never raised.
    """
    if diagnose is None or example is None or not isinstance(exc, AssertionError):
        return getattr(exc, "diagnosis", None)
    if getattr(exc, "diagnosis", None):
        return exc.diagnosis
    try:
        return diagnose(example, exc)
    except Exception as err:  # the diagnosis is help, never a verdict
        return f"no diagnosis ({type(err).__name__}: {err})"


def _message(exc: BaseException | None) -> str:
    if exc is None:
        return "failed (no detail recorded)"
    if isinstance(exc, AssertionError):
        return str(exc)
    return f"the adapter raised {type(exc).__name__}: {exc}"


def not_provided(name: str, needs: tuple[str, ...]) -> PropertyResult:
    """The verdict of a property whose capabilities the adapter lacks."""
    return PropertyResult(name, NOT_PROVIDED, needs=needs)
