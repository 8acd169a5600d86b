"""Interference a tile at a time: equal to fisher_fast.interference and to the float64 oracle
on the whole matrix, whatever the tiles; the largest entries merged across tiles in order.
"""

import math

import pytest
import torch

import fisher_fast
import fisher_ref
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, build_model
from fishercheck.interference_blocks import (
    Scores,
    inverse_fisher,
    score_tile,
    slice_names,
    task_b_views,
)

CASES = [TinyConfig(arch="gpt2", num_layers=2, num_heads=2, head_dim=4),
         TinyConfig(arch="llama", num_layers=2, num_heads=4, num_kv_heads=2)]


def _tiled(model, a, b, fhat, layout, rows_a, rows_b):
    """Scores over tiles of ``rows_a`` x ``rows_b`` units."""
    names = list(fhat)
    ga = fisher_fast.per_sample_gradients(model, a, params=names)
    gb = fisher_fast.per_sample_gradients(model, b, params=names)
    inv = inverse_fisher(fhat, layout)
    scores = Scores(layout.num_layers, layout.layers[0].num_heads)
    for j0 in range(0, len(gb.ids), rows_b):
        views = task_b_views({n: t[j0:j0 + rows_b] for n, t in gb.tensors.items()}, layout)
        for i0 in range(0, len(ga.ids), rows_a):
            ca = {n: t[i0:i0 + rows_a].square() for n, t in ga.tensors.items()}
            scores.add(score_tile(ca, inv, views, layout), i0, j0)
    return scores.summary(ga.ids, gb.ids)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: c.make_id())
@pytest.mark.parametrize("rows_a, rows_b", [(9, 7), (2, 3), (1, 1)])
def test_tiles_give_fisher_fast_interference(cfg, rows_a, rows_b):
    model = build_model(cfg)
    a, b = random_batch(batch_size=9, seed=0), random_batch(batch_size=7, seed=1)
    layout = fisher_fast.attention_layout(model)
    F = fisher_fast.empirical_fisher(model, a)
    fhat = {n: F[n] for n in slice_names(layout)}
    got = _tiled(model, a, b, fhat, layout, rows_a, rows_b)
    want = fisher_fast.interference(model, a, b, fisher=fhat, top_k=10)
    for block in "QKVO":
        torch.testing.assert_close(torch.tensor(got["means"][block], dtype=torch.float64),
                                   want.means[block].double(), rtol=1e-6, atol=0)
    assert [(t["id_a"], t["id_b"], t["layer"], t["head"], t["block"]) for t in got["top"]] == \
        [(t["id_a"], t["id_b"], t["layer"], t["head"], t["block"]) for t in want.top_k]
    torch.testing.assert_close(torch.tensor([t["score"] for t in got["top"]]),
                               torch.tensor([t["score"] for t in want.top_k]), rtol=1e-6, atol=0)


def test_tiles_give_the_oracle_in_float64():
    model = build_model(CASES[1]).double()
    a, b = random_batch(batch_size=5, seed=2), random_batch(batch_size=4, seed=3)
    layout = fisher_fast.attention_layout(model)
    F = fisher_ref.empirical_fisher(model, a)
    fhat = {n: F[n] for n in slice_names(layout)}
    names = list(fhat)
    ga = fisher_fast.per_sample_gradients(model, a, params=names, dtype=torch.float64)
    gb = fisher_fast.per_sample_gradients(model, b, params=names, dtype=torch.float64)
    tile = score_tile({n: t.square() for n, t in ga.tensors.items()}, inverse_fisher(fhat, layout),
                      task_b_views(gb.tensors, layout), layout)                # [4, L, H, N_A, N_B]
    want = fisher_ref.interference(model, a, b, fisher=fhat)
    for k, block in enumerate("QKVO"):
        torch.testing.assert_close(tile[k].permute(2, 3, 0, 1), want[block].double(), rtol=1e-10,
                                   atol=0)


def _tile(values):
    """A tile [4, 1, 1, 2, 2] with ``values`` in block Q, zeros elsewhere."""
    t = torch.zeros(4, 1, 1, 2, 2)
    t[0, 0, 0] = torch.tensor(values)
    return t


def test_the_largest_entries_merge_across_tiles_in_order():
    # block Q of one layer and head: a [2, 2] tile at (0, 0) and one at (0, 2); ties keep
    # (i, j) order over the whole matrix (i first, as fisher_fast flattens it), nan comes last
    scores = Scores(1, 1, top=5)
    scores.add(_tile([[3.0, 1.0], [5.0, float("nan")]]), 0, 0)
    scores.add(_tile([[5.0, 2.0], [0.5, 3.0]]), 0, 2)
    got = [(s, b, i, j) for s, b, _, _, i, j in scores.top]
    assert got == [(5.0, 0, 0, 2), (5.0, 0, 1, 0), (3.0, 0, 0, 0), (3.0, 0, 1, 3), (2.0, 0, 0, 3)]
    assert math.isnan(scores.sums[0, 0, 0]) and scores.sums[1:].eq(0).all()
    nan_last = Scores(1, 1, top=16)
    nan_last.add(_tile([[3.0, 1.0], [5.0, float("nan")]]), 0, 0)
    assert math.isnan(nan_last.top[-1][0]) and nan_last.top[-1][1:] == (0, 0, 0, 1, 1)


def test_a_tile_scores_round_trip_through_plain_data():
    scores = Scores(2, 3)
    scores.add(torch.rand(4, 2, 3, 4, 5, generator=torch.Generator().manual_seed(0)), 10, 20)
    again = Scores.from_data(scores.to_data())
    assert torch.equal(again.sums, scores.sums) and again.top == scores.top
