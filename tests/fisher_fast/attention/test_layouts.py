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
    # issue #12: OPT/GPT-J name the output projection out_proj; Falcon's packing follows
    # new_decoder_architecture / multi_query; Bloom is [H, 3, dh] like NeoX
    (TinyConfig(arch="opt"), ("separate", "linear", 2, 2, 4, "self_attn.q_proj.weight")),
    (TinyConfig(arch="gptj"), ("separate", "linear", 2, 2, 4, "attn.q_proj.weight")),
    (TinyConfig(arch="falcon", num_heads=4, num_kv_heads=2),
     ("fused_grouped", "linear", 4, 2, 4, "self_attention.query_key_value.weight")),
    (TinyConfig(arch="falcon-mq", num_heads=4, head_dim=2),
     ("fused_blocks", "linear", 4, 1, 2, "self_attention.query_key_value.weight")),
    (TinyConfig(arch="falcon-rw"),
     ("fused_per_head", "linear", 2, 2, 4, "self_attention.query_key_value.weight")),
    (TinyConfig(arch="bloom"),
     ("fused_per_head", "linear", 2, 2, 4, "self_attention.query_key_value.weight")),
    (TinyConfig(arch="gemma", num_heads=4, num_kv_heads=1, head_dim=4, hidden=8),
     ("separate", "linear", 4, 1, 4, "self_attn.q_proj.weight")),
    (TinyConfig(arch="gemma2", num_heads=2, num_kv_heads=1, head_dim=6, hidden=8),
     ("separate", "linear", 2, 1, 6, "self_attn.q_proj.weight")),
    (TinyConfig(arch="qwen3", num_heads=4, num_kv_heads=2, head_dim=2, hidden=12),
     ("separate", "linear", 4, 2, 2, "self_attn.q_proj.weight")),
    (TinyConfig(arch="starcoder2", num_heads=4, num_kv_heads=2, head_dim=2),
     ("separate", "linear", 4, 2, 2, "self_attn.q_proj.weight")),
    (TinyConfig(arch="stablelm", num_heads=4, num_kv_heads=1),
     ("separate", "linear", 4, 1, 4, "self_attn.q_proj.weight")),
]
KINDS = {"opt": "opt", "gptj": "gptj", "falcon": "falcon", "falcon-mq": "falcon", "falcon-rw": "falcon",
         "bloom": "bloom", "gemma": "gemma", "gemma2": "gemma2", "qwen3": "qwen3",
         "starcoder2": "starcoder2", "stablelm": "stablelm"}


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
    assert lay.kind == KINDS.get(cfg.arch, lay.kind)


@pytest.mark.parametrize("cfg, biases", [
    (TinyConfig(arch="opt"), ("q_proj.bias", "out_proj.bias")),
    (TinyConfig(arch="opt", attention_bias=False), (None, None)),
    (TinyConfig(arch="starcoder2"), ("q_proj.bias", "o_proj.bias")),
    (TinyConfig(arch="stablelm", attention_bias=True), ("q_proj.bias", None)),  # o_proj has none
    (TinyConfig(arch="falcon", attention_bias=True), ("query_key_value.bias", "dense.bias")),
    (TinyConfig(arch="bloom"), ("query_key_value.bias", "dense.bias")),
    (TinyConfig(arch="gptj"), (None, None)),
], ids=lambda v: v.make_id() if isinstance(v, TinyConfig) else None)
def test_biases_of_new_families(cfg, biases):
    la = attention_layout(build_model(cfg)).layers[0]
    for got, suffix in zip((la.q_bias, la.o_bias), biases, strict=True):
        assert (got is None) if suffix is None else got.endswith(suffix)


def test_falcon_kv_heads_follow_its_forward():
    # FalconAttention.num_kv_heads: config.num_kv_heads in the new architecture, 1 for multi-query
    cases = {(("new_decoder_architecture", True),): ("fused_grouped", 2),
             (("new_decoder_architecture", False), ("multi_query", True)): ("fused_blocks", 1),
             (("new_decoder_architecture", False), ("multi_query", False)): ("fused_per_head", 4)}
    for extra, (packing, kv) in cases.items():
        cfg = TinyConfig(arch="falcon", num_layers=1, num_heads=4, num_kv_heads=2, extra=extra)
        la = attention_layout(build_model(cfg)).layers[0]
        assert (la.packing, la.num_kv_heads) == (packing, kv)


