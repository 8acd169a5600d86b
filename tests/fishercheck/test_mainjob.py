"""Main-job helpers, checked on hand-made numbers."""

import pytest
import torch

from fishercheck.mainjob import layer_of, per_layer, relative_difference


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
