"""Main-job helpers, checked on hand-made numbers and on the slices' masks."""

import numpy as np
import pytest
import torch

import fisher_fast
from fisher_ref.testing.models import TinyConfig, build_model
from fishercheck.mainjob import (
    BLOCKS,
    FLOOR,
    block_label,
    head_groups,
    parameter_blocks,
    per_layer,
    relative_difference,
    untestable_note,
)


@pytest.mark.parametrize("arch, name, label", [
    ("gpt2", "transformer.wte.weight", "embeddings"),
    ("gpt2", "transformer.wpe.weight", "embeddings"),
    ("gpt2", "transformer.h.1.attn.c_attn.weight", "layer 1"),
    ("gpt2", "transformer.h.0.mlp.c_proj.bias", "layer 0"),
    ("gpt2", "transformer.ln_f.bias", "final/head"),
    ("llama", "model.embed_tokens.weight", "embeddings"),
    ("llama", "model.layers.1.mlp.down_proj.weight", "layer 1"),
    ("llama", "model.norm.weight", "final/head"),
    ("bert", "bert.embeddings.LayerNorm.weight", "embeddings"),
    ("bert", "bert.encoder.layer.0.output.dense.weight", "layer 0"),
    ("gpt_neox", "gpt_neox.layers.1.attention.query_key_value.weight", "layer 1"),
    ("gpt_neox", "gpt_neox.final_layer_norm.bias", "final/head"),
    ("gpt_neox", "lm_head.weight", "final/head"),
    ("bert", "cls.predictions.decoder.bias", "final/head"),
])
def test_parameter_blocks_follow_the_module_tree(arch, name, label):
    model = build_model(TinyConfig(arch=arch, num_layers=2, tie_embeddings=False))
    blocks = parameter_blocks(model, fisher_fast.attention_layout(model))
    assert set(blocks) == {n for n, _ in model.named_parameters()}
    assert block_label(blocks[name], 2) == label


def test_per_layer_sums_and_ratio():
    F = {"wte": torch.tensor([[4.0]]), "h.0.a": torch.tensor([1.0, 3.0]), "h.0.b": torch.tensor([2.0]),
         "ln_f": torch.tensor([1.0])}
    S = {"wte": torch.tensor([[1.0]]), "h.0.a": torch.tensor([0.5, 0.5]), "h.0.b": torch.tensor([1.0]),
         "ln_f": torch.tensor([0.0])}
    blocks = {"wte": -1, "h.0.a": 0, "h.0.b": 0, "ln_f": 1}
    assert per_layer(F, S, blocks, n_layers=1) == [
        {"layer": "embeddings", "E_g2": 4.0, "Eg_2": 1.0, "ratio": 4.0},
        {"layer": "layer 0", "E_g2": 6.0, "Eg_2": 2.0, "ratio": 3.0},
        {"layer": "final/head", "E_g2": 1.0, "Eg_2": 0.0, "ratio": float("inf")},
    ]


def test_per_layer_sums_in_model_order_whatever_the_dict_order():
    # 1 + 1e16 - 1e16 is 0 in float64 in this order and 1 in the reverse one: a state loaded
    # from a file (another dict order) must give the same report as the one in memory
    blocks = {"a": 0, "b": 0, "c": 0}
    F = {"a": torch.tensor([1.0], dtype=torch.float64), "b": torch.tensor([1e16], dtype=torch.float64),
         "c": torch.tensor([-1e16], dtype=torch.float64)}
    S = {k: v.clone() for k, v in F.items()}
    reversed_F = dict(reversed(list(F.items())))
    assert per_layer(reversed_F, S, blocks, 0) == per_layer(F, S, blocks, 0)
    assert per_layer(F, S, blocks, 0)[0]["E_g2"] == 0.0


