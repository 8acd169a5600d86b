"""The semantic check passes for every supported layout and fails for wrong slicings."""

from dataclasses import asdict

import pytest
import torch

from fisher_ref.layouts import attention_layout
from fisher_ref.semantic_check import check_layout, check_masks, validate_layout
from fisher_ref.slicing import qkov_mask
from fisher_ref.testing.models import TinyConfig, build_model

SUPPORTED = [
    TinyConfig(arch="gpt2"),
    TinyConfig(arch="llama", num_heads=4, num_kv_heads=2, head_dim=2, hidden=12, attention_bias=True),
    TinyConfig(arch="mistral", num_heads=4, num_kv_heads=2),
    TinyConfig(arch="qwen2", num_heads=4, num_kv_heads=2),
    TinyConfig(arch="bert"),
    TinyConfig(arch="bert-cls"),
    TinyConfig(arch="gpt_neox"),
    TinyConfig(arch="phi3", num_heads=4, num_kv_heads=2),
]


# the families of issue #12 (each layout proven on the model's own forward)
FAMILIES = [
    TinyConfig(arch="opt"),
    TinyConfig(arch="gptj"),
    TinyConfig(arch="falcon", num_heads=4, num_kv_heads=2, attention_bias=True),  # grouped, GQA
    TinyConfig(arch="falcon", num_heads=2, attention_bias=True, extra=(("alibi", True),)),  # r = 1
    TinyConfig(arch="falcon-mq", num_heads=4),
    TinyConfig(arch="falcon-rw"),  # per head, ALiBi, biases
    TinyConfig(arch="bloom"),
    TinyConfig(arch="gemma", num_heads=4, num_kv_heads=2, hidden=12),
    TinyConfig(arch="gemma2", num_heads=4, num_kv_heads=2, hidden=12),
    TinyConfig(arch="qwen3", num_heads=4, num_kv_heads=2, hidden=12, attention_bias=True),
    TinyConfig(arch="starcoder2", num_heads=4, num_kv_heads=2),
    TinyConfig(arch="stablelm", num_heads=4, num_kv_heads=2, attention_bias=True,
               extra=(("qk_layernorm", True),)),
]


@pytest.mark.parametrize("cfg", SUPPORTED, ids=lambda c: c.make_id())
def test_detected_layout_passes(cfg):
    report = check_layout(build_model(cfg))
    assert report.passed, str(report)
    # per (layer, head): 4 perturbation checks and 3 complement checks
    assert len(report.checks) == cfg.num_layers * cfg.num_heads * 7


@pytest.mark.parametrize("cfg", FAMILIES, ids=lambda c: c.make_id())
def test_new_family_layout_passes(cfg):
    # the last layer, its first and last head (every kv group of H=4, H_kv=2): fast enough
    # for the default run; test_new_family_layout_passes_everywhere checks every slice
    heads = [0, cfg.num_heads - 1]
    report = check_layout(build_model(cfg), layers=[cfg.num_layers - 1], heads=heads)
    assert report.passed, str(report)
    assert len(report.checks) == len(heads) * 7


@pytest.mark.slow
@pytest.mark.parametrize("cfg", FAMILIES, ids=lambda c: c.make_id())
def test_new_family_layout_passes_everywhere(cfg):
    report = check_layout(build_model(cfg))
    assert report.passed, str(report)
    assert len(report.checks) == cfg.num_layers * cfg.num_heads * 7


def test_report_says_which_heads_moved():
    report = check_layout(build_model(SUPPORTED[-1]), layers=[1], heads=[2])  # phi3, H=4, H_kv=2
    moved = {c.block: (c.pattern_changed, c.output_changed) for c in report.checks if c.test == "perturb"}
    assert moved == {"Q": ([2], [2]), "K": ([2, 3], [2, 3]), "V": ([], [2, 3]), "O": ([], [])}


# ----------------------------------------------------------------- deliberately wrong slicings


