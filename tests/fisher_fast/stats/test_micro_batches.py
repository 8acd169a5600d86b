"""batch_squared_gradient's streaming state against its definition, for any slicing."""

import pytest
import torch

from fisher_fast.stats.micro_batches import MicroBatchState
from fisher_ref.testing.tolerances import tolerance

REORDER = dict(zip(("rtol", "atol"), tolerance("float64-reorder")))


def _definition(g, w, b):
    total = 0.0
    for s in range(0, len(w), b):
        gs, ws = g[s:s + b], w[s:s + b]
        total = total + (ws[:, None] * gs).sum(0) ** 2 / ws.sum()
    return total / w.sum()


@pytest.mark.parametrize("b", [1, 2, 3, 7])
@pytest.mark.parametrize("cuts", [(7,), (1, 6), (2, 2, 3), (3, 1, 3)], ids=str)
def test_any_slicing_gives_the_definition(b, cuts):
    g = torch.randn(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(b))
    w = torch.arange(1.0, 8.0, dtype=torch.float64)
    state, start = MicroBatchState.zeros(b, (2,), torch.float64, "cpu"), 0
    for n in cuts:
        state, start = state.add(g[start:start + n], w[start:start + n]), start + n
    torch.testing.assert_close(state.value(w.sum()), _definition(g, w, b), **REORDER)


def test_b1_is_fisher_and_large_b_is_squared_mean():
    g = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    w = torch.ones(2, dtype=torch.float64)
    f = MicroBatchState.zeros(1, (1,), torch.float64, "cpu").add(g, w).value(w.sum())
    s = MicroBatchState.zeros(5, (1,), torch.float64, "cpu").add(g, w).value(w.sum())
    assert float(f) == (1 + 9) / 2 and float(s) == 2.0 ** 2
