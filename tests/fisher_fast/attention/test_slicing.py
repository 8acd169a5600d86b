"""fisher_fast.attention.slicing: QK-OV masks checked against the model's forward pass, partitions,
group ids, per-head sums, bad input.
"""

from __future__ import annotations

import pytest
import torch

from fisher_fast.attention.layouts import attention_layout
from fisher_fast.attention.slicing import BLOCKS, head_group_ids, per_head_sum, qkov_mask
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance

SIGNED = dict(zip(("rtol", "atol"), tolerance("float64-reorder-signed")))
CFGS = [
    TinyConfig(arch="gpt2"),
    TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=2, hidden=12, attention_bias=True),
    TinyConfig(arch="qwen2", num_heads=4, num_kv_heads=1, head_dim=2),
    TinyConfig(arch="bert"),
    TinyConfig(arch="gpt_neox"),
    TinyConfig(arch="phi3", num_heads=4, num_kv_heads=2, head_dim=2),
]
IDS = [c.make_id() for c in CFGS]


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


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
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


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
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


@pytest.mark.parametrize("cfg", CFGS, ids=IDS)
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


def _gpt2():
    return build_model(TinyConfig(arch="gpt2"))


BAD = [
    pytest.param(qkov_mask, dict(layer=2, head=0, block="Q"), "layer: expected an int in [0, 2)", id="layer-range"),
    pytest.param(qkov_mask, dict(layer=0, head=2, block="Q"), "head: expected an int in [0, 2)", id="head-range"),
    pytest.param(qkov_mask, dict(layer=0, head=-1, block="Q"), "head: expected", id="head-negative"),
    pytest.param(qkov_mask, dict(layer=0, head=0, block="X"), "block: expected one of", id="block"),
]


@pytest.mark.parametrize("fn,kwargs,message", BAD)
def test_bad_input(fn, kwargs, message):
    with pytest.raises(ValueError) as err:
        fn(_gpt2(), **kwargs)
    assert message in str(err.value)