def _rows(n_rows, lo, hi, shape, axis):
    sel = torch.zeros(n_rows, dtype=torch.bool)
    sel[max(lo, 0):min(hi, n_rows)] = True
    return {0: sel[:, None], 1: sel[None, :]}[axis].expand(shape).clone()


def gpt2_o_by_columns(model):
    def mask_fn(layer, head, block):
        masks = qkov_mask(model, layer, head, block)
        return {n: m.T.clone() for n, m in masks.items()} if block == "O" else masks
    return mask_fn


def phi3_v_offset(model, *, forget_k):
    """V of kv head j placed after Q only (``forget_k``) or after H key heads (no GQA)."""
    la = attention_layout(model).layer(0)
    H, dh, kv_w = la.num_heads, la.head_dim, dict(model.named_parameters())

    def mask_fn(layer, head, block):
        if block != "V":
            return qkov_mask(model, layer, head, block)
        name = attention_layout(model).layer(layer).q
        w = kv_w[name]
        start = (H if forget_k else 2 * H) * dh + (head // la.group_size) * dh
        return {name: _rows(w.shape[0], start, start + dh, w.shape, 0)}
    return mask_fn


def head_dim_from_d_over_h(model):
    """LLaMA slices computed with head_dim = hidden / H instead of the config's head_dim."""
    lay = attention_layout(model)
    params = dict(model.named_parameters())

    def mask_fn(layer, head, block):
        la = lay.layer(layer)
        dh = params[la.o].shape[0] // la.num_heads  # the wrong head_dim: d / H
        idx = head if block in "QO" else la.kv_head(head)
        name = la.weight(block)
        w = params[name]
        axis = 1 if block == "O" else 0
        return {name: _rows(w.shape[axis], idx * dh, (idx + 1) * dh, w.shape, axis)}
    return mask_fn


def neox_as_blocks_layout(model):
    lay = attention_layout(model)
    return {"layers": [{k: v for k, v in asdict(la).items() if k not in ("index", "kind")}
                       | {"packing": "fused_blocks"} for la in lay.layers]}


def _half_of_q(model):
    def mask_fn(layer, head, block):
        masks = qkov_mask(model, layer, head, block)
        if block == "Q":
            (name, m), = masks.items()
            rows = m.any(dim=1).nonzero().flatten()
            m = m.clone()
            m[rows[: len(rows) // 2]] = False
            masks = {name: m}
        return masks
    return mask_fn


def _shifted_heads(model):
    lay = attention_layout(model)
    return lambda layer, head, block: qkov_mask(
        model, layer, (head + 1) % lay.layer(layer).num_heads, block)


def _q_k_swapped(model):
    """Q and K slices exchanged (biases included): in a fused layout without GQA both move
    exactly head h, so only the query-bias test can tell them apart.
    """
    swap = {"Q": "K", "K": "Q", "V": "V", "O": "O"}
    return lambda layer, head, block: qkov_mask(model, layer, head, swap[block], include_bias=True)


WRONG = [
    pytest.param(TinyConfig(arch="gpt2", num_layers=1), _q_k_swapped, "Q",
                 "perturbing the Q slice's bias entries alone changed attention patterns for "
                 "heads [], expected [0]", id="gpt2-Q-K-swapped"),
    pytest.param(TinyConfig(arch="gpt_neox", num_layers=1), _q_k_swapped, "Q",
                 "perturbing the Q slice's last bias entry alone changed attention patterns for "
                 "heads [], expected [0]", id="neox-Q-K-swapped"),
    pytest.param(TinyConfig(arch="gpt2", num_layers=1), gpt2_o_by_columns, "O",
                 "with head 0 zeroed", id="gpt2-O-by-columns"),
    pytest.param(TinyConfig(arch="phi3", num_layers=1, num_heads=4, num_kv_heads=2),
                 lambda m: phi3_v_offset(m, forget_k=True), "V",
                 "attention patterns changed for heads [0, 1], expected []", id="phi3-V-offset-forgets-K"),
    pytest.param(TinyConfig(arch="phi3", num_layers=1, num_heads=4, num_kv_heads=2),
                 lambda m: phi3_v_offset(m, forget_k=False), "V", "the slice is empty",
                 id="phi3-V-offset-H-key-heads"),
    pytest.param(TinyConfig(arch="llama", num_layers=1, num_heads=4, num_kv_heads=2, head_dim=2,
                            hidden=12), head_dim_from_d_over_h, "Q",
                 "attention patterns changed for heads [0, 1], expected [0]", id="llama-head_dim-d/H"),
    pytest.param(TinyConfig(arch="gpt_neox", num_layers=1),
                 lambda m: (lambda layer, h, b: qkov_mask(m, layer, h, b, layout=neox_as_blocks_layout(m))),
                 "K", "attention patterns changed for heads [], expected [0]", id="neox-as-3-H-dh"),
    pytest.param(TinyConfig(arch="bert", num_layers=1), _half_of_q, "Q+K",
                 "the slices miss entries of head 0", id="bert-Q-half-a-head"),
    pytest.param(TinyConfig(arch="mistral", num_layers=1, num_heads=4, num_kv_heads=2),
                 _shifted_heads, "Q", "expected [0]", id="mistral-shifted-heads"),
]


@pytest.mark.parametrize("cfg, make_mask_fn, block, message", WRONG)
def test_wrong_slicing_fails(cfg, make_mask_fn, block, message):
    model = build_model(cfg)
    report = check_masks(model, make_mask_fn(model), attention_layout(model))
    assert not report.passed
    first = next(c for c in report.failures() if c.block == block and c.head == 0)
    assert message in "; ".join(first.problems), str(report)


# ------------------------------------------- mis-sliced layouts of the issue #12 families


def _declared_as(model, **change):
    """The detected layout, declared by hand with ``change`` (shapes still agree)."""
    return {"layers": [{k: v for k, v in asdict(la).items() if k not in ("index", "kind")} | change
                       for la in attention_layout(model).layers]}


def _masks_of_declared(**change):
    def make(model):
        layout = _declared_as(model, **change)
        return lambda layer, head, block: qkov_mask(model, layer, head, block, include_bias=True,
                                                    layout=layout)
    return make


def _falcon_mq_k_v_swapped(model):
    """Multi-query rows read as [Q | V | K]: the one K slice and the one V slice exchanged."""
    swap = {"Q": "Q", "K": "V", "V": "K", "O": "O"}
    return lambda layer, head, block: qkov_mask(model, layer, head, swap[block], include_bias=True)


def _kv_interleaved(model):
    """K/V of query head h taken from kv head h % H_kv instead of h // r (repeat_kv)."""
    lay = attention_layout(model)

    def mask_fn(layer, head, block):
        la = lay.layer(layer)
        if block in ("K", "V"):
            head = (head % la.num_kv_heads) * la.group_size  # a query head of kv head h % H_kv
        return qkov_mask(model, layer, head, block, include_bias=True)
    return mask_fn


def _q_rows_strided(model):
    """Q of head h as rows h, h + H, h + 2H, ... (the output axis read as [dh, H])."""
    lay = attention_layout(model)
    params = dict(model.named_parameters())

    def mask_fn(layer, head, block):
        la = lay.layer(layer)
        if block != "Q":
            return qkov_mask(model, layer, head, block)
        w = params[la.q]
        rows = torch.zeros(w.shape[0], dtype=torch.bool)
        rows[head::la.num_heads] = True
        return {la.q: rows[:, None].expand(w.shape).clone()}
    return mask_fn


def _v_of_next_kv_head(model):
    lay = attention_layout(model)

    def mask_fn(layer, head, block):
        la = lay.layer(layer)
        if block == "V":
            head = (head + la.group_size) % la.num_heads
        return qkov_mask(model, layer, head, block, include_bias=True)
    return mask_fn


FAMILY_WRONG = [
    pytest.param(TinyConfig(arch="falcon", num_layers=1, num_heads=4, num_kv_heads=2),
                 _masks_of_declared(packing="fused_blocks"), 0, "K",
                 "attention patterns changed for heads [2], expected [0, 1]",
                 id="falcon-grouped-read-as-blocks"),
    pytest.param(TinyConfig(arch="falcon-mq", num_layers=1, num_heads=4), _falcon_mq_k_v_swapped, 0, "K",
                 "attention patterns changed for heads [], expected [0, 1, 2, 3]",
                 id="falcon-mq-K-V-swapped"),
    pytest.param(TinyConfig(arch="falcon-rw", num_layers=1), _masks_of_declared(packing="fused_blocks"),
                 0, "K", "attention patterns changed for heads [], expected [0]",
                 id="falcon-rw-read-as-blocks"),
    pytest.param(TinyConfig(arch="bloom", num_layers=1), _q_k_swapped, 0, "Q",
                 "perturbing the Q slice's bias entries alone changed attention patterns for heads [], "
                 "expected [0]", id="bloom-Q-K-swapped"),
    pytest.param(TinyConfig(arch="opt", num_layers=1), _masks_of_declared(orientation="conv1d"), 0, "O",
                 "with head 0 zeroed", id="opt-read-as-conv1d"),
    pytest.param(TinyConfig(arch="gptj", num_layers=1), _q_rows_strided, 0, "Q",
                 "attention patterns changed for heads [0, 1], expected [0]", id="gptj-Q-strided"),
    pytest.param(TinyConfig(arch="gemma", num_layers=1, num_heads=2, num_kv_heads=1, hidden=12),
                 head_dim_from_d_over_h, 0, "Q", "attention patterns changed for heads [0, 1], expected [0]",
                 id="gemma-head_dim-d/H"),
    pytest.param(TinyConfig(arch="gemma2", num_layers=1, num_heads=4, num_kv_heads=2, hidden=12),
                 _kv_interleaved, 1, "K", "attention patterns changed for heads [2, 3], expected [0, 1]",
                 id="gemma2-kv-interleaved"),
    pytest.param(TinyConfig(arch="qwen3", num_layers=1, num_heads=4, num_kv_heads=2, hidden=12),
                 _kv_interleaved, 1, "V", "O-projection inputs changed for heads [2, 3], expected [0, 1]",
                 id="qwen3-kv-interleaved"),
    pytest.param(TinyConfig(arch="starcoder2", num_layers=1, num_heads=4, num_kv_heads=2),
                 _v_of_next_kv_head, 0, "V", "O-projection inputs changed for heads [2, 3], expected [0, 1]",
                 id="starcoder2-V-of-next-kv-head"),
    pytest.param(TinyConfig(arch="stablelm", num_layers=1, num_heads=4, num_kv_heads=2),
                 _q_rows_strided, 0, "Q", "attention patterns changed for heads [0, 1, 2, 3], expected [0]",
                 id="stablelm-Q-strided"),
]


@pytest.mark.parametrize("cfg, make_mask_fn, head, block, message", FAMILY_WRONG)
def test_mis_sliced_family_fails(cfg, make_mask_fn, head, block, message):
    model = build_model(cfg)
    report = check_masks(model, make_mask_fn(model), attention_layout(model), heads=[head])
    first = next(c for c in report.failures() if c.block == block and c.head == head)
    assert message in "; ".join(first.problems), str(report)


def test_falcon_grouped_declared_as_blocks_is_rejected():
    model = build_model(TinyConfig(arch="falcon", num_layers=1, num_heads=4, num_kv_heads=2))
    wrong = _declared_as(model, packing="fused_blocks")
    assert attention_layout(model, wrong).layer(0).packing == "fused_blocks"  # shapes agree
    with pytest.raises(ValueError, match="expected every QK-OV slice to pass the semantic check"):
        validate_layout(model, wrong, heads=[0])
    assert validate_layout(model, heads=[0]).layer(0).packing == "fused_grouped"


def test_wrong_declared_layout_is_rejected():
    model = build_model(TinyConfig(arch="gpt_neox", num_layers=1))
    wrong = neox_as_blocks_layout(model)
    assert attention_layout(model, wrong).layer(0).packing == "fused_blocks"  # shapes agree
    with pytest.raises(ValueError, match="expected every QK-OV slice to pass the semantic check"):
        validate_layout(model, wrong)


def test_validate_layout_returns_the_layout_when_right():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    assert validate_layout(model) == attention_layout(model)


def _gpt2():
    return build_model(TinyConfig(arch="gpt2", num_layers=1))


def _masks_with(change):
    model = _gpt2()
    return lambda: check_masks(model, lambda layer, h, b: change(qkov_mask(model, layer, h, b)), None)


BAD = [
    pytest.param(_masks_with(lambda m: {k: v.double() for k, v in m.items()}),
                 "expected a bool mask of shape (8, 24)", id="float-mask"),
    pytest.param(_masks_with(lambda m: {"nope": True}), "expected parameter names of the model, got 'nope'",
                 id="unknown-name"),
    pytest.param(_masks_with(lambda m: {k: v[:1] for k, v in m.items()}), "got torch.bool (1,",
                 id="wrong-shape"),
    pytest.param(_masks_with(lambda m: [m]), "expected a dict name -> bool mask", id="not-a-dict"),
    pytest.param(lambda: check_layout(_gpt2(), heads=[2]), "heads: expected integers in [0, 2)",
                 id="head-out-of-range"),
    pytest.param(lambda: check_layout(_gpt2(), layers=[1]), "layer: expected an integer in [0, 1)",
                 id="layer-out-of-range"),
]


@pytest.mark.parametrize("call, message", BAD)
def test_bad_input(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_checks_an_eager_float64_copy_and_leaves_the_model_alone():
    model = build_model(TinyConfig(arch="llama", num_layers=1))
    model.set_attn_implementation("sdpa")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert check_layout(model).passed
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(p, before[n]) and p.dtype == torch.float32 for n, p in model.named_parameters())


# ------------------------------------------------- inputs that cannot move a head: inconclusive


def _blind_gpt2():
    """GPT-2 without position embeddings, fed one token repeated: every position of every
    layer holds the same hidden state, so keys and values coincide over positions. Causal
    patterns then stay uniform over each prefix whatever Q and K are, and the O-projection
    input is the (common) value whatever the pattern: Q and K cannot be tested, V and O can.
    """
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    batch = {"input_ids": torch.full((2, 5), 3), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    return model, batch


def test_heads_the_inputs_cannot_move_are_inconclusive_not_failed():
    model, batch = _blind_gpt2()
    report = check_layout(model, batch=batch)
    status = {(c.head, c.block): c.status for c in report.checks}
    for h in (0, 1):
        assert status[(h, "Q")] == status[(h, "K")] == "inconclusive"
        assert status[(h, "Q+K")] == status[(h, "Q+K+V")] == "inconclusive"
        assert status[(h, "V")] == "passed" and status[(h, "O")] == "passed"
    assert not report.failures() and not report.passed
    assert "cannot move on these inputs" in str(report) and "inconclusive" in str(report)
    with pytest.raises(ValueError, match="cannot decide"):
        validate_layout(model, batch=batch)
    # the same model on ordinary inputs decides everything
    assert check_layout(model).passed


def test_a_head_moving_wrongly_fails_even_where_others_are_inconclusive():
    model, batch = _blind_gpt2()

    def v_of_next_head(layer, head, block):
        return qkov_mask(model, layer, (head + 1) % 2 if block == "V" else head, block)

    report = check_masks(model, v_of_next_head, batch=batch)
    failed = {(c.head, c.block) for c in report.failures()}
    assert {(0, "V"), (1, "V")} <= failed
    assert all(c.block in ("Q", "K", "Q+K", "Q+K+V") for c in report.inconclusive())
