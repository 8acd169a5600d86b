"""The README and docs/cli.md are self-contained: every relative link names a file in the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)[^)]*\)|`(\.\./[^`]+)`")


@pytest.mark.parametrize("page", ["README.md", "docs/cli.md"])
def test_relative_links_stay_in_the_repository(page):
    path = ROOT / page
    targets = [a or b for a, b in LINK.findall(path.read_text())]
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "expected the page to link somewhere"
    for target in local:
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{page} links outside the repository: {target}"
        assert resolved.exists() or target.endswith(".png"), f"{page}: {target} does not exist"


def test_the_contract_is_in_docs():
    text = (ROOT / "README.md").read_text()
    assert "(docs/spec.md)" in text and "../shared" not in text
    assert (ROOT / "docs/spec.md").read_text().startswith("# fishercheck: the definitions")
