"""Chunk sizes from a memory budget."""

import torch

from fisher_fast.batching.chunk_sizes import default_budget, rows_per_chunk
from tests.fisher_fast._fast_modules import TinyLM, tiny_batch


def test_budget_bounds_the_chunk():
    model, batch = TinyLM(), tiny_batch(B=4)
    assert rows_per_chunk(model, batch, budget=1, n_units=4) == 1
    assert rows_per_chunk(model, batch, budget=2**40, n_units=4) == 4
    mid = rows_per_chunk(model, batch, budget=2**17, n_units=1000)
    assert 1 < mid < 1000


def test_cpu_budget_is_positive():
    assert default_budget(torch.device("cpu")) > 0


def test_tied_parameters_count_their_per_row_buffer():
    # TinyLM(tied=True), float64 (b = 8), T = 6, d = 4, V = 7. Widths: emb 4, pos 4,
    # lin 4 + 4, conv 4 + 7, out 4 + 7 -> 34 + 4 = 38; widest Linear output C = 7; the
    # tied emb.weight adds its per-row buffer V d = 28 elements:
    # per row = 4 * 8 * 6 * (38 + 3 * 7) + 8 * 28 = 11552 bytes; half the budget per chunk
    model, batch = TinyLM(tied=True), tiny_batch(B=4)
    assert rows_per_chunk(model, batch, budget=2 * 3 * 11552, n_units=100) == 3
    assert rows_per_chunk(model, batch, budget=2 * 3 * 11552 - 2, n_units=100) == 2


def test_chunks_are_balanced_within_the_budget():
    # per row 11552 bytes (above): a budget for 14 rows splits 16 units 8 + 8, 29 units
    # (three chunks) 10 + 10 + 9; never more rows than fit
    model, batch = TinyLM(tied=True), tiny_batch(B=4)
    budget = 2 * 14 * 11552
    assert rows_per_chunk(model, batch, budget=budget, n_units=16) == 8
    assert rows_per_chunk(model, batch, budget=budget, n_units=29) == 10
    assert rows_per_chunk(model, batch, budget=budget, n_units=14) == 14
    assert rows_per_chunk(model, batch, budget=budget, n_units=1) == 1


def test_cuda_budget_counts_the_allocators_unused_cache(monkeypatch):
    from fisher_fast.batching.chunk_sizes import available_bytes

    # 100 bytes free on the card, 50 reserved by torch of which 20 in use: 130 available
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100, 1000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20)
    assert available_bytes(torch.device("cuda")) == 130
