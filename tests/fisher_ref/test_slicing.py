"""qkov_mask and head_group_ids: hand-derived index ranges, partition, reassembly, GQA."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fisher_ref.layouts import LayerAttention, attention_layout
from fisher_ref.slicing import BLOCKS, group_ids_of_layer, head_group_ids, qkov_mask, slice_masks
from fisher_ref.testing.models import TinyConfig, build_model

GPT2 = TinyConfig(arch="gpt2", num_layers=1)  # H=2, dh=4, d=8: c_attn [8, 24], c_proj [8, 8]
NEOX = TinyConfig(arch="gpt_neox", num_layers=1)  # H=2, dh=4: query_key_value [24, 8]
PHI3 = TinyConfig(arch="phi3", num_layers=1, num_heads=4, num_kv_heads=2)  # dh=4: qkv [32, 16]
LLAMA = TinyConfig(arch="llama", num_layers=1, num_heads=4, num_kv_heads=2, head_dim=2,
                   hidden=12, attention_bias=True)  # q [8, 12], k/v [4, 12], o [12, 8]
# Falcon, new decoder architecture, H=4, H_kv=2, r=2, dh=2: query_key_value [16, 8], rows
# [kv 0: Q0 Q1 K0 V0 | kv 1: Q2 Q3 K1 V1], dh rows each (FalconAttention.forward's view)
FALCON = TinyConfig(arch="falcon", num_layers=1, num_heads=4, num_kv_heads=2, head_dim=2,
                    attention_bias=True)
FALCON_MQ = TinyConfig(arch="falcon-mq", num_layers=1, num_heads=4, head_dim=2)  # [Q0..Q3 K V] [12, 8]
BLOOM = TinyConfig(arch="bloom", num_layers=1)  # H=2, dh=4: query_key_value [24, 8] = [H, 3, dh]
OPT = TinyConfig(arch="opt", num_layers=1)  # q/k/v_proj [8, 8], out_proj [8, 8]
ALL = [GPT2, NEOX, PHI3, LLAMA, TinyConfig(arch="bert", num_layers=1),
       TinyConfig(arch="qwen2", num_layers=1, num_heads=4, num_kv_heads=2), FALCON, FALCON_MQ, BLOOM, OPT,
       TinyConfig(arch="falcon-rw", num_layers=1), TinyConfig(arch="gptj", num_layers=1),
       TinyConfig(arch="gemma2", num_layers=1, num_heads=4, num_kv_heads=2, hidden=12),
       TinyConfig(arch="qwen3", num_layers=1, num_heads=4, num_kv_heads=1),
       TinyConfig(arch="starcoder2", num_layers=1, num_heads=4, num_kv_heads=2),
       TinyConfig(arch="stablelm", num_layers=1, num_heads=4, num_kv_heads=2, attention_bias=True)]


def _rows(mask, axis):
    """Indices along ``axis`` where the mask is set (checking it is full along the other)."""
    other = 1 - axis
    assert bool((mask.any(dim=other) == mask.all(dim=other)).all())
    return mask.any(dim=other).nonzero().flatten().tolist()


# (config, block, head, parameter suffix, axis, expected indices), derived from the HF forwards
TABLE = [
    (GPT2, "Q", 1, "attn.c_attn.weight", 1, list(range(4, 8))),
    (GPT2, "K", 0, "attn.c_attn.weight", 1, list(range(8, 12))),
    (GPT2, "V", 1, "attn.c_attn.weight", 1, list(range(20, 24))),
    (GPT2, "O", 1, "attn.c_proj.weight", 0, list(range(4, 8))),
    (NEOX, "Q", 1, "attention.query_key_value.weight", 0, list(range(12, 16))),
    (NEOX, "K", 0, "attention.query_key_value.weight", 0, list(range(4, 8))),
    (NEOX, "V", 1, "attention.query_key_value.weight", 0, list(range(20, 24))),
    (PHI3, "Q", 3, "self_attn.qkv_proj.weight", 0, list(range(12, 16))),
    (PHI3, "K", 3, "self_attn.qkv_proj.weight", 0, list(range(20, 24))),
    (PHI3, "V", 2, "self_attn.qkv_proj.weight", 0, list(range(28, 32))),
    (PHI3, "O", 2, "self_attn.o_proj.weight", 1, list(range(8, 12))),
    (LLAMA, "Q", 3, "self_attn.q_proj.weight", 0, [6, 7]),
    (LLAMA, "K", 3, "self_attn.k_proj.weight", 0, [2, 3]),
    (LLAMA, "O", 3, "self_attn.o_proj.weight", 1, [6, 7]),
    (FALCON, "Q", 1, "self_attention.query_key_value.weight", 0, [2, 3]),
    (FALCON, "Q", 2, "self_attention.query_key_value.weight", 0, [8, 9]),
    (FALCON, "K", 1, "self_attention.query_key_value.weight", 0, [4, 5]),
    (FALCON, "V", 0, "self_attention.query_key_value.weight", 0, [6, 7]),
    (FALCON, "K", 3, "self_attention.query_key_value.weight", 0, [12, 13]),
    (FALCON, "V", 2, "self_attention.query_key_value.weight", 0, [14, 15]),
    (FALCON, "O", 2, "self_attention.dense.weight", 1, [4, 5]),
    (FALCON_MQ, "Q", 3, "self_attention.query_key_value.weight", 0, [6, 7]),
    (FALCON_MQ, "K", 2, "self_attention.query_key_value.weight", 0, [8, 9]),
    (FALCON_MQ, "V", 0, "self_attention.query_key_value.weight", 0, [10, 11]),
    (BLOOM, "Q", 1, "self_attention.query_key_value.weight", 0, list(range(12, 16))),
    (BLOOM, "K", 0, "self_attention.query_key_value.weight", 0, list(range(4, 8))),
    (BLOOM, "V", 1, "self_attention.query_key_value.weight", 0, list(range(20, 24))),
    (OPT, "V", 1, "self_attn.v_proj.weight", 0, list(range(4, 8))),
    (OPT, "O", 1, "self_attn.out_proj.weight", 1, list(range(4, 8))),
]


@pytest.mark.parametrize("cfg, block, head, suffix, axis, expected", TABLE,
                         ids=lambda v: v.arch if isinstance(v, TinyConfig) else None)
def test_slice_index_ranges(cfg, block, head, suffix, axis, expected):
    masks = qkov_mask(build_model(cfg), 0, head, block)
    (name, mask), = masks.items()
    assert name.endswith(suffix)
    assert _rows(mask, axis) == expected


def test_biases_follow_weights_and_o_bias_belongs_to_no_head():
    model = build_model(GPT2)
    masks = qkov_mask(model, 0, 1, "V", include_bias=True)
    assert masks["transformer.h.0.attn.c_attn.bias"].nonzero().flatten().tolist() == list(range(20, 24))
    assert set(qkov_mask(model, 0, 1, "O", include_bias=True)) == {"transformer.h.0.attn.c_proj.weight"}
    assert set(qkov_mask(model, 0, 1, "V")) == {"transformer.h.0.attn.c_attn.weight"}


def _coverage(model, la, include_bias):
    """How many (head-representative) slices cover each entry of each touched tensor."""
    reps = {"Q": range(la.num_heads), "O": range(la.num_heads),
            "K": range(0, la.num_heads, la.group_size), "V": range(0, la.num_heads, la.group_size)}
    counts = {}
    for block in BLOCKS:
        for h in reps[block]:
            for name, m in qkov_mask(model, la.index, h, block, include_bias).items():
                counts[name] = counts.get(name, 0) + m.long()
    return counts


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: c.make_id())
def test_slices_partition_every_attention_tensor(cfg):
    model = build_model(cfg)
    la = attention_layout(model).layer(0)
    counts = _coverage(model, la, include_bias=True)
    expected = {la.q, la.k, la.v, la.o} | ({la.q_bias, la.k_bias, la.v_bias} - {None})
    assert set(counts) == expected
    assert all(bool((c == 1).all()) for c in counts.values())


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: c.make_id())
def test_slices_reassemble_the_tensor(cfg):
    model = build_model(cfg)
    la = attention_layout(model).layer(0)
    params = dict(model.named_parameters())
    rebuilt = {}
    for block in BLOCKS:
        heads = range(la.num_heads) if block in "QO" else range(0, la.num_heads, la.group_size)
        for h in heads:
            for name, m in qkov_mask(model, 0, h, block).items():
                rebuilt[name] = rebuilt.get(name, 0) + torch.where(m, params[name], 0.0)
    for name, value in rebuilt.items():
        assert torch.equal(value, params[name]), name


def test_falcon_grouped_biases_and_group_ids():
    model = build_model(FALCON)
    name = "transformer.h.0.self_attention.query_key_value"
    masks = qkov_mask(model, 0, 3, "Q", include_bias=True)
    assert masks[f"{name}.bias"].nonzero().flatten().tolist() == [10, 11]
    g, n = head_group_ids(model)[f"{name}.weight"]
    # Q heads 0..3, then K kv-heads 4, 5, then V kv-heads 6, 7 (the fused order), per dh rows
    assert n == 8 and g[:, 0].tolist() == [h for h in (0, 1, 4, 6, 2, 3, 5, 7) for _ in range(2)]


def test_gqa_heads_share_exactly_their_kv_slice():
    model = build_model(PHI3)  # H=4, H_kv=2: heads 0, 1 -> kv 0; heads 2, 3 -> kv 1
    for block in ("K", "V"):
        m = [qkov_mask(model, 0, h, block)["model.layers.0.self_attn.qkv_proj.weight"] for h in range(4)]
        assert torch.equal(m[0], m[1]) and torch.equal(m[2], m[3])
        assert not (m[0] & m[2]).any()
    q = [qkov_mask(model, 0, h, "Q")["model.layers.0.self_attn.qkv_proj.weight"] for h in range(4)]
    assert not (q[0] & q[1]).any()


def test_group_ids_order_for_fused_tensor():
    ids = head_group_ids(build_model(GPT2))
    g, n = ids["transformer.h.0.attn.c_attn.weight"]
    assert n == 6  # Q heads 0, 1; K heads 2, 3; V heads 4, 5
    assert g[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4
    assert bool((g == g[0]).all())  # constant down each column (the Conv1D input axis)
    o, n_o = ids["transformer.h.0.attn.c_proj.weight"]
    assert n_o == 2 and o[:, 0].tolist() == [0] * 4 + [1] * 4
    b, n_b = ids["transformer.h.0.attn.c_proj.bias"]
    assert n_b == 1 and bool((b == 0).all())


def test_group_ids_gqa_fused_and_separate():
    phi = head_group_ids(build_model(PHI3))
    g, n = phi["model.layers.0.self_attn.qkv_proj.weight"]
    assert n == 8 and g[:, 0].tolist() == [h for h in range(8) for _ in range(4)]
    lla = head_group_ids(build_model(LLAMA))
    k, n_k = lla["model.layers.0.self_attn.k_proj.weight"]
    assert n_k == 2 and k[:, 0].tolist() == [0, 0, 1, 1]
    kb, _ = lla["model.layers.0.self_attn.k_proj.bias"]
    assert kb.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("cfg", [GPT2, PHI3, NEOX, FALCON, FALCON_MQ, BLOOM], ids=lambda c: c.arch)
def test_group_ids_agree_with_masks(cfg):
    model = build_model(cfg)
    la = attention_layout(model).layer(0)
    g, _ = head_group_ids(model)[la.q]
    H, kv = la.num_heads, la.num_kv_heads
    for h in range(H):
        assert torch.equal(qkov_mask(model, 0, h, "Q")[la.q], g == h)
        assert torch.equal(qkov_mask(model, 0, h, "K")[la.q], g == H + la.kv_head(h))
        assert torch.equal(qkov_mask(model, 0, h, "V")[la.q], g == H + kv + la.kv_head(h))


BAD = [
    pytest.param(dict(layer=1, head=0, block="Q"), "layer: expected an integer in [0, 1), got 1", id="layer"),
    pytest.param(dict(layer=0, head=2, block="Q"), "head: expected an integer in [0, 2)", id="head"),
    pytest.param(dict(layer=0, head=-1, block="O"), "got -1", id="negative-head"),
    pytest.param(dict(layer=0, head=0, block="q"), "block: expected one of", id="block"),
]


@pytest.mark.parametrize("kwargs, message", BAD)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError) as err:
        qkov_mask(build_model(GPT2), **kwargs)
    assert message in str(err.value)


@st.composite
def layer_shapes(draw):
    """A consistent attention layer: kv heads, group size, head_dim, then d_model."""
    kv = draw(st.integers(1, 3))
    H = kv * draw(st.integers(1, 3))
    dh = draw(st.integers(1, 4))
    packing = draw(st.sampled_from(["separate", "fused_blocks", "fused_per_head", "fused_grouped"]))
    if packing == "fused_per_head":
        kv = H
    orientation = draw(st.sampled_from(["linear", "conv1d"]))
    d = draw(st.integers(1, 5))
    la = LayerAttention(index=0, module="m", o_module="m.o", kind="declared", packing=packing,
                        orientation=orientation, q="q", k="q" if packing != "separate" else "k",
                        v="q" if packing != "separate" else "v", o="o", q_bias="qb",
                        k_bias="qb" if packing != "separate" else "kb",
                        v_bias="qb" if packing != "separate" else "vb", o_bias=None,
                        num_heads=H, num_kv_heads=kv, head_dim=dh)
    outs = {"q": H * dh, "k": kv * dh, "v": kv * dh} if packing == "separate" else {"q": (H + 2 * kv) * dh}
    lin = orientation == "linear"
    shapes = {n: (m, d) if lin else (d, m) for n, m in outs.items()}
    shapes |= {n + "b": (m,) for n, m in outs.items()}
    shapes["o"] = (d, H * dh) if lin else (H * dh, d)
    return la, shapes


@given(layer_shapes())
def test_property_slices_partition_any_layout(case):
    la, shapes = case
    counts = {n: torch.zeros(s, dtype=torch.long) for n, s in shapes.items()}
    for block in BLOCKS:
        heads = range(la.num_heads) if block in "QO" else range(0, la.num_heads, la.group_size)
        for h in heads:
            for name, m in slice_masks(la, h, block, shapes, include_bias=True).items():
                counts[name] += m.long()
    assert all(bool((c == 1).all()) for c in counts.values())
    ids = group_ids_of_layer(la, shapes)
    assert all(int(g.max()) < n for g, n in ids.values())
