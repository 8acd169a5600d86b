"""The conformance report: a table for people, JSON for machines."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field

from fisher_ref.conformance.engine import FAIL, NOT_PROVIDED, PASS, PropertyResult


@dataclass
class ConformanceReport:
    """Verdicts of one adapter. ``passed``: no property failed and at least one passed ("not
    provided" is no pass, so a run where nothing was provided does not pass a gate).
    """

    adapter: str
    profile: str
    results: list[PropertyResult]
    provided: tuple[str, ...] = ()
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Nothing failed and at least one property passed."""
        return not self.failures() and any(r.verdict == PASS for r in self.results)

    def failures(self) -> list[PropertyResult]:
        """The failed properties."""
        return [r for r in self.results if r.verdict == FAIL]

    def verdict(self, name: str) -> str:
        """The verdict of property ``name``."""
        for r in self.results:
            if r.name == name:
                return r.verdict
        raise ValueError(f"property: expected one of {[r.name for r in self.results]}, got {name!r}.")

    def counts(self) -> dict[str, int]:
        """How many properties passed, failed, and were not provided."""
        return {v: sum(r.verdict == v for r in self.results) for v in (PASS, FAIL, NOT_PROVIDED)}

    def to_dict(self) -> dict:
        """The report as JSON-ready data."""
        return {"adapter": self.adapter, "profile": self.profile, "passed": self.passed,
                "counts": self.counts(), "provided": list(self.provided),
                "seconds": round(self.seconds, 2), "meta": self.meta,
                "results": [r.to_dict() for r in self.results]}

    def to_json(self, path=None) -> str:
        """The report as JSON text, also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text + "\n")
        return text

    def table(self, width: int = 100) -> str:
        """The report as a fixed-width table (with diagnoses) for people."""
        return format_table(self, width)


def format_table(report: ConformanceReport, width: int = 100) -> str:
    """A fixed-width table: property, verdict, and for failures the message and the minimal
    counterexample underneath.
    """
    name_w = max([len("property")] + [len(r.name) for r in report.results]) + 2
    lines = [f"fishercheck conformance: {report.adapter} (profile {report.profile})",
             f"{'property':<{name_w}}{'verdict':<14}{'examples':>9}{'seconds':>9}",
             "-" * (name_w + 32)]
    for r in report.results:
        mark = {PASS: "pass", FAIL: "FAIL", NOT_PROVIDED: "not provided"}[r.verdict]
        lines.append(f"{r.name:<{name_w}}{mark:<14}{r.examples:>9}{r.seconds:>9.1f}")
        if r.verdict == FAIL:
            for label, text in (("why", r.message), ("minimal counterexample", r.counterexample)):
                if text:
                    lines += _wrap(label, text, width)
    c = report.counts()
    lines.append("-" * (name_w + 32))
    lines.append(f"{c[PASS]} passed, {c[FAIL]} failed, {c[NOT_PROVIDED]} not provided "
                 f"({report.seconds:.1f} s): {_overall(report)}")
    return "\n".join(lines)


def _overall(report: ConformanceReport) -> str:
    if report.passed:
        return "PASS"
    return "FAIL" if report.failures() else "FAIL (no property was provided: nothing was checked)"


def _wrap(label: str, text: str, width: int, max_lines: int = 8) -> list[str]:
    """``text`` under ``label``, each of its own lines wrapped separately (a message listing
    parameters keeps one parameter per line); at most ``max_lines`` source lines, the rest
    counted (the JSON report has the full text).
    """
    source = [line.strip() for line in text.splitlines() if line.strip()]
    shown = source[:max_lines]
    if len(source) > max_lines:
        shown.append(f"... ({len(source) - max_lines} more lines in the JSON report)")
    out = []
    for k, line in enumerate(shown):
        first = f"    {label}: " if k == 0 else "      "
        out.append(textwrap.fill(line, width, initial_indent=first, subsequent_indent="        ",
                                 break_on_hyphens=False))
    return out
