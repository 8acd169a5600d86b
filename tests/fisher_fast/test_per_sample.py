"""per_sample_gradients: token units, ids, and the rows-do-not-interact guard."""

import pytest
import torch
import torch.nn.functional as F

import fisher_fast as ff
from fisher_ref.testing.tolerances import tolerance
from tests.fisher_fast._fast_modules import TinyLM, tiny_batch

TOL = dict(zip(("rtol", "atol"), tolerance("float64-paths")))


def test_token_unit_gradient_is_that_tokens_nll_gradient():
    model, batch = TinyLM(), tiny_batch(B=2)
    pu = ff.per_sample_gradients(model, batch, unit="token", dtype=torch.float64, chunk_size=4)
    j = pu.ids.index((1, 2))  # row 1, aligned position 2 predicts labels[1, 3]
    logits = model(batch["input_ids"][1:2])[0, 2]
    nll = F.cross_entropy(logits[None], batch["labels"][1, 3][None])
    want = torch.autograd.grad(nll, [model.lin.weight])[0]
    torch.testing.assert_close(pu.tensors["lin.weight"][j], want, **TOL)


def test_ids_weights_and_empty_rows_are_reported():
    model, batch = TinyLM(), tiny_batch(B=3, empty_rows=(1,))
    pu = ff.per_sample_gradients(model, batch, weighting="token", sample_ids=["a", "b", "c"],
                                 dtype=torch.float64)
    assert pu.ids == ["a", "c"] and pu.empty_ids == ["b"]
    assert pu.weights.tolist() == [4.0, 4.0]  # 5 labels, shifted: 4 targets per row
    assert pu.tensors["lin.weight"].shape == (2, 4, 4)


class MixRows(torch.nn.Module):
    """Subtracts the batch mean: rows interact, so per-row capture is not exact."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1).double()

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return h - h.mean(0, keepdim=True)


def test_check_detects_interacting_rows():
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    loss = lambda m, b: (m(b["x"]).squeeze(-1) - 1.0) ** 2  # noqa: E731
    with pytest.raises(ValueError, match="rows interact"):
        ff.per_sample_gradients(MixRows(), {"x": x}, loss_fn=loss, dtype=torch.float64, check=True)


def test_check_passes_on_independent_rows():
    pu = ff.per_sample_gradients(TinyLM(tied=True), tiny_batch(B=3), dtype=torch.float64,
                                 check=True)
    assert len(pu.ids) == 3


def test_params_restricts_what_is_computed(monkeypatch):
    from fisher_fast.capture import rules as capture_rules
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch="gpt2", num_layers=2), dtype=torch.float64)
    batch = random_batch(vocab_size=11, batch_size=3, seq_len=5, seed=2)
    wanted = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.bias"]
    whole = ff.per_sample_gradients(model, batch, dtype=torch.float64)

    def untouchable(*_a, **_k):
        raise AssertionError("an unwanted module's per-row gradients were computed")
    # the embeddings and the norms are not wanted: their rules must never run
    for rule in (capture_rules.EmbeddingRule, capture_rules.LayerNormRule):
        for method in ("grads", "pairs"):
            if hasattr(rule, method):
                monkeypatch.setattr(rule, method, untouchable)
    part = ff.per_sample_gradients(model, batch, dtype=torch.float64, params=wanted)
    assert list(part.tensors) == wanted and part.ids == whole.ids
    for n in wanted:
        torch.testing.assert_close(part.tensors[n], whole.tensors[n], **TOL)


@pytest.mark.parametrize("bad", [["nope"], [], "transformer.wte.weight"])
def test_params_must_name_trainable_parameters(bad):
    model, batch = TinyLM(), tiny_batch(B=2)
    with pytest.raises(ValueError, match="params: expected"):
        ff.per_sample_gradients(model, batch, params=bad)


def test_params_of_a_tied_model_leave_the_tied_weight_out_when_not_named():
    # a tied output Linear with its own bias: asking for the bias only must not form (or
    # hand over) the tied weight's per-row buffer
    model, batch = TinyLM(tied=True), tiny_batch(B=3)
    model.out.bias = torch.nn.Parameter(torch.linspace(-0.1, 0.1, 7, dtype=torch.float64))
    assert model.out.weight is model.emb.weight
    part = ff.per_sample_gradients(model, batch, dtype=torch.float64, params=["out.bias"])
    whole = ff.per_sample_gradients(model, batch, dtype=torch.float64)
    assert list(part.tensors) == ["out.bias"]
    torch.testing.assert_close(part.tensors["out.bias"], whole.tensors["out.bias"], **TOL)


@pytest.mark.parametrize("case", ["float64-model-float32-result", "bf16-model", "autocast", "params"])
def test_check_passes_at_every_precision_and_on_a_subset(case):
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch="gpt2", num_layers=2))
    batch = random_batch(vocab_size=11, batch_size=3, seq_len=6, seed=2)
    kw = {"float64-model-float32-result": dict(),
          "bf16-model": dict(), "autocast": dict(autocast=torch.bfloat16),
          "params": dict(params=["transformer.wte.weight"])}[case]
    model = {"float64-model-float32-result": model.double(),
             "bf16-model": model.to(torch.bfloat16)}.get(case, model)
    pu = ff.per_sample_gradients(model, batch, check=True, **kw)
    assert len(pu.ids) == 3
    if case == "params":
        assert list(pu.tensors) == ["transformer.wte.weight"]
