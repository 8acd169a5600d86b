"""fisher_fast.attention.slicing: QK-OV masks checked against the model's forward pass, partitions,
group ids, per-head sums, bad input.
"""

from __future__ import annotations

import pytest
import torch

from fisher_fast.attention.layouts import attention_layout
from fisher_fast.attention.slicing import (
    BLOCKS,
    head_axes_view,
    head_group_ids,
    head_view,
    per_head_sum,
    qkov_mask,
)
from fisher_ref.semantic_check import check_masks
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance

SIGNED = dict(zip(("rtol", "atol"), tolerance("float64-reorder-signed"), strict=True))
CFGS = [
    TinyConfig(arch="gpt2"),
    TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=2, hidden=12, attention_bias=True),
    TinyConfig(arch="qwen2", num_heads=4, num_kv_heads=1, head_dim=2),
    TinyConfig(arch="bert"),
    TinyConfig(arch="gpt_neox"),
    TinyConfig(arch="phi3", num_heads=4, num_kv_heads=2, head_dim=2),
]
IDS = [c.make_id() for c in CFGS]
# the families of issue #12 (their slices are checked by the oracle's semantic check below)
NEW_CFGS = [
    TinyConfig(arch="opt"),
    TinyConfig(arch="gptj"),
    TinyConfig(arch="falcon", num_heads=4, num_kv_heads=2, attention_bias=True),
    TinyConfig(arch="falcon-mq", num_heads=4, head_dim=2, attention_bias=True),
    TinyConfig(arch="falcon-rw"),
    TinyConfig(arch="bloom"),
    TinyConfig(arch="gemma2", num_heads=4, num_kv_heads=2, head_dim=2, hidden=12),
    TinyConfig(arch="qwen3", num_heads=4, num_kv_heads=1, hidden=12, attention_bias=True),
    TinyConfig(arch="starcoder2", num_heads=4, num_kv_heads=2),
    TinyConfig(arch="stablelm", num_heads=4, num_kv_heads=2, attention_bias=True),
]
ALL_CFGS, ALL_IDS = CFGS + NEW_CFGS, IDS + [c.make_id() for c in NEW_CFGS]


def _observe(model, batch, la, zero_head=None):
    """Layer la's attention probabilities [B, H, T, T], o_module input and output."""
    seen = {}
    o_mod = dict(model.named_modules())[la.o_module]

    def pre(mod, args):
        x = args[0]
        if zero_head is not None:
            x = x.clone()
            x[..., zero_head * la.head_dim:(zero_head + 1) * la.head_dim] = 0
        seen["o_in"] = x.detach().clone()
        return (x,) + tuple(args[1:])

    def post(mod, args, out):
        seen["o_out"] = out.detach().clone()

    h1, h2 = o_mod.register_forward_pre_hook(pre), o_mod.register_forward_hook(post)
    try:
        with torch.no_grad():
            out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_attentions=True)
    finally:
        h1.remove(), h2.remove()
    return out.attentions[la.index].detach().clone(), seen["o_in"], seen["o_out"]


def _perturbed(model, masks, seed):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].add_(torch.randn(params[n].shape, generator=g, dtype=params[n].dtype) * m)


