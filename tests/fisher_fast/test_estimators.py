"""Functional estimators: relations SPEC §2 states, derived by hand."""

import pytest
import torch

import fisher_fast as ff
from fisher_ref.testing.batches import concat_batches
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.tolerances import tolerance
from tests.fisher_fast._fast_modules import TinyLM as _TinyLM
from tests.fisher_fast._fast_modules import tiny_batch

TOL = dict(zip(("rtol", "atol"), tolerance("float64-paths")))
GRAM = dict(zip(("rtol", "atol"), tolerance("ghost-norm")))
VARIANCE = dict(zip(("rtol", "atol"), tolerance("variance-by-subtraction")))
F64 = dict(dtype=torch.float64)


def TinyLM():  # the float64-only variant
    return _TinyLM(rms=False)


def test_duplicating_every_unit_changes_nothing():
    model, b = TinyLM(), tiny_batch(B=3)
    twice = concat_batches([b, b])
    for fn in (ff.empirical_fisher, ff.squared_mean_gradient, ff.gradient_variance):
        assert_dicts_close(fn(model, twice, **F64), fn(model, b, **F64), **TOL)


def test_scaling_the_loss_by_c_scales_fisher_by_c_squared():
    model, b = TinyLM(), tiny_batch(B=3)
    f = ff.empirical_fisher(model, b, **F64)
    f3 = ff.empirical_fisher(model, b, loss_fn=lambda m, x: 3.0 * ff.causal_lm_loss(m, x), **F64)
    assert_dicts_close(f3, {k: 9.0 * v for k, v in f.items()}, **TOL)


def test_batch_squared_gradient_ends_are_fisher_and_squared_mean():
    model, b = TinyLM(), tiny_batch(B=3)
    assert_dicts_close(ff.batch_squared_gradient(model, b, micro_batch_size=1, **F64),
                       ff.empirical_fisher(model, b, **F64), **TOL)
    assert_dicts_close(ff.batch_squared_gradient(model, b, micro_batch_size=3, **F64),
                       ff.squared_mean_gradient(model, b, **F64), **TOL)


def test_variance_is_fisher_minus_squared_mean():
    model, b = TinyLM(), tiny_batch(B=4)
    f, s = ff.empirical_fisher(model, b, **F64), ff.squared_mean_gradient(model, b, **F64)
    v = ff.gradient_variance(model, b, unbiased=True, **F64)
    assert_dicts_close(v, {k: (f[k] - s[k]) * 4 / 3 for k in f}, **VARIANCE)


def test_mc_draws_do_not_depend_on_row_order_or_chunks():
    model, b = TinyLM(), tiny_batch(B=3)
    ids = ["p", "q", "r"]
    flipped = {k: v.flip(0) for k, v in b.items()}
    a = ff.mc_fisher(model, b, sample_ids=ids, n_samples=2, seed=5, chunk_size=1, **F64)
    c = ff.mc_fisher(model, flipped, sample_ids=ids[::-1], n_samples=2, seed=5, **F64)
    assert_dicts_close(a, c, **TOL)


def test_gram_group_norms_equal_reduced_per_row_gradients(monkeypatch):
    from fisher_fast.capture.rules import LinearRule

    calls = []
    original = LinearRule.gram_norms
    monkeypatch.setattr(LinearRule, "gram_norms", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 16), torch.nn.Linear(16, 16),
                                torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()
    batch = {"input_ids": torch.randint(0, 5, (3, 2)), "labels": torch.randint(0, 5, (3, 2))}
    fwd = lambda m, x: ff.masked_lm_loss(lambda **k: m(k["input_ids"]), x)  # noqa: E731
    got = ff.group_fisher(model, batch, loss_fn=fwd, **F64)
    pu = ff.per_sample_gradients(model, batch, loss_fn=fwd, **F64)
    assert calls, "the Gram path was not taken"
    want = pu.tensors["1.weight"].square().sum(-1).mean(0)  # rows of a Linear weight
    torch.testing.assert_close(got["1.weight"]["mean"], want, **GRAM)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_models_give_float32_statistics(dtype):
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5)).to(dtype)
    batch = {"input_ids": torch.randint(0, 5, (2, 3)), "labels": torch.randint(0, 5, (2, 3))}
    fwd = lambda m, x: ff.masked_lm_loss(lambda **k: m(k["input_ids"]), x)  # noqa: E731
    f = ff.empirical_fisher(model, batch, loss_fn=fwd)
    assert {v.dtype for v in f.values()} == {torch.float32}