def test_out_proj_modules_of_other_families_are_refused():
    model = build_model(TinyConfig(arch="opt", num_layers=1))
    model.config.model_type = "bart"  # BART's cross-attention has the same four Linears
    with pytest.raises(ValueError, match="Unsupported model.*OPTAttention.*Declare it"):
        attention_layout(model)


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
    pytest.param(lambda: _call(_bad_declared(num_kv_heads=3)), "multiple of num_kv_heads",
                 id="kv-not-divisor"),
    pytest.param(lambda: _call(_bad_declared(packing="fused")), "packing expected", id="unknown-packing"),
    pytest.param(lambda: _call(_bad_declared(q="nope.weight")), "expected a parameter", id="unknown-name"),
    pytest.param(lambda: _call(_bad_declared(extra=1)), "unknown ['extra']", id="unknown-key"),
    pytest.param(lambda: _call(_bad_declared(module="no.such.module")), "module path", id="unknown-module"),
    pytest.param(lambda: _call(_bad_declared(packing="fused_blocks")), "q == k == v",
                 id="fused-needs-one-tensor"),
    pytest.param(lambda: _call(_bad_declared(orientation="conv1d")), "shape mismatch",
                 id="wrong-orientation"),
    pytest.param(lambda: _call(_same_qkv()), "three distinct q, k, v tensors", id="separate-q-is-k"),
    pytest.param(lambda: attention_layout(build_model(TinyConfig(arch="gpt2")), {"layers": [], "x": 1}),
                 "one key 'layers'", id="unknown-top-key"),
]


@pytest.mark.parametrize("fn,message", BAD)
def test_bad_input(fn, message):
    with pytest.raises(ValueError, match=None) as err:
        fn()
    assert message in str(err.value)


HEADLESS = [
    pytest.param(lambda: build_model(TinyConfig(arch="mamba", num_layers=1)), "MambaMixer", id="mamba"),
    pytest.param(lambda: build_model(TinyConfig(arch="rwkv")), "RwkvSelfAttention", id="rwkv"),
    pytest.param(lambda: torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()), None, id="mlp"),
]


@pytest.mark.parametrize("make, mixer", HEADLESS)
def test_no_attention_heads_says_so_and_what_applies(make, mixer):
    with pytest.raises(ValueError) as err:
        attention_layout(make())
    text = str(err.value)
    assert "has no attention heads" in text and "expected a model with attention heads" in text
    assert "which do not apply" in text and "interference" in text and "conflicts(groups='heads')" in text
    assert "What applies: every estimator that needs no heads (empirical_fisher" in text
    assert ("Declare it" in text) == (mixer is None)
    if mixer:
        assert mixer in text


def test_heads_only_parts_of_fisher_fast_raise_the_no_heads_error():
    import fisher_fast as ff
    from fisher_ref.testing.batches import random_batch

    model = build_model(TinyConfig(arch="mamba", num_layers=1), dtype=torch.float64)
    a, b = (random_batch(kind="causal", vocab_size=11, batch_size=2, seq_len=4, seed=s) for s in (0, 1))
    calls = {"qkov_mask": lambda: ff.qkov_mask(model, 0, 0, "Q"),
             "head_group_ids": lambda: ff.head_group_ids(model),
             "group_fisher": lambda: ff.group_fisher(model, a, groups="heads", dtype=torch.float64),
             "interference": lambda: ff.interference(model, a, b, dtype=torch.float64),
             "conflicts": lambda: ff.conflicts(model, a, b, groups="heads", n_permutations=9,
                                               dtype=torch.float64)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match="MambaForCausalLM has no attention heads") as err:
            call()
        assert "MambaMixer" in str(err.value), name


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
