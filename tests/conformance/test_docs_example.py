"""The ~30-line adapter of docs/conformance.md works as printed."""

import re
from pathlib import Path

from fisher_ref.conformance.runner import run_conformance
from tests.conformance.mutants.collector import FisherCollector, qkov_mask

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


class MyFisherCollector(FisherCollector):
    """The collector the docs assume: dict-of-dicts contributions, a head_mask method."""

    def mean_grad(self):
        return {n: s / self.count for n, s in self.sum_g.items()}

    def contributions(self):
        ids, tensors = super().contributions()
        return {sid: {n: t[k] for n, t in tensors.items()} for k, sid in enumerate(ids)}

    def head_mask(self, layer, head, block):
        return qkov_mask(self.model, layer, head, block)


def _doc_adapter():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "class MyAdapter" in b]
    assert len(code.strip().splitlines()) <= 35
    namespace = {"MyFisherCollector": MyFisherCollector}
    exec(code.replace("from my_project.fisher import MyFisherCollector\n", ""), namespace)
    return namespace["MyAdapter"]()


def test_documented_adapter_passes_what_it_provides():
    report = run_conformance(_doc_adapter(), properties=[
        "empirical_fisher_agreement", "squared_mean_gradient_agreement", "split_invariance",
        "contributions_keyed_by_ids", "slices_semantic", "interference_agreement"])
    assert report.passed, report.table()
    assert report.verdict("interference_agreement") == "not provided"
