"""fisher_fast.attention_layout: detection per architecture, declared layouts, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fisher_fast.attention.layouts import attention_layout
from fisher_ref.testing.models import TinyConfig, build_model

# arch config -> (packing, orientation, H, H_kv, head_dim, q-weight suffix), derived by hand
# from the HF sources: GPT-2 c_attn is Conv1D [d, 3d]; NeoX rows are [H, 3, dh]; Phi-3 rows
# are [Q; K; V]; LLaMA-family head_dim comes from the config (3 here, not d/H = 2).
CASES = [
    (TinyConfig(arch="gpt2"), ("fused_blocks", "conv1d", 2, 2, 4, "attn.c_attn.weight")),
    (TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=3, hidden=8),
     ("separate", "linear", 4, 2, 3, "self_attn.q_proj.weight")),
    (TinyConfig(arch="mistral", num_heads=4, num_kv_heads=1, head_dim=2),
     ("separate", "linear", 4, 1, 2, "self_attn.q_proj.weight")),
    (TinyConfig(arch="qwen2", num_heads=2, num_kv_heads=1, head_dim=4),
     ("separate", "linear", 2, 1, 4, "self_attn.q_proj.weight")),
    (TinyConfig(arch="bert"), ("separate", "linear", 2, 2, 4, "attention.self.query.weight")),
    (TinyConfig(arch="gpt_neox"), ("fused_per_head", "linear", 2, 2, 4, "attention.query_key_value.weight")),
    (TinyConfig(arch="phi3", num_heads=4, num_kv_heads=2, head_dim=2),
     ("fused_blocks", "linear", 4, 2, 2, "self_attn.qkv_proj.weight")),
]


@pytest.mark.parametrize("cfg,expected", CASES, ids=[c.make_id() for c, _ in CASES])
def test_detected_layout(cfg, expected):
    model = build_model(cfg)
    lay = attention_layout(model)
    packing, orientation, H, kv, dh, q_suffix = expected
    assert lay.num_layers == cfg.num_layers
    for i, la in enumerate(lay.layers):
        assert (la.index, la.packing, la.orientation) == (i, packing, orientation)
        assert (la.num_heads, la.num_kv_heads, la.head_dim) == (H, kv, dh)
        assert la.q.endswith(f"{i}.{q_suffix}")
        params = dict(model.named_parameters())
        assert {la.q, la.k, la.v, la.o} <= set(params)


def test_qwen2_biases_and_llama_none():
    qwen = attention_layout(build_model(TinyConfig(arch="qwen2"))).layers[0]
    llama = attention_layout(build_model(TinyConfig(arch="llama"))).layers[0]
    assert qwen.q_bias.endswith("q_proj.bias") and qwen.o_bias is None
    assert llama.q_bias is None and llama.k_bias is None and llama.o_bias is None


def _declared(lay):
    return {"layers": [{f.name: getattr(la, f.name) for f in dataclasses.fields(la)
                        if f.name not in ("index", "kind")} for la in lay.layers]}


def test_declared_layout_round_trip():
    model = build_model(TinyConfig(arch="phi3", num_heads=4, num_kv_heads=2, head_dim=2))
    lay = attention_layout(model)
    declared = attention_layout(model, _declared(lay))
    assert declared.kind == "declared"
    assert [dataclasses.replace(la, kind="phi3") for la in declared.layers] == list(lay.layers)


def _bad_declared(**change):
    model = build_model(TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=3, hidden=8))
    d = _declared(attention_layout(model))
    d["layers"][0].update(change)
    return model, d


def _same_qkv():
    model, d = _bad_declared()
    la = d["layers"][0]
    la.update(k=la["q"], v=la["q"], num_kv_heads=la["num_heads"])  # shapes fit: only Q = K = V is wrong
    return model, d


def _call(model_and_layout):
    model, layout = model_and_layout
    attention_layout(model, layout)


BAD = [
    pytest.param(lambda: attention_layout(torch.nn.Sequential(torch.nn.Linear(2, 2))),
                 "Declare it", id="unsupported-model"),
    pytest.param(lambda: _call(_bad_declared(head_dim=2)), "shape mismatch", id="wrong-head-dim"),
    pytest.param(lambda: _call(_bad_declared(num_kv_heads=4)), "shape mismatch", id="wrong-kv-heads"),
    pytest.param(lambda: _call(_bad_declared(num_kv_heads=3)), "multiple of num_kv_heads", id="kv-not-divisor"),
    pytest.param(lambda: _call(_bad_declared(packing="fused")), "packing expected", id="unknown-packing"),
    pytest.param(lambda: _call(_bad_declared(q="nope.weight")), "expected a parameter", id="unknown-name"),
    pytest.param(lambda: _call(_bad_declared(extra=1)), "unknown ['extra']", id="unknown-key"),
    pytest.param(lambda: _call(_bad_declared(module="no.such.module")), "module path", id="unknown-module"),
    pytest.param(lambda: _call(_bad_declared(packing="fused_blocks")), "q == k == v", id="fused-needs-one-tensor"),
    pytest.param(lambda: _call(_bad_declared(orientation="conv1d")), "shape mismatch", id="wrong-orientation"),
    pytest.param(lambda: _call(_same_qkv()), "three distinct q, k, v tensors", id="separate-q-is-k"),
    pytest.param(lambda: attention_layout(build_model(TinyConfig(arch="gpt2")), {"layers": [], "x": 1}),
                 "one key 'layers'", id="unknown-top-key"),
]


@pytest.mark.parametrize("fn,message", BAD)
def test_bad_input(fn, message):
    with pytest.raises(ValueError, match=None) as err:
        fn()
    assert message in str(err.value)


@pytest.mark.parametrize("cfg", [
    TinyConfig(arch="gpt2", extra=(("add_cross_attention", True),)),
    TinyConfig(arch="bert", extra=(("add_cross_attention", True), ("is_decoder", True))),
], ids=["gpt2-cross", "bert-cross"])
def test_cross_attention_is_skipped(cfg):
    # the layout holds each block's self-attention only: layer l is block l (the oracle's too)
    import fisher_ref as fr

    model = build_model(cfg)
    lay = attention_layout(model)
    assert len(lay.layers) == cfg.num_layers
    assert all("cross" not in la.module for la in lay.layers)
    assert [la.module for la in lay.layers] == [la.module for la in fr.attention_layout(model).layers]
