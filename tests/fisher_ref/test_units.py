"""Per-unit gradients against each row run alone, through an independent float64 autograd."""

import contextlib
import copy

import pytest
import torch

from fisher_ref.losses import (
    CausalLMLoss,
    MaskedLMLoss,
    causal_lm_loss,
    masked_lm_loss,
    sequence_classification_loss,
)
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance
from fisher_ref.units import per_sample_gradients

RTOL, ATOL = tolerance("float64-paths")

ARCHS = [
    pytest.param("gpt2", "causal", causal_lm_loss, id="arch=gpt2-tied"),
    pytest.param("llama", "causal", causal_lm_loss, id="arch=llama"),
    pytest.param("bert", "mlm", masked_lm_loss, id="arch=bert-mlm"),
]


@contextlib.contextmanager
def float64_softmax():
    """HF eager attention of LLaMA-like models asks for a float32 softmax; keep float64."""
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return original(x, dim=dim)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


def _row_alone_gradient(model, batch, i, kind, reduction="mean"):
    """Gradient of row i's loss, the row trimmed of its padding and run on its own."""
    m = copy.deepcopy(model).double()
    n = int(batch["attention_mask"][i].sum())
    one = {k: v[i:i + 1, :n] for k, v in batch.items() if k != "sample_ids"}
    logits, labels = m(**one).logits[0], one["labels"][0]
    if kind == "causal":
        logits, labels = logits[:-1], labels[1:]
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)
    names = [name for name, _ in m.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in m.named_parameters()], allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g
            for k, g, p in zip(names, grads, m.parameters(), strict=True)}


@pytest.mark.parametrize("arch,kind,loss", ARCHS)
def test_row_gradient_equals_the_row_run_alone(arch, kind, loss):
    model = build_model(TinyConfig(arch=arch, num_layers=1))
    batch = random_batch(kind=kind, batch_size=3, seed=4)
    pu = per_sample_gradients(model, batch, loss_fn=loss)
    for i in range(3):
        got = {k: v[i] for k, v in pu.tensors.items()}
        assert_dicts_close(got, _row_alone_gradient(model, batch, i, kind),
                           rtol=RTOL, atol=ATOL, what=f"{arch} row {i}")


@pytest.mark.parametrize("arch,kind,loss", ARCHS)
def test_padding_changes_no_row_gradient(arch, kind, loss):
    model = build_model(TinyConfig(arch=arch, num_layers=1))
    batch = random_batch(kind=kind, batch_size=3, seq_len=4, seed=5)
    padded = {k: torch.nn.functional.pad(v, (0, 2), value=-100 if k == "labels" else 0)
              for k, v in batch.items()}
    a = per_sample_gradients(model, batch, loss_fn=loss)
    b = per_sample_gradients(model, padded, loss_fn=loss)
    assert_dicts_close(b.tensors, a.tensors, rtol=RTOL, atol=ATOL, what="padded")


ROW_CASES = ARCHS + [pytest.param("bert-cls", "cls", sequence_classification_loss, id="arch=bert-cls")]


@pytest.mark.parametrize("arch,kind,loss", ROW_CASES)
def test_a_rows_gradient_does_not_depend_on_the_other_rows(arch, kind, loss):
    """Row 0 keeps its gradient whatever rows (other lengths, other padding) share its batch."""
    model = build_model(TinyConfig(arch=arch, num_layers=1))
    first = random_batch(kind=kind, batch_size=3, seq_len=5, seed=31)
    other = random_batch(kind=kind, batch_size=3, seq_len=5, seed=32)
    mixed = {k: torch.cat([first[k][:1], other[k][1:]]) for k in first}
    assert not torch.equal(mixed["input_ids"][1:], first["input_ids"][1:])
    assert int(mixed["attention_mask"].sum(1).min()) < 5  # some row is padded
    a = per_sample_gradients(model, first, loss_fn=loss, unit="token" if kind != "cls" else "sample")
    b = per_sample_gradients(model, mixed, loss_fn=loss, unit="token" if kind != "cls" else "sample")
    n0 = sum(1 for u in a.ids if (u[0] if isinstance(u, tuple) else u) == 0)
    assert n0 == sum(1 for u in b.ids if (u[0] if isinstance(u, tuple) else u) == 0) > 0
    assert_dicts_close({k: v[:n0] for k, v in b.tensors.items()},
                       {k: v[:n0] for k, v in a.tensors.items()}, rtol=RTOL, atol=ATOL,
                       what=f"{arch} row 0")


def test_a_model_in_training_mode_with_dropout_is_rejected():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    model.train()
    with pytest.raises(ValueError, match="expected each row's loss not to depend on the other rows"):
        per_sample_gradients(model, random_batch(kind="causal", batch_size=2, seed=1))


def test_tied_parameter_gradient_is_the_sum_over_its_uses():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = random_batch(kind="causal", batch_size=2, seed=6)
    tied = per_sample_gradients(model, batch)
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    sep = per_sample_gradients(untied, batch)
    total = sep.tensors["transformer.wte.weight"] + sep.tensors["lm_head.weight"]
    assert "lm_head.weight" not in tied.tensors
    torch.testing.assert_close(tied.tensors["transformer.wte.weight"], total, rtol=RTOL, atol=ATOL)


