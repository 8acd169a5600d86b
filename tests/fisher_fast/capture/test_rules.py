"""Every capture path against per-row autograd, on a tiny model that uses them all."""

import pytest
import torch

import fisher_fast as ff
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.tolerances import tolerance
from tests.fisher_fast._fast_modules import TinyLM, row_gradients, tiny_batch

GRAM = dict(zip(("rtol", "atol"), tolerance("ghost-norm"), strict=True))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_per_row_gradients_match_autograd(tied):
    model, batch = TinyLM(tied=tied), tiny_batch()
    got = ff.per_sample_gradients(model, batch, dtype=torch.float64, chunk_size=3)
    want = row_gradients(model, batch, ff.causal_lm_loss)
    tol = dict(zip(("rtol", "atol"), tolerance("float64-paths"), strict=True))
    assert_dicts_close(got.tensors, want, **tol)


def test_padding_row_of_embedding_gets_no_gradient():
    model, batch = TinyLM(), tiny_batch()
    got = ff.per_sample_gradients(model, batch, dtype=torch.float64)
    assert torch.count_nonzero(got.tensors["emb.weight"][:, 0]) == 0
    assert torch.count_nonzero(got.tensors["emb.weight"][:, 1:]) > 0


def test_each_module_kind_takes_its_path():
    model = TinyLM()
    ff.per_sample_gradients(model, tiny_batch(B=2))  # runs the RMS check
    plan = ff.capture_plan(model)
    assert plan["emb.weight"] == ["emb:embedding"]
    assert plan["ln.bias"] == ["ln:layernorm"]
    assert plan["lin.weight"] == ["lin:linear"]
    assert plan["rms.weight"] == ["rms:rmsnorm"]
    assert plan["scale.scale"] == ["scale:functorch"]
    assert plan["conv.weight"] == ["conv:conv1d"]


def test_rms_lookalike_that_is_not_rms_falls_back_to_functorch():
    from fisher_fast.capture.plan import build_plan

    model = TinyLM()
    assert ff.capture_plan(model)["gemma.weight"] == ["gemma:rmsnorm"]  # by its attributes
    plan = build_plan(model)
    from fisher_fast.batching.units import plan_units
    from fisher_fast.run.chunks import run_chunks
    from fisher_fast.run.options import Options
    from fisher_fast.stats.sinks import PerUnitSink
    batch = tiny_batch(B=2)
    units = plan_units(model, batch, [0, 1], ff.causal_lm_loss, "sample", "sample")
    sink = PerUnitSink(plan.params, 2, torch.float64, "cpu")
    list(run_chunks(model, plan, batch, units, Options.of(dtype=torch.float64),
                    new_sink=lambda s, n: sink))
    assert plan.describe()["gemma.weight"] == ["gemma:functorch"]


def test_tied_parameter_appears_once_with_both_uses():
    plan = ff.capture_plan(TinyLM(tied=True))
    assert sorted(plan["emb.weight"]) == ["emb:embedding", "out:linear"]
    assert "out.weight" not in plan


def test_gram_norms_equal_materialised_row_norms():
    from fisher_fast.capture.rules import CONV1D, LINEAR

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    dy = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    full = torch.einsum("nto,nti->noi", dy, x)  # [n, out, in] by definition
    rows = LINEAR.gram_norms(None, x, dy, slice(0, 3), torch.float64)
    cols = CONV1D.gram_norms(None, x, dy, slice(0, 3), torch.float64)
    inputs = LINEAR.gram_norms(None, x, dy, slice(0, 3), torch.float64, "in")
    torch.testing.assert_close(rows, full.square().sum(-1), **GRAM)
    torch.testing.assert_close(cols, full.square().sum(-1), **GRAM)
    torch.testing.assert_close(inputs, full.square().sum(-2), **GRAM)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "gpt_neox", "phi3"])
def test_hf_models_need_no_functorch_and_tie_their_heads(arch):
    from fisher_ref.testing.models import TinyConfig, build_model

    plan = ff.capture_plan(build_model(TinyConfig(arch=arch, num_layers=1)))
    paths = {use.split(":")[1] for uses in plan.values() for use in uses}
    assert "functorch" not in paths
    tied = [uses for uses in plan.values() if len(uses) == 2]
    assert len(tied) == 1 and {u.split(":")[1] for u in tied[0]} == {"embedding", "linear"}


def _sparse_only(monkeypatch):
    """Make the dense embedding rule fail, so that a passing run took the pair path."""
    from fisher_fast.capture.rules import EMBEDDING

    def dense(*a, **k):
        raise AssertionError("dense [n, V, d] embedding gradient formed")
    monkeypatch.setattr(EMBEDDING, "grads", dense)


def test_sparse_embedding_moments_equal_dense_rows(monkeypatch):
    # repeated tokens within rows (V = 7, T = 6) and a padding token (id 0) in every row
    model, batch = TinyLM(rms=False), tiny_batch(B=5, seed=3)
    assert all(len(set(r[:-1].tolist())) < 5 for r in batch["input_ids"])  # repeats in each row
    rows = ff.per_sample_gradients(model, batch, dtype=torch.float64).tensors  # dense path
    _sparse_only(monkeypatch)
    kw = dict(dtype=torch.float64, chunk_size=2)
    fisher = ff.empirical_fisher(model, batch, **kw)
    variance = ff.gradient_variance(model, batch, **kw)
    groups = ff.group_fisher(model, batch, **kw)
    tol = dict(zip(("rtol", "atol"), tolerance("float64-paths"), strict=True))
    for name in ("emb.weight", "pos.weight"):
        g = rows[name]
        torch.testing.assert_close(fisher[name], g.square().mean(0), **tol)
        torch.testing.assert_close(variance[name], g.var(0, unbiased=False), **tol)
        torch.testing.assert_close(groups[name]["mean"], g.square().sum(-1).mean(0), **tol)


