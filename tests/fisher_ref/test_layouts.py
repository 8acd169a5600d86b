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
    # the families of issue #12, read off their HF configs and modeling code by hand
    (TinyConfig(arch="opt"), "opt", "separate", "linear", 2, 2, 4, True, True),
    (TinyConfig(arch="opt", attention_bias=False), "opt", "separate", "linear", 2, 2, 4, False, False),
    (TinyConfig(arch="gptj"), "gptj", "separate", "linear", 2, 2, 4, False, False),
    (TinyConfig(arch="falcon", num_heads=4, num_kv_heads=2, attention_bias=True), "falcon",
     "fused_grouped", "linear", 4, 2, 4, True, True),
    (TinyConfig(arch="falcon-mq", num_heads=4), "falcon", "fused_blocks", "linear", 4, 1, 4, False, False),
    (TinyConfig(arch="falcon-rw"), "falcon", "fused_per_head", "linear", 2, 2, 4, True, True),
    (TinyConfig(arch="bloom"), "bloom", "fused_per_head", "linear", 2, 2, 4, True, True),
    (TinyConfig(arch="gemma", num_heads=4, num_kv_heads=1, hidden=12), "gemma", "separate", "linear",
     4, 1, 4, False, False),
    (TinyConfig(arch="gemma2", num_heads=4, num_kv_heads=2, head_dim=2, hidden=12), "gemma2",
     "separate", "linear", 4, 2, 2, False, False),
    (TinyConfig(arch="qwen3", num_heads=4, num_kv_heads=2, hidden=12), "qwen3", "separate", "linear",
     4, 2, 4, False, False),
    (TinyConfig(arch="starcoder2", num_heads=4, num_kv_heads=2), "starcoder2", "separate", "linear",
     4, 2, 4, True, True),
    (TinyConfig(arch="stablelm", num_heads=4, num_kv_heads=2, attention_bias=True), "stablelm",
     "separate", "linear", 4, 2, 4, True, False),
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


@pytest.mark.parametrize("cfg, module, o_module", [
    (TinyConfig(arch="opt"), "model.decoder.layers.1.self_attn", "model.decoder.layers.1.self_attn.out_proj"),
    (TinyConfig(arch="gptj"), "transformer.h.1.attn", "transformer.h.1.attn.out_proj"),
    (TinyConfig(arch="falcon"), "transformer.h.1.self_attention", "transformer.h.1.self_attention.dense"),
    (TinyConfig(arch="bloom"), "transformer.h.1.self_attention", "transformer.h.1.self_attention.dense"),
    (TinyConfig(arch="qwen3"), "model.layers.1.self_attn", "model.layers.1.self_attn.o_proj"),
], ids=lambda v: v.arch if isinstance(v, TinyConfig) else None)
def test_new_family_modules_and_fused_names(cfg, module, o_module):
    la = attention_layout(build_model(cfg)).layer(1)
    assert (la.module, la.o_module, la.o) == (module, o_module, f"{o_module}.weight")
    fused = la.packing != "separate"
    assert (la.q == la.k == la.v) == fused
    assert la.q == (f"{module}.query_key_value.weight" if fused else f"{module}.q_proj.weight")


def test_qk_norms_and_per_head_layernorms_are_not_attention_blocks():
    # Qwen3's q_norm/k_norm ([dh], shared by every head) and StableLM's per-head q/k
    # LayerNorms are norms (SPEC §3: one group per element), not Q/K slices
    for cfg in (TinyConfig(arch="qwen3", num_layers=1),
                TinyConfig(arch="stablelm", num_layers=1, extra=(("qk_layernorm", True),))):
        model = build_model(cfg)
        names = attention_layout(model).parameter_names()
        norms = {n for n, _ in model.named_parameters() if "norm" in n and "self_attn" in n}
        assert norms and not names & norms


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


def test_falcon_packing_follows_new_decoder_architecture_and_multi_query():
    # FalconConfig: new_decoder_architecture wins; else multi_query; else one K/V per head
    cases = {(("new_decoder_architecture", True), ("multi_query", True)): ("fused_grouped", 2),
             (("new_decoder_architecture", False), ("multi_query", True)): ("fused_blocks", 1),
             (("new_decoder_architecture", False), ("multi_query", False)): ("fused_per_head", 4)}
    for extra, (packing, kv) in cases.items():
        model = build_model(TinyConfig(arch="falcon", num_layers=1, num_heads=4, num_kv_heads=2,
                                       extra=extra))
        la = attention_layout(model).layer(0)
        assert (la.packing, la.num_kv_heads) == (packing, kv), extra


