"""Chunk sizes from a memory budget."""

import torch

from fisher_fast.chunking import default_budget, rows_per_chunk
from tests.fisher_fast._fast_modules import TinyLM, tiny_batch


def test_budget_bounds_the_chunk():
    model, batch = TinyLM(), tiny_batch(B=4)
    assert rows_per_chunk(model, batch, budget=1, n_units=4) == 1
    assert rows_per_chunk(model, batch, budget=2**40, n_units=4) == 4
    mid = rows_per_chunk(model, batch, budget=2**17, n_units=1000)
    assert 1 < mid < 1000


def test_cpu_budget_is_positive():
    assert default_budget(torch.device("cpu")) > 0
