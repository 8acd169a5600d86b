"""The streaming accumulator's state: resuming from ``state_dict`` or a saved file gives
bit-identical results to not stopping, and ``labels="mc"`` streams equal the oracle's
``mc_fisher`` on the whole batch, for any split into ``update`` calls and any chunk size.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fisher_fast as ff
import fisher_ref as fr
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import build_model
from fisher_ref.testing.strategies import fisher_cases, float64_tolerance_kind, loss_for, take_rows
from fisher_ref.testing.tolerances import tolerance


def _new(model, case, **options):
    return ff.FisherAccumulator(model, loss_fn=loss_for(ff, case["cfg"], case["reduction"]),
                                dtype=torch.float64, unit=case["unit"],
                                weighting=case["weighting"], chunk_size=case["chunk_size"],
                                **options)


def _estimates(acc, options) -> dict:
    out = {"F": acc.empirical_fisher()}
    if options.get("statistics", "all") == "all" and options.get("labels", "data") == "data":
        out |= {"S": acc.squared_mean_gradient(), "V": acc.gradient_variance()}
    if options.get("groups"):
        out["group means"] = {k: v["mean"] for k, v in acc.group_fisher().items()}
    return out


@settings(max_examples=10)
@given(case=fisher_cases(), data=st.data())
def test_resuming_from_state_dict_or_file_is_bit_identical(case, data, tmp_path_factory):
    options = data.draw(st.sampled_from([
        {}, {"statistics": "fisher"}, {"groups": "generic"},
        {"labels": "mc", "n_samples": 2, "seed": 3}]))
    model = build_model(case["cfg"]).double()
    splits = case["splits"]
    stop_after = data.draw(st.integers(1, len(splits)))  # resume after this many updates
    straight = _new(model, case, **options)
    for start, stop in splits:
        straight.update(take_rows(case["batch"], start, stop))
    first = _new(model, case, **options)
    for start, stop in splits[:stop_after]:
        first.update(take_rows(case["batch"], start, stop))
    path = tmp_path_factory.mktemp("resume") / "state.safetensors"
    first.save(path)
    resumed = {"state_dict": _new(model, case, **options), "file": _new(model, case, **options)}
    resumed["state_dict"].load_state_dict(first.state_dict())
    resumed["file"].load(path)
    for how, acc in resumed.items():
        for start, stop in splits[stop_after:]:
            acc.update(take_rows(case["batch"], start, stop))
        want = _estimates(straight, options)
        for name, got in _estimates(acc, options).items():
            assert_dicts_close(got, want[name], rtol=0, atol=0, what=f"{name} via {how}")


@settings(max_examples=10)
@given(case=fisher_cases(), n_samples=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_mc_accumulator_over_any_split_equals_the_oracle_on_the_whole_batch(case, n_samples, seed):
    model = build_model(case["cfg"]).double()
    acc = _new(model, case, labels="mc", n_samples=n_samples, seed=seed)
    for start, stop in case["splits"]:
        acc.update(take_rows(case["batch"], start, stop))
    want = fr.mc_fisher(model, case["batch"], loss_fn=loss_for(fr, case["cfg"], case["reduction"]),
                        unit=case["unit"], weighting=case["weighting"], n_samples=n_samples,
                        seed=seed)
    rtol, atol = tolerance(float64_tolerance_kind(case["cfg"]))
    assert_dicts_close(acc.empirical_fisher(), want, rtol=rtol, atol=atol,
                       what=f"mc F [{case['cfg'].make_id()}]")