def test_empty_rows_are_excluded_and_reported():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    batch = random_batch(kind="causal", batch_size=4, empty_rows=(0, 2), seed=7,
                         sample_ids=["a", "b", "c", "d"])
    for unit in ("sample", "token"):
        pu = per_sample_gradients(model, batch, unit=unit)
        assert pu.empty_ids == ["a", "c"]
        assert {i if unit == "sample" else i[0] for i in pu.ids} == {"b", "d"}


def test_token_units_sum_to_the_sum_reduced_row_gradient():
    model = build_model(TinyConfig(arch="bert", num_layers=1))
    batch = random_batch(kind="mlm", batch_size=3, seed=8)
    tok = per_sample_gradients(model, batch, loss_fn=MaskedLMLoss("sum"), unit="token")
    rows = [sid for sid, _ in tok.ids]
    assert tok.ids == sorted(tok.ids)  # row-major, positions increasing
    for i in range(3):
        mask = torch.tensor([r == i for r in rows])
        got = {k: v[mask].sum(0) for k, v in tok.tensors.items()}
        assert_dicts_close(got, _row_alone_gradient(model, batch, i, "mlm", "sum"),
                           rtol=RTOL, atol=ATOL, what=f"row {i}")


def test_weights_and_ids_by_hand():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    labels = torch.tensor([[1, 2, 3, -100], [1, 2, -100, -100], [1, 2, 3, 4]])
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": (labels >= 0).long(),
             "labels": labels}
    pu = per_sample_gradients(model, batch, weighting="token", sample_ids=[7, "x", 9])
    assert pu.ids == [7, "x", 9] and pu.weights.tolist() == [2.0, 1.0, 3.0]
    tok = per_sample_gradients(model, batch, unit="token", weighting="token", sample_ids=[7, "x", 9])
    assert tok.ids == [(7, 0), (7, 1), ("x", 0), (9, 0), (9, 1), (9, 2)]
    assert tok.weights.tolist() == [1.0] * 6


def test_the_users_model_is_not_modified():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pu = per_sample_gradients(model, random_batch(kind="causal", batch_size=2))
    assert all(p.grad is None and p.dtype == torch.float32 for p in model.parameters())
    assert_dicts_close(model.state_dict(), before, rtol=0.0, atol=0.0, what="state")
    assert all(v.dtype == torch.float64 for v in pu.tensors.values())


def test_sum_reduction_scales_row_gradient_by_token_count():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1))
    batch = random_batch(kind="causal", batch_size=3, seed=9)
    mean = per_sample_gradients(model, batch)
    summed = per_sample_gradients(model, batch, loss_fn=CausalLMLoss("sum"))
    k = causal_lm_loss.token_counts(batch).double()
    for name, g in mean.tensors.items():
        scale = k.reshape(-1, *[1] * (g.dim() - 1))
        torch.testing.assert_close(summed.tensors[name], g * scale, rtol=RTOL, atol=ATOL)


def _first_row_gradient(model, batch):
    one = {k: v[:1] for k, v in batch.items()}
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(causal_lm_loss(model, one)[0], [p for _, p in model.named_parameters()])
    return dict(zip(names, grads, strict=True))


def test_oracle_runs_the_models_own_attention_whose_eager_softmax_is_float32():
    """The documented caveat (definitions §0): LLaMA's eager attention takes its softmax in
    float32 even in float64. The oracle runs the model as given; with SDPA it equals an eager
    reference whose softmax stays float64 (its RMSNorm upcasts to float32 in both).
    """
    model = build_model(TinyConfig(arch="llama", num_layers=2)).double()
    batch = random_batch(kind="causal", batch_size=3, seed=12)
    with float64_softmax():
        exact = _first_row_gradient(model, batch)
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    got = per_sample_gradients(sdpa, batch)
    assert_dicts_close({n: t[0] for n, t in got.tensors.items()}, exact, rtol=RTOL, atol=ATOL,
                       what="sdpa")
    eager = per_sample_gradients(model, batch)
    worst = max(float((eager.tensors[n][0] - g).abs().max() / g.abs().max()) for n, g in exact.items())
    assert 1e-12 < worst < 1e-5


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
@pytest.mark.parametrize("arch, kind, loss", [
    pytest.param("gpt2", "causal", causal_lm_loss, id="causal"),
    pytest.param("bert-cls", "cls", sequence_classification_loss, id="cls"),
])
def test_integer_labels_of_any_width_give_the_int64_gradients(dtype, arch, kind, loss):
    model = build_model(TinyConfig(arch=arch, num_layers=1))
    batch = random_batch(kind=kind, batch_size=2, seq_len=5, seed=4)
    if dtype == torch.uint8:  # -100 does not fit: every label active
        batch["labels"] = batch["labels"].clamp(min=0)
    want = per_sample_gradients(model, batch, loss_fn=loss)
    got = per_sample_gradients(model, {**batch, "labels": batch["labels"].to(dtype)}, loss_fn=loss)
    assert got.ids == want.ids
    assert_dicts_close(got.tensors, want.tensors, rtol=0, atol=0)
