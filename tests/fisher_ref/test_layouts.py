"""attention_layout: detection per family, declared layouts, and clear errors."""

from dataclasses import asdict, replace

import pytest
import torch

from fisher_ref.layouts import AttentionLayout, attention_layout
from fisher_ref.testing.models import TinyConfig, build_model

# (config, kind, packing, orientation, H, H_kv, head_dim, q_bias?, o_bias?)
CASES = [
    (TinyConfig(arch="gpt2"), "gpt2", "fused_blocks", "conv1d", 2, 2, 4, True, True),
    (TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=2, hidden=12,
                attention_bias=True), "llama", "separate", "linear", 4, 2, 2, True, True),
    (TinyConfig(arch="mistral", num_heads=4, num_kv_heads=2), "mistral", "separate", "linear",
     4, 2, 4, False, False),
    (TinyConfig(arch="qwen2", num_heads=4, num_kv_heads=1), "qwen2", "separate", "linear",
     4, 1, 4, True, False),
    (TinyConfig(arch="bert"), "bert", "separate", "linear", 2, 2, 4, True, True),
    (TinyConfig(arch="gpt_neox"), "gpt_neox", "fused_per_head", "linear", 2, 2, 4, True, True),
    (TinyConfig(arch="phi3", num_heads=4, num_kv_heads=2), "phi3", "fused_blocks", "linear",
     4, 2, 4, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0].make_id())
def test_detects_family_heads_and_biases(case):
    cfg, kind, packing, orientation, H, kv, dh, q_bias, o_bias = case
    lay = attention_layout(build_model(cfg))
    assert lay.kind == kind and lay.num_layers == cfg.num_layers
    for layer, la in enumerate(lay.layers):
        assert (la.index, la.packing, la.orientation) == (layer, packing, orientation)
        assert (la.num_heads, la.num_kv_heads, la.head_dim) == (H, kv, dh)
        assert (la.q_bias is not None, la.o_bias is not None) == (q_bias, o_bias)


def test_llama_names_and_modules_are_full_paths():
    lay = attention_layout(build_model(TinyConfig(arch="llama")))
    la = lay.layer(1)
    assert la.q == "model.layers.1.self_attn.q_proj.weight"
    assert la.v == "model.layers.1.self_attn.v_proj.weight"
    assert la.o == "model.layers.1.self_attn.o_proj.weight"
    assert (la.module, la.o_module) == ("model.layers.1.self_attn", "model.layers.1.self_attn.o_proj")


def test_bert_uses_self_attention_and_output_dense():
    la = attention_layout(build_model(TinyConfig(arch="bert"))).layer(0)
    assert la.module == "bert.encoder.layer.0.attention.self"
    assert la.o == "bert.encoder.layer.0.attention.output.dense.weight"
    assert la.k_bias == "bert.encoder.layer.0.attention.self.key.bias"


def test_fused_layouts_name_one_tensor():
    la = attention_layout(build_model(TinyConfig(arch="gpt2"))).layer(0)
    assert la.q == la.k == la.v == "transformer.h.0.attn.c_attn.weight"
    assert la.o == "transformer.h.0.attn.c_proj.weight"


def _declared(lay):
    return {"layers": [{k: v for k, v in asdict(la).items() if k not in ("index", "kind")}
                       for la in lay.layers]}


@pytest.mark.parametrize("arch", ["gpt2", "phi3"])
def test_declared_dict_reproduces_detection(arch):
    model = build_model(TinyConfig(arch=arch))
    detected = attention_layout(model)
    declared = attention_layout(model, _declared(detected))
    assert declared.kind == "declared"
    assert ([replace(la, kind="x") for la in declared.layers]
            == [replace(la, kind="x") for la in detected.layers])


def test_layout_object_passes_through():
    model = build_model(TinyConfig(arch="bert"))
    lay = attention_layout(model)
    assert attention_layout(model, lay) == lay


def test_declared_biases_may_be_omitted():
    model = build_model(TinyConfig(arch="mistral", num_layers=1))
    entry = {k: v for k, v in _declared(attention_layout(model))["layers"][0].items() if "bias" not in k}
    la = attention_layout(model, {"layers": [entry]}).layer(0)
    assert (la.q_bias, la.o_bias) == (None, None)


class SelfAttention(torch.nn.Module):
    """An attention module of no supported family (one `qkv` Linear, no known names)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = SelfAttention()


def _llama_declared(**change):
    model = build_model(TinyConfig(arch="llama", num_layers=1, num_heads=4, num_kv_heads=2,
                                   head_dim=2, hidden=12))
    layout = _declared(attention_layout(model))
    layout["layers"][0].update(change)
    return model, layout


def _gpt2_declared(**change):
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    layout = _declared(attention_layout(model))
    layout["layers"][0].update(change)
    return model, layout


BAD = [
    pytest.param(lambda: attention_layout(_Toy()), "declare the layout", id="unsupported-model"),
    pytest.param(lambda: attention_layout(torch.nn.Linear(2, 2)), "no attention-like module",
                 id="no-attention"),
    pytest.param(lambda: attention_layout(*_llama_declared(head_dim=3)),
                 "expected a 2-D linear weight with 12 outputs", id="head_dim-d/H-shape"),
    pytest.param(lambda: attention_layout(*_llama_declared(num_kv_heads=4)),
                 "with 8 outputs", id="kv-heads-shape"),
    pytest.param(lambda: attention_layout(*_llama_declared(num_kv_heads=3)),
                 "multiple of num_kv_heads", id="kv-not-divisor"),
    pytest.param(lambda: attention_layout(*_llama_declared(q="model.layers.0.self_attn.q_proj.W")),
                 "expected a parameter name of the model", id="unknown-parameter"),
    pytest.param(lambda: attention_layout(*_llama_declared(o_module="model.nope")),
                 "module path", id="unknown-module"),
    pytest.param(lambda: attention_layout(*_llama_declared(packing="fused")),
                 "packing: expected one of", id="unknown-packing"),
    pytest.param(lambda: attention_layout(*_llama_declared(packing="fused_blocks")),
                 "q == k == v", id="fused-with-three-tensors"),
    pytest.param(lambda: attention_layout(*_gpt2_declared(orientation="linear")),
                 "expected a 2-D linear weight with 24 outputs", id="gpt2-as-linear"),
    pytest.param(lambda: attention_layout(*_gpt2_declared(nheads=2)), "unknown ['nheads']",
                 id="unknown-key"),
    pytest.param(lambda: attention_layout(build_model(TinyConfig(arch="gpt2")), {"layers": []}),
                 "non-empty list", id="no-layers"),
    pytest.param(lambda: attention_layout(build_model(TinyConfig(arch="gpt2"))).layer(2),
                 "expected an integer in [0, 2), got 2", id="layer-out-of-range"),
]


@pytest.mark.parametrize("call, message", BAD)
def test_bad_input(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_kv_head_follows_repeat_kv():
    lay = attention_layout(build_model(TinyConfig(arch="qwen2", num_heads=4, num_kv_heads=2)))
    assert isinstance(lay, AttentionLayout)
    assert [lay.layer(0).kv_head(h) for h in range(4)] == [0, 0, 1, 1]


def test_unsupported_model_error_names_what_was_found():
    with pytest.raises(ValueError, match=r"attn \(SelfAttention\)"):
        attention_layout(_Toy())
