"""fisher_fast.cross_task: the separate Phase 5/6 calls' numbers from one gradient pass per task."""

from __future__ import annotations

import pytest
import torch

import fisher_fast as ff
from fisher_fast.capture import hooks
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.compare import assert_dicts_close
from fisher_ref.testing.models import TinyConfig, build_model
from fisher_ref.testing.tolerances import tolerance

RTOL, ATOL = tolerance("float64-paths")
CONFLICTS = dict(n_permutations=30, seed=3, n_bootstrap=20)


def _tasks(cfg, n_a=3, n_b=2):
    model = build_model(cfg, dtype=torch.float64)
    a = random_batch(vocab_size=cfg.vocab_size, batch_size=n_a, seq_len=5, seed=1,
                     sample_ids=[f"a{i}" for i in range(n_a)], empty_rows=(1,))
    b = random_batch(vocab_size=cfg.vocab_size, batch_size=n_b, seq_len=5, seed=2,
                     sample_ids=[f"b{i}" for i in range(n_b)])
    return model, a, b


@pytest.fixture
def captures(monkeypatch):
    """How many chunk passes (captures) ran."""
    count = [0]
    enter = hooks.Capture.__enter__

    def counted(self):
        count[0] += 1
        return enter(self)
    monkeypatch.setattr(hooks.Capture, "__enter__", counted)
    return count


CFGS = [TinyConfig(arch="gpt2", num_layers=2), TinyConfig(arch="llama", num_layers=1, num_heads=4,
                                                          num_kv_heads=2, head_dim=2, hidden=12)]


@pytest.mark.parametrize("cfg", CFGS, ids=[c.make_id() for c in CFGS])
@pytest.mark.parametrize("contributions", ["attention", "all"])
def test_one_pass_equals_the_separate_calls(cfg, contributions, captures):
    model, a, b = _tasks(cfg)
    kw = dict(dtype=torch.float64, chunk_size=8)
    got = ff.cross_task(model, a, b, contributions=contributions, conflicts=CONFLICTS,
                        interference=dict(top_k=5), **kw)
    assert captures[0] == 2  # one gradient pass per task (each batch fits one chunk)
    names = None if contributions == "all" else list(got.contributions["a"].tensors)
    for task, batch in (("a", a), ("b", b)):
        want = ff.per_sample_contributions(model, batch, params=names, **kw)
        assert got.contributions[task].ids == want.ids
        assert got.contributions[task].empty_ids == want.empty_ids
        assert_dicts_close(got.contributions[task].tensors, want.tensors, rtol=RTOL, atol=ATOL)
    if contributions == "attention":  # exactly the layout's slice parameters
        lay = ff.attention_layout(model)
        want_names = {n for la in lay.layers for n in (la.q, la.k, la.v, la.o)}
        assert set(names) == want_names
    inter = ff.interference(model, a, b, top_k=5, **kw)
    assert_dicts_close(dict(got.interference), dict(inter), rtol=RTOL, atol=ATOL)
    assert [e["id_a"] for e in got.interference.top_k] == [e["id_a"] for e in inter.top_k]
    conf = ff.conflicts(model, a, b, dtype=torch.float64, **CONFLICTS)
    assert list(got.conflicts) == list(conf)
    for k, v in conf.items():
        assert got.conflicts[k]["p"] == v["p"], k
        assert got.conflicts[k]["mean_cosine"] == pytest.approx(v["mean_cosine"], rel=RTOL, abs=ATOL)


def test_parameter_conflicts_and_options_reach_their_calls():
    model, a, b = _tasks(TinyConfig(arch="gpt2", num_layers=1))
    kw = dict(dtype=torch.float64)
    got = ff.cross_task(model, a, b, contributions=None, interference=dict(signed=True, fisher="b"),
                        conflicts=dict(groups="parameters", fdr="by", **CONFLICTS), **kw)
    assert got.contributions == {}
    conf = ff.conflicts(model, a, b, groups="parameters", fdr="by", **CONFLICTS, **kw)
    assert list(got.conflicts) == list(conf) and got.conflicts.fdr == "by"
    inter = ff.interference(model, a, b, signed=True, fisher="b", **kw)
    assert got.interference.signed
    assert_dicts_close(dict(got.interference), dict(inter), rtol=RTOL, atol=ATOL)


def test_contributions_are_filed_in_the_store_under_the_task_names(tmp_path):
    model, a, b = _tasks(TinyConfig(arch="gpt2", num_layers=1))
    store = ff.ContributionStore(tmp_path, device="cpu")
    got = ff.cross_task(model, a, b, store=store, tasks=("math", "code"), return_contributions=False,
                        interference=False, conflicts=False, dtype=torch.float64, chunk_size=2)
    assert sorted(store.tasks()) == ["code", "math"]
    assert got.contributions["math"].tensors == {} and got.contributions["math"].ids == ["a0", "a2"]
    want = ff.per_sample_contributions(model, a, dtype=torch.float64,
                                       params=store.parameter_names("math"))
    assert_dicts_close(store.get_stacked("math", want.ids), want.tensors, rtol=RTOL, atol=ATOL)


def test_a_failure_files_nothing(tmp_path):
    model, a, b = _tasks(TinyConfig(arch="gpt2", num_layers=1))
    store = ff.ContributionStore(tmp_path, device="cpu")
    bad = dict(b, labels=torch.full_like(b["labels"], 10_000))  # task B fails after A is filed
    with pytest.raises(ValueError, match="labels: expected class indices"):
        ff.cross_task(model, a, bad, store=store, dtype=torch.float64)
    assert store.tasks() == [] and len(store) == 0


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(tasks=("a", "a")), "tasks: expected two distinct", id="same-task-names"),
    pytest.param(dict(tasks="ab"), "tasks: expected two distinct", id="tasks-a-string"),
    pytest.param(dict(contributions="heads"), "contributions: expected one of", id="contributions"),
    pytest.param(dict(interference=dict(top=3)), r"interference: expected options among .*'top'",
                 id="unknown-interference-option"),
    pytest.param(dict(conflicts="yes"), "conflicts: expected True, False or a dict", id="conflicts-str"),
    pytest.param(dict(store="s", contributions=None), "store: expected contributions=",
                 id="store-no-contrib"),
    pytest.param(dict(contributions=None, interference=False, conflicts=False, return_contributions=False),
                 "expected something to compute", id="nothing-asked"),
])
def test_bad_input_is_a_value_error(kwargs, match):
    model, a, b = _tasks(TinyConfig(arch="gpt2", num_layers=1))
    with pytest.raises(ValueError, match=match):
        ff.cross_task(model, a, b, **kwargs)
