"""Generic groups of docs/architecture.md and the reduction f = R(g²)."""

import pytest
import torch

from fisher_fast.stats.groups import GroupSpec, generic_groups, group_ids_tensor, ids_spec, reduce_squares
from fisher_ref.testing.tolerances import tolerance
from tests.fisher_fast._fast_modules import TinyLM

ULPS = dict(zip(("rtol", "atol"), tolerance("float64-ulps")))


def _generic(model):
    """The default groups, from the roles the capture plan reads off the model."""
    from fisher_fast.capture.plan import build_plan

    plan = build_plan(model)
    return generic_groups(plan.params, plan.roles)


def test_generic_group_kinds_by_role():
    kinds = {n: s.kind for n, s in _generic(TinyLM()).items()}
    assert kinds["lin.weight"] == "rows" and kinds["emb.weight"] == "rows"
    assert kinds["conv.weight"] == "columns"
    assert kinds["lin.bias"] == kinds["ln.weight"] == kinds["rms.weight"] == "elements"
    assert kinds["scale.scale"] == "single"


def test_every_kind_reduces_like_its_explicit_ids():
    g = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    specs = {"rows": (3,), "columns": (4,), "elements": (12,), "single": (1,)}
    for kind, (n,) in specs.items():
        spec = GroupSpec(kind, n)
        explicit = ids_spec(group_ids_tensor(spec, (3, 4)), n)
        torch.testing.assert_close(reduce_squares(spec, g), reduce_squares(explicit, g), **ULPS)


def test_rows_by_hand():
    g = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]], dtype=torch.float64)
    assert reduce_squares(GroupSpec("rows", 2), g).tolist() == [[5.0, 9.0]]
    assert reduce_squares(GroupSpec("columns", 2), g).tolist() == [[10.0, 4.0]]


@pytest.mark.parametrize("kind", ["rows", "ids"])
def test_pairs_reduce_like_the_dense_rows(kind):
    from fisher_fast.stats.groups import GroupSpec, reduce_squares_pairs

    rows, cols = torch.tensor([0, 0, 2]), torch.tensor([1, 3, 1])
    values = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(3, 2)
    dense = torch.zeros(3, 4, 2, dtype=torch.float64)
    dense[rows, cols] = values
    spec = GroupSpec("rows", 4) if kind == "rows" else \
        GroupSpec("ids", 3, torch.tensor([[0, 1], [2, 0], [1, 1], [2, 2]]))
    got = reduce_squares_pairs(spec, rows, cols, values, 3, (4, 2))
    torch.testing.assert_close(got, reduce_squares(spec, dense), **ULPS)
