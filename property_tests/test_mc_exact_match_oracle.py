"""mc_fisher and exact_fisher equal the oracle: the seeded draws match bit for bit, so the
MC estimates agree to float64 rounding, for any chunk size and row order.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fisher_fast as ff
import fisher_ref as fr
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import build_model
from fisher_ref.testing.strategies import batches, chunk_sizes, float64_tolerance_kind, loss_for, tiny_configs
from fisher_ref.testing.tolerances import tolerance


@settings(max_examples=10)
@given(data=st.data(), unit=st.sampled_from(("sample", "token")),
       weighting=st.sampled_from(("sample", "token")), reduction=st.sampled_from(("mean", "sum")),
       n_samples=st.integers(1, 3), seed=st.integers(0, 2**31), chunk=chunk_sizes())
def test_mc_fisher_matches_oracle(data, unit, weighting, reduction, n_samples, seed, chunk):
    cfg = data.draw(tiny_configs(max_layers=1))
    batch = data.draw(batches(cfg, max_batch=4, max_len=5))
    model = build_model(cfg).double()
    got = ff.mc_fisher(model, batch, loss_fn=loss_for(ff, cfg, reduction), unit=unit,
                       weighting=weighting, n_samples=n_samples, seed=seed, chunk_size=chunk,
                       dtype=torch.float64)
    want = fr.mc_fisher(model, batch, loss_fn=loss_for(fr, cfg, reduction), unit=unit,
                        weighting=weighting, n_samples=n_samples, seed=seed)
    rtol, atol = tolerance(float64_tolerance_kind(cfg))
    assert_dicts_close(got, want, rtol=rtol, atol=atol, what=f"mc [{cfg.make_id()}]")
    assert (got.n_units, got.empty_ids) == (want.n_units, want.empty_ids)


@settings(max_examples=8)
@given(data=st.data(), unit=st.sampled_from(("sample", "token")), n_samples=st.integers(1, 3),
       seed=st.integers(0, 2**31), chunk=chunk_sizes())
def test_float32_mc_fisher_matches_oracle(data, unit, n_samples, seed, chunk):
    # the default float32 path: labels are drawn from the float32 model's logits (upcast to
    # float64), which differ from the float64 oracle's by float32 rounding (~1e-7 relative), so
    # a draw differs only when u lies that close to a class boundary: ~1e-7 per draw
    cfg = data.draw(tiny_configs(max_layers=1))
    batch = data.draw(batches(cfg, max_batch=4, max_len=5))
    model = build_model(cfg)
    got = ff.mc_fisher(model, batch, loss_fn=loss_for(ff, cfg), unit=unit, n_samples=n_samples,
                       seed=seed, chunk_size=chunk)
    want = fr.mc_fisher(model.double(), batch, loss_fn=loss_for(fr, cfg), unit=unit,
                        n_samples=n_samples, seed=seed)
    rtol, atol = tolerance("float32-fisher", torch.float32)
    assert_dicts_close(got, want, rtol=rtol, atol=atol, what=f"float32 mc [{cfg.make_id()}]")


@settings(max_examples=8)
@given(data=st.data(), chunk=chunk_sizes(max_size=40))
def test_exact_fisher_matches_oracle(data, chunk):
    cfg = data.draw(tiny_configs(archs=("gpt2", "llama", "bert", "gpt_neox"), max_layers=1, max_vocab=7))
    batch = data.draw(batches(cfg, max_batch=2, max_len=4))
    model = build_model(cfg).double()
    got = ff.exact_fisher(model, batch, loss_fn=loss_for(ff, cfg), chunk_size=chunk,
                          dtype=torch.float64)
    want = fr.exact_fisher(model, batch, loss_fn=loss_for(fr, cfg))
    rtol, atol = tolerance(float64_tolerance_kind(cfg))
    assert_dicts_close(got, want, rtol=rtol, atol=atol, what=f"exact [{cfg.make_id()}]")


@pytest.mark.gpu
@settings(max_examples=8)
@given(data=st.data(), unit=st.sampled_from(("sample", "token")),
       n_samples=st.integers(1, 3), seed=st.integers(0, 2**31), chunk=chunk_sizes())
def test_mc_fisher_on_cuda_draws_the_oracles_labels(data, unit, n_samples, seed, chunk, device):
    # the draws happen on the device (float64 softmax and cumsum there); with these small
    # vocabularies a class boundary within a few ulps of u is vanishingly rare, so any
    # mismatch here is a real difference in the draws, not rounding
    cfg = data.draw(tiny_configs(max_layers=1))
    batch = data.draw(batches(cfg, max_batch=4, max_len=5))
    model = build_model(cfg).double()
    want = fr.mc_fisher(model, batch, loss_fn=loss_for(fr, cfg, "mean"), unit=unit,
                        n_samples=n_samples, seed=seed)
    got = ff.mc_fisher(model.to(device), batch, loss_fn=loss_for(ff, cfg, "mean"), unit=unit,
                       n_samples=n_samples, seed=seed, chunk_size=chunk, dtype=torch.float64)
    assert next(iter(got.values())).device.type == "cuda"
    rtol, atol = tolerance(float64_tolerance_kind(cfg))
    assert_dicts_close(got, want, rtol=rtol, atol=atol, what=f"mc on cuda [{cfg.make_id()}]")


@pytest.mark.gpu
@settings(max_examples=4)
@given(data=st.data(), chunk=chunk_sizes(max_size=40))
def test_exact_fisher_on_cuda_matches_oracle(data, chunk, device):
    cfg = data.draw(tiny_configs(archs=("gpt2", "llama"), max_layers=1, max_vocab=7))
    batch = data.draw(batches(cfg, max_batch=2, max_len=4))
    model = build_model(cfg).double()
    want = fr.exact_fisher(model, batch, loss_fn=loss_for(fr, cfg))
    got = ff.exact_fisher(model.to(device), batch, loss_fn=loss_for(ff, cfg), chunk_size=chunk,
                          dtype=torch.float64)
    assert next(iter(got.values())).device.type == "cuda"
    rtol, atol = tolerance(float64_tolerance_kind(cfg))
    assert_dicts_close(got, want, rtol=rtol, atol=atol, what=f"exact on cuda [{cfg.make_id()}]")