def test_sparse_embedding_path_equals_oracle(monkeypatch):
    import fisher_ref as fr
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    # untied GPT-2, vocab 5 over 6 positions (tokens repeat within rows), padded rows
    model = build_model(TinyConfig(arch="gpt2", num_layers=1, vocab_size=5,
                                   tie_embeddings=False)).double()
    batch = random_batch(vocab_size=5, batch_size=4, seq_len=6, seed=2, empty_rows=(1,))
    _sparse_only(monkeypatch)
    tol = dict(zip(("rtol", "atol"), tolerance("float64-paths"), strict=True))
    for fast, ref in [(ff.empirical_fisher, fr.empirical_fisher),
                      (ff.gradient_variance, fr.gradient_variance)]:
        assert_dicts_close(fast(model, batch, dtype=torch.float64, chunk_size=3),
                           ref(model, batch), **tol)


def test_tied_embedding_scatters_into_the_shared_buffer(monkeypatch):
    # GPT-2's wte is also its head: each row's embedding share is scattered into the
    # per-row buffer that holds the head's share (repeated tokens summed, before squaring),
    # never formed densely on its own; per-row gradients and F equal the oracle's
    import fisher_ref as fr
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch="gpt2", num_layers=1, vocab_size=5)).double()
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = random_batch(vocab_size=5, batch_size=4, seq_len=6, seed=2, empty_rows=(1,))
    tol = dict(zip(("rtol", "atol"), tolerance("float64-paths"), strict=True))
    got = ff.per_sample_gradients(model, batch, dtype=torch.float64, chunk_size=2)
    want = fr.per_sample_gradients(model, batch)
    torch.testing.assert_close(got.tensors["transformer.wte.weight"],
                               want.tensors["transformer.wte.weight"], **tol)
    _sparse_only(monkeypatch)  # from here a dense embedding gradient would fail the test
    assert_dicts_close(ff.empirical_fisher(model, batch, dtype=torch.float64, chunk_size=3),
                       fr.empirical_fisher(model, batch), **tol)


CONVS = {
    "pad1": dict(padding=1),
    "same-even-kernel": dict(padding="same", kernel_size=2),  # asymmetric zero padding
    "valid-stride2": dict(padding="valid", stride=2),
    "dilated-no-bias": dict(padding=(2, 1), dilation=2, bias=False),
    "rect-kernel": dict(kernel_size=(3, 1), stride=(1, 2)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("conv", CONVS)
def test_conv2d_per_row_gradients_via_unfold_match_autograd(conv):
    kw = {"kernel_size": 3, **CONVS[conv]}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, **kw), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.LazyLinear(4)).double()
    x = torch.randn(5, 2, 6, 7, dtype=torch.float64)
    model(x)  # materialise the lazy layer
    model.eval()
    assert ff.capture_plan(model)["0.weight"] == ["0:conv2d"]
    batch = {"input": x, "labels": torch.arange(5) % 4}
    got = ff.per_sample_gradients(model, batch, loss_fn=ff.sequence_classification_loss,
                                  dtype=torch.float64, chunk_size=2)
    want = row_gradients(model, batch, ff.sequence_classification_loss)
    tol = dict(zip(("rtol", "atol"), tolerance("float64-paths"), strict=True))
    assert_dicts_close(got.tensors, want, **tol)


@pytest.mark.parametrize("conv", [dict(groups=2), dict(padding=1, padding_mode="reflect")],
                         ids=["grouped", "reflect-padding"])
def test_conv2d_the_rule_does_not_cover_goes_to_functorch(conv):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, **conv))
    assert ff.capture_plan(model)["0.weight"] == ["0:functorch"]


@pytest.mark.parametrize("rule_name", ["LINEAR", "CONV1D"])
def test_separable_factors_give_the_squared_rows_of_one_position(rule_name):
    from fisher_fast.capture import rules

    rule = getattr(rules, rule_name)
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g,
                                                                              dtype=torch.float64)
    w = torch.rand(4, generator=g, dtype=torch.float64)
    d2, x2 = rule.separable(None, x, dy, torch.float64)
    full = rule._weight(x[:, None], dy[:, None])  # [n, *weight shape] by the rows' formula
    want = torch.tensordot(w, full.square(), dims=1)
    got = (w[:, None] * d2).T @ x2 if rule.out_axis == 0 else x2.T @ (w[:, None] * d2)
    torch.testing.assert_close(got, want, **GRAM)


def test_ghost_norm_of_the_whole_weight_equals_materialised_rows():
    from fisher_fast.capture.rules import CONV2D

    conv = torch.nn.Conv2d(2, 3, 3, padding=1).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64)
    dy = torch.randn(3, 3, 5, 5, generator=g, dtype=torch.float64)
    full = CONV2D.grads(conv, x, dy, slice(0, 3), torch.float64, ("weight",))["weight"]
    got = CONV2D.gram_norms(conv, x, dy, slice(0, 3), torch.float64, "all")
    torch.testing.assert_close(got[:, 0], full.square().flatten(1).sum(1), **GRAM)
