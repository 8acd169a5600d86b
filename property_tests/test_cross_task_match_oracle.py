"""``fisher_fast.cross_task`` (one gradient pass per task for Phase 5/6) equals the oracle's
contributions and interference, and the separate ``conflicts`` call's permutation test, on
random tiny transformers (GQA included), any unit, weighting, chunk size and empty rows.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fisher_fast as ff
import fisher_ref as fr
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import build_model, loss_kind
from fisher_ref.testing.strategies import chunk_sizes, loss_for, tiny_configs
from fisher_ref.testing.tolerances import tolerance

RTOL, ATOL = tolerance("float64-paths")


@given(cfg=tiny_configs(max_layers=2), unit=st.sampled_from(("sample", "token")),
       weighting=st.sampled_from(("sample", "token")), seed=st.integers(0, 50),
       chunk=chunk_sizes(), contributions=st.sampled_from(("attention", "all")),
       signed=st.booleans())
def test_cross_task_matches_oracle(cfg, unit, weighting, seed, chunk, contributions, signed):
    model = build_model(cfg, dtype=torch.float64)
    kind = loss_kind(cfg.arch)
    a = random_batch(kind=kind, vocab_size=cfg.vocab_size, batch_size=3, seq_len=5, seed=seed,
                     sample_ids=[f"a_{i}" for i in range(3)], empty_rows=(1,))
    b = random_batch(kind=kind, vocab_size=cfg.vocab_size, batch_size=2, seq_len=5, seed=seed + 1)
    opts = dict(unit=unit, weighting=weighting)
    conf = dict(n_permutations=25, seed=seed, n_bootstrap=10)
    got = ff.cross_task(model, a, b, contributions=contributions, interference=dict(signed=signed),
                        conflicts=conf, loss_fn=loss_for(ff, cfg), dtype=torch.float64,
                        chunk_size=chunk, **opts)
    names = None if contributions == "all" else list(got.contributions["a"].tensors)
    for task, batch in (("a", a), ("b", b)):
        want = fr.per_sample_contributions(model, batch, loss_fn=loss_for(fr, cfg), **opts)
        mine = got.contributions[task]
        assert mine.ids == want.ids and mine.empty_ids == want.empty_ids
        keep = names or list(want.tensors)
        assert_dicts_close(mine.tensors, {n: want.tensors[n] for n in keep}, rtol=RTOL, atol=ATOL,
                           what=f"C {task} [{cfg.make_id()}]")
    want = fr.interference(model, a, b, loss_fn=loss_for(fr, cfg), signed=signed, **opts)
    assert_dicts_close(dict(got.interference), dict(want), rtol=RTOL, atol=ATOL, what="interference")
    separate = ff.conflicts(model, a, b, loss_fn=loss_for(ff, cfg), dtype=torch.float64, **conf, **opts)
    assert list(got.conflicts) == list(separate)
    for k, v in separate.items():
        assert got.conflicts[k]["mean_cosine"] == pytest.approx(v["mean_cosine"], rel=RTOL, abs=ATOL), k
