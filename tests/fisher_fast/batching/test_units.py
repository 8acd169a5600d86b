"""Units: ids, weights and dropped empty rows (docs/architecture.md)."""

import math

import torch

import fisher_fast as ff
from fisher_fast.batching.units import plan_units, with_classes, with_draws

BATCH = {"input_ids": torch.zeros(3, 4, dtype=torch.long),
         "labels": torch.tensor([[1, 1, -100, 1], [-100] * 4, [1, 1, 1, 1]])}


def test_sample_units_drop_empty_rows_and_weigh_by_tokens():
    u = plan_units(None, BATCH, ["a", "b", "c"], ff.causal_lm_loss, "sample", "token")
    assert u.ids == ["a", "c"] and u.empty_ids == ["b"]
    assert u.weights.tolist() == [2.0, 3.0]  # causal targets are labels[:, 1:]


def test_token_units_are_row_major_with_positions():
    u = plan_units(None, BATCH, ["a", "b", "c"], ff.causal_lm_loss, "token", "token")
    assert u.ids == [("a", 0), ("a", 2), ("c", 0), ("c", 1), ("c", 2)]
    assert u.weights.tolist() == [1.0] * 5


def test_expansions_are_unit_major():
    u = plan_units(None, BATCH, [0, 1, 2], ff.causal_lm_loss, "sample", "sample")
    d = with_draws(u, 2)
    assert d.rows.tolist() == [0, 0, 2, 2] and d.draw.tolist() == [0, 1, 0, 1]
    t = with_classes(plan_units(None, BATCH, [0, 1, 2], ff.causal_lm_loss, "token", "sample"), 3)
    assert t.cls.tolist()[:6] == [0, 1, 2, 0, 1, 2] and t.pos.tolist()[:6] == [0, 0, 0, 2, 2, 2]


def test_draw_layout_blocks_of_draws_by_hand():
    from fisher_fast.batching.units import Units, draw_layout, unshared, with_shared_draws

    units = with_shared_draws(Units("sample", torch.tensor([0, 1]), torch.tensor([1.0, 2.0]),
                                    ["a", "b"], []), 3)
    # U = 2, K = 3, a chunk of 4 rows: r = min(3, 4 // 2) = 2 rows per unit, q = 2 draws each
    laid = draw_layout(units, rows_per_chunk=4, rows_per_pass=100)
    assert laid.rows.tolist() == [0, 0, 1, 1] and laid.draw.tolist() == [0, 2, 0, 2]
    assert laid.n_draws == 2 and laid.ids == ["a", "a", "b", "b"]
    # the second block of each unit holds draw 2 and an empty slot (index 3 >= K): weight 0
    assert laid.draw_weights().tolist() == [[1, 1], [1, 0], [2, 2], [2, 0]]
    flat = unshared(laid)
    assert flat.rows.tolist() == [0, 0, 0, 1, 1, 1] and flat.draw.tolist() == [0, 1, 2] * 2
    # one row per unit when passes are already full; every draw its own row when tiny
    assert draw_layout(units, 4, rows_per_pass=1).n_draws == 3
    assert draw_layout(units, 100, rows_per_pass=100).draw.tolist() == [0, 1, 2] * 2


def test_draw_layout_of_enumerated_classes_by_hand():
    from fisher_fast.batching.units import Units, draw_layout, unshared, with_shared_classes

    units = with_shared_classes(Units("token", torch.tensor([0, 1]), torch.ones(2, dtype=torch.float64),
                                      [("a", 0), ("b", 1)], [], pos=torch.tensor([0, 1])), 3)
    laid = draw_layout(units, rows_per_chunk=2, rows_per_pass=100)  # one row per token, 3 classes
    assert laid.classes and laid.n_draws == 3 and laid.draw.tolist() == [0, 0]
    flat = unshared(laid)  # the classes become `cls`, one row per (token, class), no draws
    assert flat.cls.tolist() == [0, 1, 2] * 2 and flat.draw is None and not flat.classes
    assert flat.pos.tolist() == [0, 0, 0, 1, 1, 1]
    # tiny models: one forward row per (token, class), as with_classes lays them
    tiny = draw_layout(units, rows_per_chunk=100, rows_per_pass=100)
    assert tiny.cls.tolist() == [0, 1, 2] * 2 and tiny.draw is None and not tiny.n_draws


def test_shared_class_losses_are_each_class_nll_weighted_by_its_probability():
    from fisher_fast.batching.row_losses import shared_class_losses
    from fisher_fast.batching.units import Units, draw_layout, with_shared_classes

    logits = torch.randn(2, 3, 3, dtype=torch.float64)
    weights = torch.tensor([1.0, 1.0], dtype=torch.float64)
    units = with_shared_classes(Units("token", torch.tensor([0, 1]), weights,
                                      [("a", 2), ("b", 0)], [], pos=torch.tensor([2, 0])), 3)
    # 2 rows per token carrying 2 classes each: (0, 1) and (2, an empty slot of weight 0)
    laid = draw_layout(units, rows_per_chunk=4, rows_per_pass=4)
    assert laid.n_draws == 2 and laid.draw.tolist() == [0, 2, 0, 2]
    nll, w = shared_class_losses(logits[laid.rows], laid)
    for j, (row, pos, first) in enumerate(zip(laid.rows, laid.pos, laid.draw)):
        probs = [float(v) for v in torch.softmax(logits[row, pos], -1)]
        for k in range(2):
            c = int(first) + k
            if c >= 3:
                assert float(w[j, k]) == 0.0
                continue
            assert abs(float(nll[j, k]) + math.log(probs[c])) < 1e-12
            assert abs(float(w[j, k]) - probs[c]) < 1e-12
