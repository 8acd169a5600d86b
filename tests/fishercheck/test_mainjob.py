"""Main-job helpers, checked on hand-made numbers."""

import pytest
import torch

from fishercheck.mainjob import FLOOR, layer_of, per_layer, relative_difference


@pytest.mark.parametrize("name, layer", [
    ("transformer.wte.weight", "embeddings"),
    ("model.embed_tokens.weight", "embeddings"),
    ("transformer.h.1.attn.c_attn.weight", "layer 1"),
    ("model.layers.12.mlp.down_proj.weight", "layer 12"),
    ("transformer.ln_f.bias", "final/head"),
])
def test_layer_of(name, layer):
    assert layer_of(name) == layer


def test_per_layer_sums_and_ratio():
    F = {"transformer.h.0.a": torch.tensor([1.0, 3.0]), "transformer.h.0.b": torch.tensor([2.0]),
         "transformer.wte.weight": torch.tensor([[4.0]])}
    S = {"transformer.h.0.a": torch.tensor([0.5, 0.5]), "transformer.h.0.b": torch.tensor([1.0]),
         "transformer.wte.weight": torch.tensor([[1.0]])}
    assert per_layer(F, S) == [
        {"layer": "embeddings", "E_g2": 4.0, "Eg_2": 1.0, "ratio": 4.0},
        {"layer": "layer 0", "E_g2": 6.0, "Eg_2": 2.0, "ratio": 3.0},
    ]


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
    from fisher_ref.testing.models import TinyConfig, build_model
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