@pytest.mark.parametrize("axis", [0, 1], ids=["head-rows", "head-columns"])
def test_gram_path_for_groups_along_one_axis(monkeypatch, axis):
    from fisher_fast.capture.rules import LinearRule

    calls = []
    original = LinearRule.gram_norms
    monkeypatch.setattr(LinearRule, "gram_norms", lambda *a: calls.append(a[-1]) or original(*a))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 16), torch.nn.Linear(16, 16),
                                torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()
    batch = {"input_ids": torch.randint(0, 5, (3, 2)), "labels": torch.randint(0, 5, (3, 2))}
    fwd = lambda m, x: ff.masked_lm_loss(lambda **k: m(k["input_ids"]), x)  # noqa: E731
    heads = (torch.arange(16) // 4).unsqueeze(1 - axis).expand(16, 16)  # 4 heads of 4 units
    got = ff.group_fisher(model, batch, loss_fn=fwd, groups={"1.weight": (heads, 4)}, **F64)
    g2 = ff.per_sample_gradients(model, batch, loss_fn=fwd, **F64).tensors["1.weight"].square()
    want = g2.reshape(3, 4, 4, 16).sum((2, 3)) if axis == 0 else g2.reshape(3, 16, 4, 4).sum((1, 3))
    assert calls[-1] == ("out" if axis == 0 else "in")  # backward reaches layer 1 last
    torch.testing.assert_close(got["1.weight"]["mean"], want.mean(0), **GRAM)


def test_mc_fisher_runs_one_forward_for_all_draws():
    model, b = TinyLM(), tiny_batch(B=3)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    counts = {}
    for n in (1, 4):
        calls.clear()
        ff.mc_fisher(model, b, n_samples=n, chunk_size=2, **F64)  # two chunks
        counts[n] = len(calls)
    assert counts[4] == counts[1] <= 3  # at most a no-grad targets pass plus one per chunk


@pytest.mark.parametrize("chunk", [1, 4, 6], ids=["all-draws-per-row", "blocks-of-2", "row-per-draw"])
def test_mc_fisher_draw_layouts_equal_the_oracle(chunk):
    import fisher_ref as fr
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    # 2 units, 3 draws: chunk 1 -> one row per unit carrying 3 draws; chunk 4 -> two rows
    # per unit with draws {0, 1} and {2, (empty)}; chunk 6 -> one row per draw
    model = build_model(TinyConfig(arch="gpt2", num_layers=1, vocab_size=7)).double()
    batch = random_batch(vocab_size=7, batch_size=2, seq_len=5, seed=4)
    got = ff.mc_fisher(model, batch, n_samples=3, seed=2, chunk_size=chunk, **F64)
    assert_dicts_close(got, fr.mc_fisher(model, batch, n_samples=3, seed=2), **TOL)


@pytest.mark.parametrize("chunk", [1, 3, None], ids=["all-classes-per-row", "blocks", "row-per-class"])
def test_exact_fisher_class_layouts_equal_the_oracle(chunk):
    import fisher_ref as fr
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    # C = 5 classes per token: chunk 1 -> each token's row carries its 5 classes (one
    # forward, 5 backward passes); chunk 3 -> blocks of classes with an empty slot at the
    # end; None on this tiny model -> one forward row per (token, class)
    model = build_model(TinyConfig(arch="gpt2", num_layers=1, vocab_size=5)).double()
    batch = random_batch(vocab_size=5, batch_size=2, seq_len=4, seed=7)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    got = ff.exact_fisher(model, batch, chunk_size=chunk, **F64)
    if chunk == 1:
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())
        assert len(calls) <= n_tokens + 2  # no forward per class (+ the class-count probe)
    assert_dicts_close(got, fr.exact_fisher(model, batch), **TOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_weights_delivered_block_by_block_equal_the_oracle(monkeypatch, arch):
    # PART_BYTES = 1: every Linear / Conv1D weight goes to the moments one row of its first
    # axis at a time (the CPU path for a large vocabulary head), over two chunks, and with
    # several backward passes per forward (mc_fisher's shared draws)
    import fisher_fast.capture.hooks as capture
    import fisher_ref as fr
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch=arch, num_layers=1, vocab_size=9,
                                   tie_embeddings=False)).double()
    batch = random_batch(vocab_size=9, batch_size=3, seq_len=5, seed=7)
    blocks = []
    original = capture.Capture._deliver_parts
    monkeypatch.setattr(capture.Capture, "_deliver_parts",
                        lambda self, *a: blocks.append(a[-1]) or original(self, *a))
    monkeypatch.setattr(capture, "PART_BYTES", 1)
    got = ff.empirical_fisher(model, batch, chunk_size=2, **F64)
    assert blocks and set(blocks) == {1}
    assert_dicts_close(got, fr.empirical_fisher(model, batch), **TOL)
    got = ff.mc_fisher(model, batch, n_samples=3, seed=1, chunk_size=2, **F64)
    assert_dicts_close(got, fr.mc_fisher(model, batch, n_samples=3, seed=1), **TOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_autocast_fast_path_is_close_to_float32_and_opt_in(arch):
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch=arch, num_layers=2, head_dim=8, vocab_size=50, seed=1))
    batch = random_batch(vocab_size=50, batch_size=6, seq_len=12, seed=1)
    exact = ff.empirical_fisher(model, batch)
    fast = ff.empirical_fisher(model, batch, autocast=torch.bfloat16)
    acc = ff.FisherAccumulator(model, autocast=torch.bfloat16)
    acc.update(batch)
    assert_dicts_close(acc.empirical_fisher(), fast, **dict(zip(
        ("rtol", "atol"), tolerance("float32-fisher", torch.float32))))
    err = (sum(float((fast[k] - exact[k]).square().sum()) for k in exact)
           / sum(float(exact[k].square().sum()) for k in exact)) ** 0.5
    assert all(v.dtype == torch.float32 for v in fast.values())
    # close to float32 within the stated bf16 accuracy, and not float32 itself (the
    # forward really ran in bf16: float32 paths agree to ~1e-6)
    assert 1e-4 < err < tolerance("bf16-autocast", torch.bfloat16)[0]