@pytest.mark.parametrize("cfg", [
    TinyConfig(arch="gpt2", num_layers=2, num_heads=2),
    TinyConfig(arch="llama", num_layers=2, num_heads=4, num_kv_heads=2, attention_bias=True),
    TinyConfig(arch="gpt_neox", num_layers=1, num_heads=2),
    TinyConfig(arch="phi3", num_layers=1, num_heads=4, num_kv_heads=2),
], ids=lambda c: c.make_id())
def test_head_groups_equal_the_masked_sums_of_each_slice(cfg):
    # the main job's former computation: one qkov_mask per (layer, head, block), summed
    model = build_model(cfg)
    layout = fisher_fast.attention_layout(model)
    gen = torch.Generator().manual_seed(0)
    values = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    want = np.zeros((cfg.num_layers, cfg.num_heads, 4))
    for layer in range(cfg.num_layers):
        for h in range(cfg.num_heads):
            for b, block in enumerate(BLOCKS):
                masks = fisher_fast.qkov_mask(model, layer, h, block)
                want[layer, h, b] = sum(float(values[n].double()[m].sum()) for n, m in masks.items())
    np.testing.assert_allclose(head_groups(values, layout), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n_a, n_b, P, said", [
    (32, 32, 1000, []),  # testable: the note is empty
    (4, 4, 1000, []),  # 2 / C(8, 4) = 0.029 < 0.05
    (32, 32, 19, ["19 permutations cannot give a p-value below 1/(P + 1) = 0.05",
                  "--permutations 20 or more"]),
    (3, 4, 1000, []),  # 1 / C(7, 3) = 1/35 < 0.05
    (2, 3, 1000, ["2 + 3 rows have only C(5, 2) = 10 labellings, so the exact test's smallest "
                  "p-value is 0.1"]),
    (2, 2, 1000, ["2 + 2 rows have only C(4, 2) = 6 labellings (3 distinct splits",
                  "smallest p-value is 0.333 (use --pairs 4 or more)"]),
])
def test_untestable_note(n_a, n_b, P, said):
    note = untestable_note(n_a, n_b, P, 0.05)
    if not said:
        assert note == ""
    for phrase in said:
        assert phrase in note, note


def test_relative_difference_is_normwise():
    ref = {"a": torch.tensor([10.0, 0.0]), "b": torch.tensor([0.0])}
    fast = {"a": torch.tensor([10.5, 0.1]), "b": torch.tensor([0.2])}
    assert relative_difference(fast, ref) == pytest.approx(0.05)  # b: 0.2 / 10 (the overall scale)
    fast["b"] = torch.tensor([1.0])
    assert relative_difference(fast, ref) == pytest.approx(0.1)


def test_relative_difference_floors_a_parameter_float32_cannot_resolve():
    # a parameter whose Fisher is 0 in exact arithmetic: 1e-42 in the oracle, float32 noise
    # of 1e-25 in the fast path; below FLOOR x the largest value, so scaled by the largest
    ref = {"w": torch.tensor([2.0, 1.0]), "key_bias": torch.tensor([1e-42], dtype=torch.float64)}
    fast = {"w": torch.tensor([2.0, 1.0]), "key_bias": torch.tensor([1e-25], dtype=torch.float64)}
    assert relative_difference(fast, ref) == pytest.approx(1e-25 / 2.0)
    # a small parameter above the floor keeps its own scale
    ref["small"], fast["small"] = torch.tensor([1e-4]), torch.tensor([1.1e-4])
    assert relative_difference(fast, ref) == pytest.approx(0.1) and FLOOR < 1e-4 / 2.0


def test_main_job_retains_nothing_and_leaves_the_model_untouched():
    """Two tasks through the whole main job, three times: no fisher_fast object or tensor
    outlives a run, and the model has no hook left.
    """
    from fisher_ref.testing.batches import random_batch
    from fishercheck.mainjob import run
    from tests.fisher_fast.test_leaves_no_trace import _live_objects, model_state

    model = build_model(TinyConfig(arch="gpt2", num_layers=2, num_heads=2, head_dim=4))
    a, b = random_batch(batch_size=4, seed=0), random_batch(batch_size=4, seed=1)
    settings = dict(n_pairs=3, n_permutations=10, chunk_rows=2)
    run(model, a, b, **settings)
    state, live = model_state(model), _live_objects()
    for _ in range(3):
        run(model, a, b, **settings)
    assert _live_objects() == live
    assert model_state(model) == state