def test_query_key_value_of_an_unknown_family_is_refused_not_read_as_neox():
    # e.g. ChatGLM packs its query_key_value [Q; K; V] with multi-query heads: no silent NeoX
    class FusedSelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query_key_value, self.dense = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attention = FusedSelfAttention()

    with pytest.raises(ValueError, match=r"self_attention \(FusedSelfAttention\).*declare the layout"):
        attention_layout(Block())


def test_opt_like_modules_of_other_families_are_refused():
    # BART/Whisper name their cross-attention q/k/v_proj + out_proj too: only OPT and GPT-J
    # are read; anything else asks for a declared layout
    model = build_model(TinyConfig(arch="opt", num_layers=1))
    model.config.model_type = "bart"
    with pytest.raises(ValueError, match="declare the layout"):
        attention_layout(model)


# ---------------------------------------------------- models without attention heads


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


@pytest.mark.parametrize("make, mixer", [
    (lambda: build_model(TinyConfig(arch="mamba", num_layers=1)), "MambaMixer"),
    (lambda: build_model(TinyConfig(arch="rwkv")), "RwkvSelfAttention"),
    (_mlp, None),
], ids=["mamba", "rwkv", "mlp"])
def test_a_model_without_heads_is_told_so_and_what_applies(make, mixer):
    with pytest.raises(ValueError) as err:
        attention_layout(make())
    text = str(err.value)
    assert "expected a model with attention heads" in text and "which has none" in text
    assert "do not apply" in text and "interference" in text and "group_fisher(groups='heads')" in text
    assert "empirical_fisher" in text and "conflicts(groups='parameters')" in text
    if mixer:  # a known head-free mixer: no advice to declare a layout
        assert mixer in text and "declare the layout" not in text
    else:
        assert "no attention-like module" in text and "declare the layout" in text


def test_every_heads_only_part_gives_the_no_heads_error():
    import fisher_ref
    from fisher_ref.semantic_check import check_layout
    from fisher_ref.testing.batches import random_batch

    model = build_model(TinyConfig(arch="mamba", num_layers=1), dtype=torch.float64)
    a, b = (random_batch(kind="causal", vocab_size=11, batch_size=2, seq_len=4, seed=s) for s in (0, 1))
    calls = {
        "qkov_mask": lambda: fisher_ref.qkov_mask(model, 0, 0, "Q"),
        "head_group_ids": lambda: fisher_ref.head_group_ids(model),
        "group_fisher": lambda: fisher_ref.group_fisher(model, a, groups="heads"),
        "interference": lambda: fisher_ref.interference(model, a, b),
        "conflicts": lambda: fisher_ref.conflicts(model, a, b, groups="heads", n_permutations=9),
        "check_layout": lambda: check_layout(model),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="expected a model with attention heads") as err:
            call()
        assert "MambaMixer" in str(err.value), name


def test_estimators_without_heads_run_on_mamba_and_rwkv():
    # E[g²] of the oracle equals, by hand, the mean over rows of each row's squared gradient
    # with the row run alone (plain autograd, no batching at all)
    import fisher_ref
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.compare import assert_dicts_close
    from fisher_ref.testing.tolerances import tolerance

    for arch in ("mamba", "rwkv"):
        model = build_model(TinyConfig(arch=arch), dtype=torch.float64)
        batch = random_batch(kind="causal", vocab_size=11, batch_size=3, seq_len=4, seed=2, pad=False)
        params = dict(model.named_parameters())
        want = {n: torch.zeros_like(p) for n, p in params.items()}
        for i in range(3):
            ids = batch["input_ids"][i:i + 1]
            logits = model(input_ids=ids).logits[0, :-1]
            labels = batch["labels"][i, 1:]
            active = labels != -100
            loss = torch.nn.functional.cross_entropy(logits[active], labels[active])
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
                want[n] += g ** 2 / 3
        got = fisher_ref.empirical_fisher(model, batch)
        rtol, atol = tolerance("float64-paths")
        assert_dicts_close(dict(got), want, rtol=rtol, atol=atol, what=f"E[g^2] of {arch}")
        # and the groups that need no heads
        assert set(fisher_ref.group_fisher(model, batch)) == set(params)


def test_kv_head_follows_repeat_kv():
    lay = attention_layout(build_model(TinyConfig(arch="qwen2", num_heads=4, num_kv_heads=2)))
    assert isinstance(lay, AttentionLayout)
    assert [lay.layer(0).kv_head(h) for h in range(4)] == [0, 0, 1, 1]


def test_unsupported_model_error_names_what_was_found():
    with pytest.raises(ValueError, match=r"attn \(SelfAttention\)"):
        attention_layout(_Toy())