@pytest.mark.parametrize("bad", [torch.float16, torch.float32, "bf16"])
def test_autocast_takes_only_bfloat16(bad):
    model, b = TinyLM(), tiny_batch(B=2)
    with pytest.raises(ValueError, match="autocast: expected None or torch.bfloat16"):
        ff.empirical_fisher(model, b, autocast=bad)
    with pytest.raises(ValueError, match="autocast"):
        ff.FisherAccumulator(model, autocast=bad)


def test_functional_fisher_keeps_second_moments_only(monkeypatch):
    # empirical_fisher / mc_fisher go through SquareSums (not the shifted sums) and equal the
    # accumulator, which keeps mean and M2 for every estimator
    from fisher_fast.stats import sinks

    made = {"square": 0, "shifted": 0}
    for cls, key in ((sinks.SquareSums, "square"), (sinks.ShiftedSums, "shifted")):
        init = cls.__init__
        monkeypatch.setattr(cls, "__init__", lambda self, *a, _i=init, _k=key, **k:
                            made.__setitem__(_k, made[_k] + 1) or _i(self, *a, **k))
    model, b = TinyLM(), tiny_batch(B=4)
    f = ff.empirical_fisher(model, b, chunk_size=3, **F64)
    assert made["square"] > 0 and made["shifted"] == 0
    acc = ff.FisherAccumulator(model, dtype=torch.float64, chunk_size=3)
    acc.update(b)
    assert made["shifted"] > 0
    assert_dicts_close(f, acc.empirical_fisher(), **TOL)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_device_paths_without_cache_blocks_equal_the_oracle(monkeypatch, tied):
    # what runs on a GPU: every weight one block, a tied weight's slices whole; here on the
    # CPU, so that CI checks those branches against the oracle too
    import fisher_fast.capture.hooks as capture
    import fisher_ref as fr
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    monkeypatch.setattr(capture, "cache_blocks", lambda device: False)
    model = build_model(TinyConfig(arch="gpt2", num_layers=1, vocab_size=9,
                                   tie_embeddings=tied)).double()
    batch = random_batch(vocab_size=9, batch_size=3, seq_len=5, seed=4, empty_rows=(2,))
    acc = ff.FisherAccumulator(model, dtype=torch.float64, chunk_size=2)
    acc.update(batch)
    want = fr.empirical_fisher(model, batch)
    assert_dicts_close(ff.empirical_fisher(model, batch, chunk_size=2, **F64), want, **TOL)
    assert_dicts_close(acc.empirical_fisher(), want, **TOL)
    assert_dicts_close(acc.gradient_variance(), fr.gradient_variance(model, batch), **TOL)


def test_head_groups_skip_frozen_attention_parameters():
    import fisher_ref as fr
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch="gpt2", num_layers=2)).double()
    for name, p in model.named_parameters():
        p.requires_grad_("h.0." not in name)  # layer 0 frozen, its attention included
    batch = random_batch(vocab_size=11, batch_size=3, seq_len=5, seed=3)
    got = ff.group_fisher(model, batch, groups="heads", **F64)
    want = fr.group_fisher(model, batch, groups="heads")
    assert set(got) == set(want) and not any("h.0." in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name]["mean"], want[name]["mean"], **TOL)
    acc = ff.FisherAccumulator(model, groups="heads", **F64)
    acc.update(batch)
    torch.testing.assert_close(acc.group_fisher()["transformer.h.1.attn.c_attn.weight"]["mean"],
                               want["transformer.h.1.attn.c_attn.weight"]["mean"], **TOL)
