"""group_fisher equals the oracle for generic and per-head groups, with or without the
Gram-product path (which the accumulator's elements=False allows).
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

STATS = ("mean", "variance", "stderr", "n")
WELL_CONDITIONED = 1e-6  # variance / mean^2: condition number <= 1e6 for snr


@settings(max_examples=10)
@given(case=fisher_cases(), groups=st.sampled_from(("generic", "heads")),
       elements=st.booleans())
def test_group_fisher_matches_oracle(case, groups, elements):
    cfg = case["cfg"]
    model = build_model(cfg).double()
    acc = ff.FisherAccumulator(model, loss_fn=loss_for(ff, cfg, case["reduction"]),
                               dtype=torch.float64, unit=case["unit"],
                               weighting=case["weighting"], chunk_size=case["chunk_size"],
                               groups=groups, elements=elements)
    for start, stop in case["splits"]:
        acc.update(take_rows(case["batch"], start, stop))
    got = acc.group_fisher()
    want = fr.group_fisher(model, case["batch"], groups=groups, unit=case["unit"],
                           weighting=case["weighting"],
                           loss_fn=loss_for(fr, cfg, case["reduction"]))
    rtol, atol = tolerance(float64_tolerance_kind(cfg))
    for stat in STATS:
        assert_dicts_close({k: v[stat] for k, v in got.items()},
                           {k: v[stat] for k, v in want.items()}, rtol=rtol, atol=atol,
                           what=f"group {stat} [{cfg.make_id()}, {groups}]")
    # snr = mean / stderr is as well conditioned as the variance: compare it where
    # variance >= WELL_CONDITIONED * mean^2 (rounding of either path then stays < rtol) and
    # mean > atol (a group whose exact value is 0, e.g. a key bias, has an snr of noise)
    for k, v in want.items():
        ok = (v["variance"] >= WELL_CONDITIONED * v["mean"].square()) & (v["mean"] > atol)
        assert_dicts_close({k: got[k]["snr"][ok]}, {k: v["snr"][ok]}, rtol=rtol, atol=atol,
                           what=f"group snr [{cfg.make_id()}, {groups}]")


@settings(max_examples=8)
@given(case=fisher_cases(), groups=st.sampled_from(("generic", "heads")),
       elements=st.booleans())
def test_float32_group_means_match_oracle(case, groups, elements):
    # the default float32 path (Gram products included): group means R(F) within the
    # "float32-fisher" row, as for the per-element F
    cfg = case["cfg"]
    acc = ff.FisherAccumulator(build_model(cfg), loss_fn=loss_for(ff, cfg, case["reduction"]),
                               unit=case["unit"], weighting=case["weighting"],
                               chunk_size=case["chunk_size"], groups=groups, elements=elements)
    for start, stop in case["splits"]:
        acc.update(take_rows(case["batch"], start, stop))
    want = fr.group_fisher(build_model(cfg).double(), case["batch"], groups=groups,
                           unit=case["unit"], weighting=case["weighting"],
                           loss_fn=loss_for(fr, cfg, case["reduction"]))
    rtol, atol = tolerance("float32-fisher", torch.float32)
    assert_dicts_close({k: v["mean"] for k, v in acc.group_fisher().items()},
                       {k: v["mean"] for k, v in want.items()}, rtol=rtol, atol=atol,
                       what=f"float32 group mean [{cfg.make_id()}, {groups}]")
