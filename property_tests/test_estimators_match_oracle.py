"""fisher_fast's estimators equal the fisher_ref oracle on random tiny transformers.

Random GPT-2 (tied head), LLaMA (GQA, explicit head_dim), BERT (MLM) and GPT-NeoX models;
random batches with padding and empty rows; random unit, weighting and reduction; random
splits of the rows into ``update`` calls and random chunk sizes. Every estimator of the
accumulator equals the oracle's (float64 path: "float64-paths"; float32 path:
"float32-fisher"), whatever the split and chunk size. The same property runs on CUDA with
``--run-gpu`` (TF32 off).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import fisher_fast as ff
import fisher_ref as fr
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import build_model
from fisher_ref.testing.strategies import fisher_cases, float64_tolerance_kind, loss_for, take_rows
from fisher_ref.testing.tolerances import tolerance

REORDER_RTOL, REORDER_ATOL = tolerance("float64-reorder")


def _accumulate(model, case, dtype, statistics="all"):
    acc = ff.FisherAccumulator(model, loss_fn=loss_for(ff, case["cfg"], case["reduction"]),
                               dtype=dtype, unit=case["unit"], weighting=case["weighting"],
                               chunk_size=case["chunk_size"], statistics=statistics,
                               micro_batch_sizes=(case["micro_batch_size"],))
    for start, stop in case["splits"]:
        acc.update(take_rows(case["batch"], start, stop))
    return acc


def _oracle(case):
    model = build_model(case["cfg"]).double()
    pu = fr.per_sample_gradients(model, case["batch"], unit=case["unit"],
                                 weighting=case["weighting"],
                                 loss_fn=loss_for(fr, case["cfg"], case["reduction"]))
    return pu


def _check(acc, pu, case, rtol, atol, names=("F", "S", "mean", "V", "BSG")):
    b = case["micro_batch_size"]
    pairs = {  # built on demand: a statistics="fisher" accumulator refuses S, mean and V
        "F": lambda: (acc.empirical_fisher(), fr.empirical_fisher_of(pu)),
        "S": lambda: (acc.squared_mean_gradient(), fr.squared_mean_gradient_of(pu)),
        "mean": lambda: (acc.mean_gradient(), fr.mean_gradient_of(pu)),
        "V": lambda: (acc.gradient_variance(), fr.gradient_variance_of(pu)),
        "BSG": lambda: (acc.batch_squared_gradient(b), fr.batch_squared_gradient_of(pu, b)),
        "V-unbiased": lambda: (acc.gradient_variance(unbiased=True),
                               fr.gradient_variance_of(pu, unbiased=True)),
    }
    if pu.n_units >= 2 and "V" in names:
        names = (*names, "V-unbiased")
    case_id = case["cfg"].make_id()
    for name in names:
        got, want = pairs[name]()
        assert_dicts_close(got, want, rtol=rtol, atol=atol, what=f"{name} [{case_id}]")
    got = acc.empirical_fisher()
    assert (got.n_units, got.empty_ids) == (pu.n_units, pu.empty_ids)
    assert got.total_weight == pytest.approx(float(pu.weights.sum()), rel=REORDER_RTOL,
                                                 abs=REORDER_ATOL)


@settings(max_examples=15)
@given(case=fisher_cases())
def test_float64_estimators_match_oracle_for_any_split_and_chunk(case):
    model = build_model(case["cfg"]).double()
    acc = _accumulate(model, case, torch.float64)
    _check(acc, _oracle(case), case, *tolerance(float64_tolerance_kind(case["cfg"])))


@settings(max_examples=10)
@given(case=fisher_cases())
def test_float32_estimators_match_oracle(case):
    # not the mean gradient: the "float32-fisher" row bounds squared gradients; a signed
    # gradient entry that is 0 in exact arithmetic (a hidden-size-2 BERT's LayerNorm) carries
    # float32 noise of ~1e-7 beyond its atol. The float64 property covers the mean.
    acc = _accumulate(build_model(case["cfg"]), case, torch.float32)
    _check(acc, _oracle(case), case, *tolerance("float32-fisher", torch.float32),
           names=("F", "S", "V", "BSG"))


@settings(max_examples=10)
@given(case=fisher_cases())
def test_fisher_only_accumulator_matches_oracle_for_any_split_and_chunk(case):
    # statistics="fisher": E[g²] states only, merged across random update splits and chunks
    model = build_model(case["cfg"]).double()
    acc = _accumulate(model, case, torch.float64, statistics="fisher")
    _check(acc, _oracle(case), case, *tolerance(float64_tolerance_kind(case["cfg"])),
           names=("F", "BSG"))


def _functional(model, case, dtype):
    return ff.empirical_fisher(model, case["batch"], dtype=dtype,
                               loss_fn=loss_for(ff, case["cfg"], case["reduction"]),
                               unit=case["unit"], weighting=case["weighting"],
                               chunk_size=case["chunk_size"])


@settings(max_examples=10)
@given(case=fisher_cases())
def test_functional_empirical_fisher_matches_oracle(case):
    # the functional path keeps E[g²] alone (SecondMoment states, no shift, no mean)
    model = build_model(case["cfg"]).double()
    got = _functional(model, case, torch.float64)
    rtol, atol = tolerance(float64_tolerance_kind(case["cfg"]))
    assert_dicts_close(got, fr.empirical_fisher_of(_oracle(case)), rtol=rtol, atol=atol,
                       what=f"F [{case['cfg'].make_id()}]")


@settings(max_examples=10)
@given(case=fisher_cases())
def test_functional_estimators_match_oracle(case):
    # every functional estimator (the functional batch_squared_gradient takes the
    # micro-batch path without element moments, which the accumulator never uses)
    model = build_model(case["cfg"]).double()
    kw = dict(dtype=torch.float64, loss_fn=loss_for(ff, case["cfg"], case["reduction"]),
              unit=case["unit"], weighting=case["weighting"], chunk_size=case["chunk_size"])
    pu, b = _oracle(case), case["micro_batch_size"]
    pairs = [("mean", ff.mean_gradient(model, case["batch"], **kw), fr.mean_gradient_of(pu)),
             ("S", ff.squared_mean_gradient(model, case["batch"], **kw),
              fr.squared_mean_gradient_of(pu)),
             ("V", ff.gradient_variance(model, case["batch"], **kw), fr.gradient_variance_of(pu)),
             ("BSG", ff.batch_squared_gradient(model, case["batch"], micro_batch_size=b, **kw),
              fr.batch_squared_gradient_of(pu, b))]
    if pu.n_units >= 2:
        pairs.append(("V-unbiased", ff.gradient_variance(model, case["batch"], unbiased=True, **kw),
                      fr.gradient_variance_of(pu, unbiased=True)))
    rtol, atol = tolerance(float64_tolerance_kind(case["cfg"]))
    for name, got, want in pairs:
        assert_dicts_close(got, want, rtol=rtol, atol=atol, what=f"{name} [{case['cfg'].make_id()}]")


@settings(max_examples=10)
@given(case=fisher_cases())
def test_per_sample_gradients_match_oracle(case):
    # the signed per-unit gradients themselves, with ids, weights and empty rows
    model = build_model(case["cfg"]).double()
    got = ff.per_sample_gradients(model, case["batch"], dtype=torch.float64,
                                  loss_fn=loss_for(ff, case["cfg"], case["reduction"]),
                                  unit=case["unit"], weighting=case["weighting"],
                                  chunk_size=case["chunk_size"])
    want = _oracle(case)
    assert (got.ids, got.empty_ids) == (list(want.ids), list(want.empty_ids))
    torch.testing.assert_close(got.weights, want.weights, rtol=0, atol=0)
    rtol, atol = tolerance(float64_tolerance_kind(case["cfg"]))
    assert_dicts_close(got.tensors, want.tensors, rtol=rtol, atol=atol,
                       what=f"g_u [{case['cfg'].make_id()}]")


@settings(max_examples=6)
@given(case=fisher_cases())
def test_bf16_autocast_accumulator_is_within_its_stated_accuracy_of_the_oracle(case):
    model = build_model(case["cfg"])
    acc = ff.FisherAccumulator(model, loss_fn=loss_for(ff, case["cfg"], case["reduction"]),
                               unit=case["unit"], weighting=case["weighting"],
                               chunk_size=case["chunk_size"], autocast=torch.bfloat16)
    for start, stop in case["splits"]:
        acc.update(take_rows(case["batch"], start, stop))
    got, want = acc.empirical_fisher(), fr.empirical_fisher_of(_oracle(case))
    err = (sum(float((got[k].double() - want[k]).square().sum()) for k in want)
           / max(sum(float(want[k].square().sum()) for k in want), 1e-300)) ** 0.5
    assert err < tolerance("bf16-autocast", torch.bfloat16)[0], (err, case["cfg"].make_id())


@settings(max_examples=6)
@given(case=fisher_cases())
def test_functional_float32_empirical_fisher_matches_oracle(case):
    got = _functional(build_model(case["cfg"]), case, torch.float32)
    rtol, atol = tolerance("float32-fisher", torch.float32)
    assert_dicts_close(got, fr.empirical_fisher_of(_oracle(case)), rtol=rtol, atol=atol,
                       what=f"F [{case['cfg'].make_id()}]")


@pytest.mark.gpu
@settings(max_examples=6)
@given(case=fisher_cases())
def test_functional_empirical_fisher_matches_oracle_on_cuda(case, device):
    model = build_model(case["cfg"]).double().to(device)
    got = _functional(model, case, torch.float64)
    assert next(iter(got.values())).device.type == "cuda"
    rtol, atol = tolerance(float64_tolerance_kind(case["cfg"]))
    assert_dicts_close(got, fr.empirical_fisher_of(_oracle(case)), rtol=rtol, atol=atol)


@pytest.mark.gpu
@settings(max_examples=10)
@given(case=fisher_cases())
def test_float64_estimators_match_oracle_on_cuda(case, device):
    model = build_model(case["cfg"]).double().to(device)
    acc = _accumulate(model, case, torch.float64)
    assert next(iter(acc.empirical_fisher().values())).device.type == "cuda"
    _check(acc, _oracle(case), case, *tolerance(float64_tolerance_kind(case["cfg"])))
