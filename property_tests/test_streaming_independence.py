"""Results do not depend on the chunk size or on how the rows are split into updates
(SPEC §8): two accumulators with different splits and chunks agree to Welford rounding.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fisher_fast as ff
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import build_model
from fisher_ref.testing.strategies import (
    chunk_sizes,
    fisher_cases,
    float64_tolerance_kind,
    loss_for,
    row_splits,
    take_rows,
)
from fisher_ref.testing.tolerances import tolerance


def _run(model, case, splits, chunk):
    acc = ff.FisherAccumulator(model, loss_fn=loss_for(ff, case["cfg"], case["reduction"]),
                               dtype=torch.float64, unit=case["unit"],
                               weighting=case["weighting"], chunk_size=chunk,
                               micro_batch_sizes=(case["micro_batch_size"],), groups="generic")
    for start, stop in splits:
        acc.update(take_rows(case["batch"], start, stop))
    return acc


@settings(max_examples=10)
@given(case=fisher_cases(), data=st.data())
def test_split_and_chunk_size_do_not_matter(case, data):
    model = build_model(case["cfg"]).double()
    n_rows = case["batch"]["input_ids"].shape[0]
    a = _run(model, case, case["splits"], case["chunk_size"])
    b = _run(model, case, data.draw(row_splits(n_rows)), data.draw(chunk_sizes()))
    rtol, atol = tolerance(float64_tolerance_kind(case["cfg"]))
    for name in ("empirical_fisher", "squared_mean_gradient", "mean_gradient", "gradient_variance"):
        assert_dicts_close(getattr(a, name)(), getattr(b, name)(), rtol=rtol, atol=atol, what=name)
    for name in ("mean", "variance"):
        assert_dicts_close({k: v[name] for k, v in a.group_fisher().items()},
                           {k: v[name] for k, v in b.group_fisher().items()},
                           rtol=rtol, atol=atol, what=f"group {name}")
    m = case["micro_batch_size"]
    assert_dicts_close(a.batch_squared_gradient(m), b.batch_squared_gradient(m), rtol=rtol,
                       atol=atol, what="batch_squared_gradient")