def _changed_heads(a, b, axis_size, split):
    """Which heads' entries differ between a and b along the head axis."""
    _, atol = tolerance("semantic-check")
    return {h for h in range(axis_size) if not torch.allclose(split(a, h), split(b, h), rtol=0, atol=atol)}


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
@pytest.mark.parametrize("block", BLOCKS)
def test_slice_changes_exactly_its_head(cfg, block):
    kind = {"bert": "mlm"}.get(cfg.arch, "causal")
    batch = random_batch(kind=kind, vocab_size=cfg.vocab_size, batch_size=2, seq_len=5, pad=False)
    la = attention_layout(build_model(cfg)).layers[1]
    r = la.num_heads // la.num_kv_heads
    for head in range(la.num_heads):
        model = build_model(cfg, dtype=torch.float64)
        att0, oin0, oout0 = _observe(model, batch, la)
        _perturbed(model, qkov_mask(model, 1, head, block, include_bias=True), seed=head)
        att1, oin1, oout1 = _observe(model, batch, la)
        sharing = {h for h in range(la.num_heads) if h // r == head // r}
        by_att = _changed_heads(att0, att1, la.num_heads, lambda t, h: t[:, h])
        cols = lambda t, h: t[..., h * la.head_dim:(h + 1) * la.head_dim]  # noqa: E731
        by_oin = _changed_heads(oin0, oin1, la.num_heads, cols)
        if block == "Q":
            assert by_att == {head} and by_oin == {head}
        elif block == "K":
            assert by_att == sharing and by_oin == sharing
        elif block == "V":
            assert by_att == set() and by_oin == sharing
        else:  # O: the change vanishes once head h's input to the projection is zeroed
            assert by_att == set() and by_oin == set() and not torch.equal(oout0, oout1)
            zeroed0 = _observe(build_model(cfg, dtype=torch.float64), batch, la, zero_head=head)[2]
            zeroed1 = _observe(model, batch, la, zero_head=head)[2]
            torch.testing.assert_close(zeroed1, zeroed0, rtol=0, atol=tolerance("semantic-check")[1])


@pytest.mark.parametrize("cfg", ALL_CFGS, ids=ALL_IDS)
def test_slices_partition_each_tensor(cfg):
    model = build_model(cfg)
    la = attention_layout(model).layers[0]
    params = dict(model.named_parameters())
    cover = {}
    for block in BLOCKS:
        for h in range(la.num_heads):
            for n, m in qkov_mask(model, 0, h, block, include_bias=True).items():
                if block in ("K", "V") and h % (la.num_heads // la.num_kv_heads):
                    continue  # query heads after the first share their kv head's slice
                cover[n] = cover.get(n, 0) + m.long()
    for n, count in cover.items():
        if n == la.o_bias:
            continue
        assert torch.equal(count, torch.ones_like(params[n], dtype=torch.long)), n


@pytest.mark.parametrize("cfg", ALL_CFGS, ids=ALL_IDS)
def test_group_ids_agree_with_masks(cfg):
    model = build_model(cfg)
    la = attention_layout(model).layers[1]
    ids = head_group_ids(model)
    fused = la.packing != "separate"
    r = la.num_heads // la.num_kv_heads
    for block in BLOCKS:
        for h in range(la.num_heads):
            g = {"Q": h, "O": h, "K": h // r + (la.num_heads if fused else 0),
                 "V": h // r + (la.num_heads + la.num_kv_heads if fused else 0)}[block]
            for n, m in qkov_mask(model, 1, h, block, include_bias=True).items():
                assert torch.equal(m, ids[n][0] == g), (n, block, h)


@pytest.mark.parametrize("cfg", ALL_CFGS, ids=ALL_IDS)
def test_per_head_sum_is_masked_sum(cfg):
    model = build_model(cfg)
    la = attention_layout(model).layers[0]
    x = {n: torch.randn(3, *p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    for block in BLOCKS:
        got = per_head_sum(x, la, block, include_bias=True)
        for h in range(la.num_heads):
            want = sum((x[n] * m).flatten(1).sum(1)
                       for n, m in qkov_mask(model, 0, h, block, include_bias=True).items())
            torch.testing.assert_close(got[:, h], want, **SIGNED)


@pytest.mark.parametrize("cfg", NEW_CFGS, ids=[c.make_id() for c in NEW_CFGS])
def test_new_family_slices_pass_the_semantic_check(cfg):
    # fisher_fast's masks, perturbed in the model's own float64 forward (fisher_ref's check):
    # exactly the right heads move; the last layer, its first and last heads
    model = build_model(cfg)

    def mask_fn(layer, head, block):
        return qkov_mask(model, layer, head, block, include_bias=True)

    report = check_masks(model, mask_fn, layers=[1], heads=[0, cfg.num_heads - 1])
    assert report.passed, str(report)


# Falcon's new decoder architecture by hand (FalconAttention.forward views query_key_value
# as [H_kv, r + 2, dh]): H=4, H_kv=2, dh=2, rows [Q0 Q1 K0 V0 | Q2 Q3 K1 V1], 2 rows each
FALCON = TinyConfig(arch="falcon", num_layers=1, num_heads=4, num_kv_heads=2, head_dim=2,
                    attention_bias=True)
FALCON_ROWS = {("Q", 0): [0, 1], ("Q", 1): [2, 3], ("K", 1): [4, 5], ("V", 1): [6, 7],
               ("Q", 2): [8, 9], ("Q", 3): [10, 11], ("K", 2): [12, 13], ("V", 3): [14, 15]}


@pytest.mark.parametrize("block, head", list(FALCON_ROWS), ids=[f"{b}{h}" for b, h in FALCON_ROWS])
def test_falcon_grouped_rows_by_hand(block, head):
    masks = qkov_mask(build_model(FALCON), 0, head, block, include_bias=True)
    w = masks["transformer.h.0.self_attention.query_key_value.weight"]
    b = masks["transformer.h.0.self_attention.query_key_value.bias"]
    assert bool((w.all(dim=1) == w.any(dim=1)).all())  # whole rows
    assert w.any(dim=1).nonzero().flatten().tolist() == FALCON_ROWS[(block, head)]
    assert b.nonzero().flatten().tolist() == FALCON_ROWS[(block, head)]


def test_grouped_q_view_is_a_copy_and_head_axes_view_a_view():
    la = attention_layout(build_model(FALCON)).layers[0]
    x = torch.arange(16 * 8.0).reshape(16, 8)
    axes = head_axes_view(x, la, "Q", "weight")                 # [H_kv, r, dh, d]
    assert axes.shape == (2, 2, 2, 8) and axes.data_ptr() == x.data_ptr()
    assert torch.equal(axes[1, 0], x[8:10])                     # query head 2
    flat = head_view(x, la, "Q", "weight")                      # [H, dh, d], merged: a copy
    assert flat.shape == (4, 2, 8) and torch.equal(flat[3], x[10:12])
    assert torch.equal(head_view(x, la, "K", "weight")[1], x[12:14])
    assert head_view(torch.arange(16), la, "V", "bias")[0].tolist() == [6, 7]  # a bias's one axis
    x.zero_()
    assert not bool(axes.any()) and bool(flat.any())            # the copy kept the old values


def _gpt2():
    return build_model(TinyConfig(arch="gpt2"))


BAD = [
    pytest.param(qkov_mask, dict(layer=2, head=0, block="Q"), "layer: expected an int in [0, 2)",
                 id="layer-range"),
    pytest.param(qkov_mask, dict(layer=0, head=2, block="Q"), "head: expected an int in [0, 2)",
                 id="head-range"),
    pytest.param(qkov_mask, dict(layer=0, head=-1, block="Q"), "head: expected", id="head-negative"),
    pytest.param(qkov_mask, dict(layer=0, head=0, block="X"), "block: expected one of", id="block"),
]


@pytest.mark.parametrize("fn,kwargs,message", BAD)
def test_bad_input(fn, kwargs, message):
    with pytest.raises(ValueError) as err:
        fn(_gpt2(), **kwargs)
    assert message in str(err.value)
