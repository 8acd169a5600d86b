"""The gallery: peer libraries checked by the conformance harness (the ``peers`` extra).

``run_gallery()`` runs the quick profile on every peer adapter whose library imports and
returns the markdown table of docs/conformance.md: per library, the properties it passed,
failed and did not provide. A library whose convention differs from the SPEC's passes once
its adapter declares the convention (``unit_reduction = "sum"`` for a summed loss);
``convention_check(spec)`` shows the other side: the same adapter declaring the SPEC's mean
fails, with the diagnosis naming the factor.
"""

from __future__ import annotations

import importlib

from fisher_ref.conformance.runner import run_conformance

PEERS = {
    "BackPACK": ("backpack", "fishercheck.adapters.backpack_adapter:BackPACKAdapter"),
    "Opacus": ("opacus", "fishercheck.adapters.opacus_adapter:OpacusAdapter"),
    "curvlinops": ("curvlinops", "fishercheck.adapters.curvlinops_adapter:CurvlinopsAdapter"),
    "nngeometry": ("nngeometry", "fishercheck.adapters.nngeometry_adapter:NNGeometryAdapter"),
    "laplace-torch": ("laplace", "fishercheck.adapters.laplace_adapter:LaplaceAdapter"),
}


def available(library: str) -> bool:
    """Whether the peer's library imports here."""
    try:
        importlib.import_module(PEERS[library][0])
    except ImportError:
        return False
    return True


def adapter_of(library: str):
    """A fresh adapter of the peer ``library``."""
    module, _, attr = PEERS[library][1].partition(":")
    return getattr(importlib.import_module(module), attr)()


def gallery_reports(profile: str = "quick") -> dict:
    """``{library: ConformanceReport}`` for every peer that imports."""
    return {lib: run_conformance(adapter_of(lib), profile=profile) for lib in PEERS if available(lib)}


def convention_check(library: str, declared: str = "mean"):
    """The peer's report with ``unit_reduction`` overridden (the SPEC's mean by default)."""
    adapter = adapter_of(library)
    adapter.unit_reduction = declared
    return run_conformance(adapter, profile="quick", properties=["empirical_fisher_agreement"])


def markdown_table(reports: dict) -> str:
    """The gallery table: library, what passed, what failed (with the diagnosis)."""
    lines = ["| library | passes | fails | architectures |", "|---|---|---|---|"]
    for lib, report in reports.items():
        passed = [r.name for r in report.results if r.verdict == "pass"]
        failed = [f"{r.name} ({r.diagnosis or r.message.splitlines()[0]})"
                  for r in report.results if r.verdict == "fail"]
        archs = ", ".join(getattr(adapter_of(lib), "architectures", ()) or ("all",))
        lines.append(f"| {lib} | {', '.join(passed) or '-'} | {'; '.join(failed) or 'none'} | {archs} |")
    return "\n".join(lines)


def run_gallery(profile: str = "quick") -> str:
    """The markdown table of every available peer's verdicts."""
    return markdown_table(gallery_reports(profile))
