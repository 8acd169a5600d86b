"""The oracle on any model: plain classifiers (MLP, CNN, LayerNorm/GELU, ViT), custom losses
with any batch keys, the classifier loss, and torch's nn.MultiheadAttention as an attention
layout (slices by hand, the semantic check on the model's own forward).

Independent references: ``torch.func.vmap(grad(...))`` of each row's loss (not fisher_ref's
one-``autograd.grad``-per-unit loop), the closed form of softmax regression, and hand
cross-entropies.
"""

import math

import pytest
import torch
from torch import nn

import fisher_ref
from fisher_ref.layouts import attention_layout
from fisher_ref.losses import ClassifierLoss, classifier_loss
from fisher_ref.semantic_check import check_layout, check_masks
from fisher_ref.slicing import qkov_mask
from fisher_ref.testing.classifiers import (
    CLASSIFIER_ARCHS,
    ClassifierConfig,
    build_classifier,
    classifier_batch,
)
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import build_model
from fisher_ref.testing.tolerances import tolerance

RTOL, ATOL = tolerance("float64-paths")


def _vmap_grads(model, batch):
    """Per-row gradients of the row's cross-entropy by torch.func (an independent path)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def row_loss(p, x, y):
        logits = torch.func.functional_call(model, p, (x[None],))
        return nn.functional.cross_entropy(logits, y[None])

    return torch.func.vmap(torch.func.grad(row_loss), in_dims=(None, 0, 0))(
        params, batch["input"], batch["labels"])


@pytest.mark.parametrize("arch", CLASSIFIER_ARCHS)
def test_per_sample_gradients_of_classifiers_equal_torch_func(arch):
    cfg = ClassifierConfig(arch=arch)
    model = build_classifier(cfg, dtype=torch.float64)
    batch = classifier_batch(cfg, batch_size=3, seed=2)
    pu = fisher_ref.per_sample_gradients(model, batch, loss_fn=classifier_loss)
    assert_dicts_close(pu.tensors, _vmap_grads(model, batch), rtol=RTOL, atol=ATOL)
    F = fisher_ref.empirical_fisher(model, batch, loss_fn=classifier_loss)
    want = {n: g.square().mean(0) for n, g in _vmap_grads(model, batch).items()}
    assert_dicts_close(dict(F), want, rtol=RTOL, atol=ATOL)


def test_softmax_regression_fisher_by_the_closed_form():
    # g_i(W) = (p_i - e_{y_i}) x_i^T, g_i(b) = p_i - e_{y_i}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    with torch.no_grad():
        r = torch.softmax(model(x), -1) - nn.functional.one_hot(y, 4).double()
    gw, gb = r[:, :, None] * x[:, None, :], r
    F = fisher_ref.empirical_fisher(model, {"input": x, "labels": y}, loss_fn=classifier_loss)
    S = fisher_ref.squared_mean_gradient(model, {"input": x, "labels": y}, loss_fn=classifier_loss)
    assert_dicts_close(dict(F), {"0.weight": gw.square().mean(0), "0.bias": gb.square().mean(0)},
                       rtol=RTOL, atol=ATOL)
    assert_dicts_close(dict(S), {"0.weight": gw.mean(0).square(), "0.bias": gb.mean(0).square()},
                       rtol=RTOL, atol=ATOL)


def test_custom_loss_takes_any_batch_keys():
    # the example: nn.Sequential takes `input`, but the keys are the loss's business
    model = nn.Sequential(nn.Linear(3, 2)).double().eval()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch["x"]), batch["y"], reduction="none")

    F = fisher_ref.empirical_fisher(model, {"x": x, "y": y}, loss_fn=loss_fn)
    want = fisher_ref.empirical_fisher(model, {"input": x, "labels": y}, loss_fn=classifier_loss)
    assert_dicts_close(dict(F), dict(want), rtol=RTOL, atol=ATOL)


def test_a_summed_custom_loss_is_the_row_loss_it_returns():
    # two labels per row: reduction "sum" is "mean" times K_i = 2 on every row, so F is 4x
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2 * 3), nn.Unflatten(1, (2, 3))).double().eval()
    batch = {"input": torch.randn(3, 3, dtype=torch.float64),
             "labels": torch.tensor([[0, 2], [1, 1], [2, 0]])}
    mean = fisher_ref.empirical_fisher(model, batch, loss_fn=ClassifierLoss("mean"))
    total = fisher_ref.empirical_fisher(model, batch, loss_fn=ClassifierLoss("sum"))
    assert_dicts_close(dict(total), {n: 4 * v for n, v in mean.items()}, rtol=RTOL, atol=ATOL)


def test_classifier_loss_by_hand():
    model = nn.Identity()
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rows = classifier_loss(model, {"input": logits, "labels": torch.tensor([0, -100])})
    assert rows[0].item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)), rel=1e-15)
    assert rows[1].item() == 0.0  # an empty row
    assert classifier_loss.token_counts({"labels": torch.tensor([0, -100])}).tolist() == [1, 0]


def test_empty_classifier_rows_are_excluded_and_reported():
    cfg = ClassifierConfig(arch="mlp")
    model = build_classifier(cfg, dtype=torch.float64)
    batch = classifier_batch(cfg, batch_size=3, empty_rows=(1,), sample_ids=["a", "b", "c"])
    F = fisher_ref.empirical_fisher(model, batch, loss_fn=classifier_loss)
    kept = {k: v[[0, 2]] for k, v in batch.items() if k != "sample_ids"}
    want = fisher_ref.empirical_fisher(model, kept, loss_fn=classifier_loss)
    assert F.empty_ids == ["b"] and F.n_units == 2
    assert_dicts_close(dict(F), dict(want), rtol=RTOL, atol=ATOL)


def test_exact_fisher_of_a_classifier_by_enumeration():
    # exact F = sum_c p_c (grad -log p_c)^2, here by hand for one row of softmax regression
    model = nn.Sequential(nn.Linear(2, 3)).double().eval()
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)[0]
    want = sum(p[c] * ((p - nn.functional.one_hot(torch.tensor(c), 3).double())[:, None] * x).square()
               for c in range(3))
    E = fisher_ref.exact_fisher(model, {"input": x, "labels": torch.tensor([1])}, loss_fn=classifier_loss,
                                unit="token")
    torch.testing.assert_close(E["0.weight"], want, rtol=RTOL, atol=ATOL)


BAD = [
    pytest.param({"x": torch.zeros(2, 6), "labels": torch.tensor([0, 1])}, classifier_loss,
                 "expected key 'input'", id="classifier-without-input"),
    pytest.param({"input": torch.zeros(2, 6), "labels": torch.tensor([[[0]], [[1]]])}, classifier_loss,
                 r"labels: expected shape \[2\]", id="classifier-labels-3d"),
    pytest.param({"input": torch.zeros(2, 6), "labels": torch.zeros(2)}, classifier_loss,
                 "expected an integer tensor", id="classifier-float-labels"),
    pytest.param({"input_ids": torch.zeros(2, 3, dtype=torch.long),
                  "labels": torch.zeros(2, 3, dtype=torch.long), "nonsense": torch.zeros(2)},
                 None, "unknown keys", id="builtin-lm-loss-checks-keys"),
]


@pytest.mark.parametrize("batch,loss_fn,message", BAD)
def test_bad_batches_for_the_built_in_losses(batch, loss_fn, message):
    model = build_classifier(ClassifierConfig(arch="mlp"), dtype=torch.float64) if loss_fn else \
        build_model(dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        fisher_ref.empirical_fisher(model, batch, loss_fn=loss_fn)


def test_classifier_loss_rejects_bad_options():
    with pytest.raises(ValueError, match="input_key: expected a non-empty str"):
        ClassifierLoss("mean", input_key="")
    with pytest.raises(ValueError, match="reduction: expected one of"):
        ClassifierLoss("max")


# ------------------------------------------------------------------ nn.MultiheadAttention

VIT = ClassifierConfig(arch="vit", width=6, num_heads=3)  # E = 6, H = 3, dh = 2


def test_multihead_attention_layout_is_detected():
    (la,) = attention_layout(build_classifier(VIT)).layers
    assert (la.kind, la.packing, la.orientation) == ("torch_mha", "fused_blocks", "linear")
    assert (la.q, la.k, la.v, la.o) == ("attn.in_proj_weight",) * 3 + ("attn.out_proj.weight",)
    assert (la.q_bias, la.o_bias) == ("attn.in_proj_bias", "attn.out_proj.bias")
    assert (la.module, la.o_module, la.num_heads, la.num_kv_heads, la.head_dim) == (
        "attn", "attn.out_proj", 3, 3, 2)


# torch's in_projection_packed: w.chunk(3) gives Q, K, V rows; each reshaped [H, dh]; the
# output projection's input columns are [H, dh] (attn_output.transpose(...).view(..., E))
MHA_TABLE = [
    ("Q", 1, "attn.in_proj_weight", 0, [2, 3]),
    ("K", 2, "attn.in_proj_weight", 0, [6 + 4, 6 + 5]),
    ("V", 0, "attn.in_proj_weight", 0, [12, 13]),
    ("O", 2, "attn.out_proj.weight", 1, [4, 5]),
]


@pytest.mark.parametrize("block,head,name,axis,expected", MHA_TABLE, ids=lambda v: str(v))
def test_multihead_attention_slices_by_hand(block, head, name, axis, expected):
    masks = qkov_mask(build_classifier(VIT), 0, head, block)
    (m,) = masks.values()
    assert list(masks) == [name]
    assert m.any(dim=1 - axis).nonzero().flatten().tolist() == expected
    assert bool((m.any(dim=1 - axis) == m.all(dim=1 - axis)).all())


def test_multihead_attention_bias_slices_by_hand():
    masks = qkov_mask(build_classifier(VIT), 0, 1, "K", include_bias=True)
    assert masks["attn.in_proj_bias"].nonzero().flatten().tolist() == [8, 9]
    assert "attn.out_proj.bias" not in qkov_mask(build_classifier(VIT), 0, 1, "O", include_bias=True)


def _vit_inputs():
    return {"input": classifier_batch(VIT, batch_size=2, seed=3)["input"]}


def test_semantic_check_passes_for_multihead_attention():
    report = check_layout(build_classifier(VIT, dtype=torch.float64), batch=_vit_inputs())
    assert report.passed, str(report)
    assert len(report.checks) == 3 * 7  # per head: 4 perturbation and 3 complement checks


@pytest.mark.parametrize("wrong", ["q_is_k", "o_by_rows"])
def test_semantic_check_fails_wrong_multihead_attention_slices(wrong):
    model = build_classifier(VIT, dtype=torch.float64)

    def mask_fn(layer, head, block):
        # with biases: Q and K swapped is told apart by the query-bias check (H_kv = H)
        if wrong == "q_is_k" and block in ("Q", "K"):
            return qkov_mask(model, layer, head, "K" if block == "Q" else "Q", include_bias=True)
        if wrong == "o_by_rows" and block == "O":
            m = torch.zeros(6, 6, dtype=torch.bool)
            m[2 * head:2 * head + 2] = True
            return {"attn.out_proj.weight": m}
        return qkov_mask(model, layer, head, block, include_bias=True)

    report = check_masks(model, mask_fn, batch=_vit_inputs())
    assert report.failures(), str(report)


def test_multihead_attention_with_other_kdim_is_refused_clearly():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=3, batch_first=True)

    with pytest.raises(ValueError, match="expected attn .* one fused in_proj_weight"):
        attention_layout(Cross())
