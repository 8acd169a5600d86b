"""The gallery: BackPACK, Opacus, curvlinops, nngeometry and laplace-torch pass what they
provide on the classifiers they support (the ``peers`` extra; skipped without it), and a
summed convention passes only when declared.
"""

import pytest

from fisher_ref.conformance.runner import run_conformance
from fishercheck.adapters.gallery import PEERS, adapter_of, available, convention_check

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("library", list(PEERS))
def test_peer_passes_what_it_provides(library):
    if not available(library):
        pytest.skip(f"{library} is not installed (the peers extra)")
    report = run_conformance(adapter_of(library), profile="quick")
    assert report.passed, report.table()


@pytest.mark.parametrize("library", [lib for lib in PEERS
                                     if getattr(adapter_of(lib) if available(lib) else None,
                                                "unit_reduction", "mean") == "sum"])
def test_a_summed_convention_fails_unless_declared(library):
    (result,) = convention_check(library, "mean").results
    assert result.verdict == "fail"
    assert "× n_units" in result.diagnosis, result.diagnosis
