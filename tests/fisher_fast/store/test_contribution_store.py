"""ContributionStore: round trips, tiers and oldest-first spilling, budgets, all-or-nothing
writes, opaque ids, deletion.
"""

from __future__ import annotations

import os

import pytest
import torch

from fisher_fast.store.contribution_store import ContributionStore

# one record = a [2, 3] float64 tensor + a [4] float64 tensor = 10 * 8 = 80 bytes
REC = 80


def _tensors(n, offset=0.0):
    a = torch.arange(n * 6, dtype=torch.float64).reshape(n, 2, 3) + offset
    b = -torch.arange(n * 4, dtype=torch.float64).reshape(n, 4) - offset
    return {"w": a, "b": b}


def _shards(directory):
    """The store's shard files (besides them a directory holds manifest.json and .lock)."""
    return sorted(f for f in os.listdir(directory) if f.startswith("shard-"))


def _snapshot(store, directory=None):
    files = sorted(os.listdir(directory)) if directory else []
    return ({t: store.ids(t) for t in store.tasks()}, store.usage(), files)


def test_round_trip_in_memory():
    store = ContributionStore(device="cpu")
    t = _tensors(3)
    store.add("a", ["x", "y_1", 7], t)
    assert store.ids("a") == ["x", "y_1", 7]
    got = store.get_stacked("a", [7, "x"])
    assert torch.equal(got["w"], t["w"][[2, 0]]) and torch.equal(got["b"], t["b"][[2, 0]])
    assert torch.equal(store.get("a", "y_1")["w"], t["w"][1])
    assert store.contains("a", "y_1") and not store.contains("a", "y") and not store.contains("b", "x")


def test_ids_are_opaque():
    store = ContributionStore(device="cpu")
    store.add("a", ["a_1", ("a", 1), "1"], _tensors(3))
    store.add("a_1", [1], _tensors(1, offset=100.0))
    assert store.ids("a") == ["a_1", ("a", 1), "1"] and store.ids("a_1") == [1]
    assert torch.equal(store.get("a", ("a", 1))["w"], _tensors(3)["w"][1])
    assert not store.contains("a", 1)


def test_spill_oldest_first_to_disk(tmp_path):
    store = ContributionStore(tmp_path, device="cpu", device_bytes=REC, host_bytes=2 * REC)
    t = _tensors(5)
    store.add("a", [0, 1], {k: v[:2] for k, v in t.items()})
    store.add("a", [2, 3, 4], {k: v[2:] for k, v in t.items()})
    assert [store.tier_of("a", i) for i in range(5)] == ["disk", "disk", "host", "host", "device"]
    assert store.usage() == {"device": REC, "host": 2 * REC, "disk": 2 * REC}
    got = store.get_stacked("a", [4, 0, 3, 1, 2])
    assert torch.equal(got["w"], t["w"][[4, 0, 3, 1, 2]]) and torch.equal(got["b"], t["b"][[4, 0, 3, 1, 2]])


def test_records_never_move_up_and_tasks_share_age(tmp_path):
    store = ContributionStore(tmp_path, device="cpu", device_bytes=0, host_bytes=REC)
    store.add("a", ["old"], _tensors(1))
    store.add("b", ["new"], _tensors(1, offset=1.0))
    assert store.tier_of("a", "old") == "disk" and store.tier_of("b", "new") == "host"
    store.delete("b")
    store.add("b", ["newer"], _tensors(1, offset=2.0))
    assert store.tier_of("a", "old") == "disk" and store.tier_of("b", "newer") == "host"


def test_disk_budget_exhausted_leaves_store_unchanged(tmp_path):
    store = ContributionStore(tmp_path, device="cpu", device_bytes=0, host_bytes=REC, disk_bytes=REC)
    store.add("a", [0, 1], _tensors(2))
    before = _snapshot(store, tmp_path)
    with pytest.raises(ValueError, match="ContributionStore full"):
        store.add("a", [2], _tensors(1))
    assert _snapshot(store, tmp_path) == before


def test_no_directory_means_no_disk_tier():
    store = ContributionStore(device="cpu", host_bytes=REC, device_bytes=0)
    with pytest.raises(ValueError, match="the disk tier is off"):
        store.add("a", [0, 1], _tensors(2))
    assert store.tasks() == [] and len(store) == 0


@pytest.mark.parametrize("fails", ["shard", "manifest"])
def test_failed_disk_write_leaves_no_trace(tmp_path, monkeypatch, fails):
    """A write that fails half-way, of the new shard or of the manifest (the commit point),
    leaves the store, its files and the manifest on disk as they were.
    """
    import fisher_fast.file_integrity as fi

    store = ContributionStore(tmp_path, device="cpu", device_bytes=0, host_bytes=REC)
    store.add("a", [0], _tensors(1))
    before = _snapshot(store, tmp_path)
    manifest = (tmp_path / "manifest.json").read_bytes()
    real = os.replace

    def broken(tmp, path):
        if os.path.basename(path).startswith("shard-" if fails == "shard" else "manifest"):
            raise OSError("disk full")
        real(tmp, path)

    monkeypatch.setattr(fi.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        store.add("a", [1], _tensors(1, offset=5.0))
    assert _snapshot(store, tmp_path) == before
    assert (tmp_path / "manifest.json").read_bytes() == manifest
    assert torch.equal(store.get("a", 0)["w"], _tensors(1)["w"][0])


def test_delete_removes_empty_shards(tmp_path):
    store = ContributionStore(tmp_path, device="cpu", device_bytes=0, host_bytes=0)
    store.add("a", ["x", "y"], _tensors(2))
    assert len(_shards(tmp_path)) == 1
    store.delete("a", ["x"])
    assert store.ids("a") == ["y"] and len(_shards(tmp_path)) == 1
    assert torch.equal(store.get("a", "y")["b"], _tensors(2)["b"][1])
    store.delete("a", ["y"])
    assert _shards(tmp_path) == [] and store.tasks() == []


def _store_with(ids):
    s = ContributionStore(device="cpu")
    s.add("a", ids, _tensors(len(ids)))
    return s


BAD = [
    pytest.param(lambda s: s.add("a", ["p", "p"], _tensors(2)), "got 'p' twice", id="duplicate-in-call"),
    pytest.param(lambda s: s.add("a", ["x"], _tensors(1)), "already holds 'x'", id="duplicate-stored"),
    pytest.param(lambda s: s.add("a", ["p", "q"], _tensors(1)), "expected shape (2, ...)",
                 id="count-mismatch"),
    pytest.param(lambda s: s.add("a", ["p"], {"w": torch.zeros(1, 3)}), "expected the parameters",
                 id="schema"),
    pytest.param(lambda s: s.add("a", [["p"]], _tensors(1)), "hashable", id="unhashable-id"),
    pytest.param(lambda s: s.get("a", "nope"), "got 'nope'", id="unknown-id"),
    pytest.param(lambda s: s.get_stacked("b", ["x"]), "Unknown task", id="unknown-task"),
    pytest.param(lambda s: s.delete("a", ["x", "nope"]), "got 'nope'", id="delete-unknown"),
    pytest.param(lambda s: s.delete("a", ["x", "x"]), "['x'] more than once", id="delete-twice"),
    pytest.param(lambda s: s.add("a", ["p", "q"], {**_tensors(2), "b": torch.tensor(
                     [[0.0] * 4, [float("nan")] * 4], dtype=torch.float64)}),
                 "tensors['b']: expected finite contributions, got a non-finite value for id 'q'", id="nan"),
    pytest.param(lambda s: s.add("a", ["p"], {k: v.float() for k, v in _tensors(1).items()}),
                 "('w', (2, 3), 'float64')], got [('b', (4,), 'float32')", id="dtype-named"),
    pytest.param(lambda s: ContributionStore(host_bytes=-1), "host_bytes", id="negative-budget"),
]


@pytest.mark.parametrize("fn,message", BAD)
def test_bad_input_leaves_store_unchanged(fn, message):
    store = _store_with(["x", "y"])
    before = _snapshot(store)
    with pytest.raises(ValueError) as err:
        fn(store)
    assert message in str(err.value)
    assert _snapshot(store) == before


@pytest.mark.gpu
def test_gpu_tier_spills_to_pinned_host(device, tmp_path):
    store = ContributionStore(tmp_path, device=device, device_bytes=REC, host_bytes=REC)
    t = _tensors(3)
    store.add("a", [0, 1, 2], {k: v.to(device) for k, v in t.items()})
    assert [store.tier_of("a", i) for i in range(3)] == ["disk", "host", "device"]
    assert store._records[("a", 1)].tensors[0].is_pinned()
    got = store.get_stacked("a", [0, 1, 2])
    assert got["w"].device.type == "cuda" and torch.equal(got["w"].cpu(), t["w"])


def _model_case():
    from fisher_ref.testing.batches import random_batch
    from fisher_ref.testing.models import TinyConfig, build_model

    model = build_model(TinyConfig(arch="gpt2", num_layers=1), dtype=torch.float64)
    return model, random_batch(vocab_size=11, batch_size=3, seq_len=4, seed=0,
                               sample_ids=["s_1", "s_2", "s_3"])


def test_per_sample_contributions_fill_the_store(tmp_path):
    from fisher_fast.contributions import per_sample_contributions
    from fisher_fast.per_sample import per_sample_gradients

    model, batch = _model_case()
    store = ContributionStore(tmp_path, device="cpu", host_bytes=4_000)
    c = per_sample_contributions(model, batch, dtype=torch.float64, store=store, task="t_1")
    g = per_sample_gradients(model, batch, dtype=torch.float64)
    assert c.ids == ["s_1", "s_2", "s_3"] and store.ids("t_1") == c.ids
    for n, t in g.tensors.items():
        assert torch.equal(c.tensors[n], t.square())
        assert torch.equal(store.get_stacked("t_1", ["s_3", "s_1"])[n], t.square()[[2, 0]])


def test_failed_contributions_write_changes_nothing(tmp_path):
    from fisher_fast.contributions import per_sample_contributions

    model, batch = _model_case()
    store = ContributionStore(tmp_path, device="cpu")
    store.add("t", ["s_2"], {"x": torch.zeros(1, 2)})
    before = _snapshot(store, tmp_path)
    with pytest.raises(ValueError, match="already holds 's_2'"):
        per_sample_contributions(model, batch, dtype=torch.float64, store=store, task="t")
    assert _snapshot(store, tmp_path) == before


def _contents(store):
    return {(t, i): (store.tier_of(t, i), {n: v.clone() for n, v in store.get(t, i).items()})
            for t in store.tasks() for i in store.ids(t)}


def _same_contents(a, b):
    return a.keys() == b.keys() and all(
        a[k][0] == b[k][0] and all(torch.equal(a[k][1][n], b[k][1][n]) for n in a[k][1])
        for k in a)


def test_transaction_rolls_back_adds_spills_and_deletes(tmp_path):
    # one record per tier before; inside: two adds that push every old record down a tier
    # (the oldest to disk) and a delete that empties the old disk shard, then an error
    store = ContributionStore(tmp_path, device="cpu", device_bytes=REC, host_bytes=REC)
    for i in range(3):
        store.add("a", [i], _tensors(1, offset=10.0 * i))
    before, contents = _snapshot(store, tmp_path), _contents(store)
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction():
            store.add("b", ["x"], _tensors(1, offset=99.0))
            store.delete("a", [0])
            store.add("b", ["y"], _tensors(1, offset=98.0))
            assert len(_shards(tmp_path)) >= 2  # new shards were written meanwhile
            raise RuntimeError("boom")
    assert _snapshot(store, tmp_path) == before
    assert _same_contents(_contents(store), contents)


def test_transaction_commits_and_then_removes_emptied_shards(tmp_path):
    store = ContributionStore(tmp_path, device="cpu", device_bytes=0, host_bytes=0)
    store.add("a", ["x"], _tensors(1))
    with store.transaction():
        store.delete("a", ["x"])
        assert len(_shards(tmp_path)) == 1  # kept until the commit, for a rollback
        with store.transaction():  # nested: joins the outer one
            store.add("a", ["y"], _tensors(1, offset=5.0))
    assert store.ids("a") == ["y"] and len(_shards(tmp_path)) == 1
    assert torch.equal(store.get("a", "y")["w"], _tensors(1, offset=5.0)["w"][0])


def test_contributions_stream_into_the_store_one_chunk_at_a_time(tmp_path, monkeypatch):
    from fisher_fast.contributions import per_sample_contributions
    from fisher_fast.per_sample import per_sample_gradients

    model, batch = _model_case()
    store = ContributionStore(tmp_path, device="cpu", host_bytes=4_000)
    calls = []
    add = store.add
    monkeypatch.setattr(store, "add", lambda task, ids, t: calls.append(list(ids)) or add(task, ids, t))
    c = per_sample_contributions(model, batch, dtype=torch.float64, store=store, task="t",
                                 chunk_size=1, return_tensors=False)
    assert calls == [["s_1"], ["s_2"], ["s_3"]]
    assert c.ids == ["s_1", "s_2", "s_3"] and c.tensors == {} and c.weights.shape == (3,)
    g = per_sample_gradients(model, batch, dtype=torch.float64)
    got = store.get_stacked("t", c.ids)
    for n, t in g.tensors.items():
        torch.testing.assert_close(got[n], t.square(), rtol=1e-12, atol=0)


def test_a_failing_later_chunk_takes_the_earlier_chunks_back_out(tmp_path):
    from fisher_fast.contributions import per_sample_contributions

    model, batch = _model_case()
    store = ContributionStore(tmp_path, device="cpu", host_bytes=0)
    whole = per_sample_contributions(model, batch, dtype=torch.float64)
    store.add("t", ["s_3"], {n: v[2:] for n, v in whole.tensors.items()})
    before = _snapshot(store, tmp_path)
    # chunks s_1, s_2 go in (to disk), then s_3 is a duplicate: all of this call's records go
    with pytest.raises(ValueError, match="already holds 's_3'"):
        per_sample_contributions(model, batch, dtype=torch.float64, store=store, task="t",
                                 chunk_size=1)
    assert _snapshot(store, tmp_path) == before


def test_return_tensors_false_needs_a_store():
    from fisher_fast.contributions import per_sample_contributions

    model, batch = _model_case()
    with pytest.raises(ValueError, match="return_tensors=False: expected a store"):
        per_sample_contributions(model, batch, return_tensors=False)


def test_unit_gradient_chunks_fit_the_budget_and_carry_the_empty_rows():
    from fisher_fast.per_sample import iter_unit_gradients, per_sample_gradients
    from fisher_ref.testing.batches import random_batch

    model, _ = _model_case()
    batch = random_batch(vocab_size=11, batch_size=3, seq_len=4, seed=0, empty_rows=(1,),
                         sample_ids=["s_1", "s_2", "s_3"])
    numel = sum(p.numel() for p in model.parameters())
    # a budget whose half holds the per-unit gradients of one unit only
    chunks = list(iter_unit_gradients(model, batch, dtype=torch.float64,
                                      memory_budget=2 * 8 * numel + 1))
    assert [c.ids for c in chunks] == [["s_1"], ["s_3"]]
    assert [c.empty_ids for c in chunks] == [["s_2"], []]
    whole = per_sample_gradients(model, batch, dtype=torch.float64)
    for n, t in whole.tensors.items():
        torch.testing.assert_close(torch.cat([c.tensors[n] for c in chunks]), t, rtol=1e-12, atol=0)
    everything_empty = random_batch(vocab_size=11, batch_size=3, seq_len=4, seed=0,
                                    empty_rows=(0, 1, 2), sample_ids=["s_1", "s_2", "s_3"])
    with pytest.raises(ValueError, match="expected at least one non-empty row"):
        next(iter_unit_gradients(model, everything_empty, dtype=torch.float64))


def test_promote_moves_the_newest_records_up_into_freed_room(tmp_path):
    store = ContributionStore(tmp_path, device="cpu", device_bytes=REC, host_bytes=REC)
    for i in range(4):  # 0, 1 on disk (one shard each), 2 on host, 3 on device
        store.add("a", [i], _tensors(1, offset=10.0 * i))
    contents = _contents(store)
    assert store.promote() == 0  # no room anywhere above: nothing moves
    store.delete("a", [3, 2])  # frees the device and the host tier
    assert len(_shards(tmp_path)) == 2
    assert store.promote() == 2
    assert [store.tier_of("a", i) for i in (0, 1)] == ["host", "device"]  # newest fastest
    assert store.usage() == {"device": REC, "host": REC, "disk": 0}
    assert _shards(tmp_path) == []  # the emptied shards are gone
    for i in (0, 1):
        assert torch.equal(store.get("a", i)["w"], contents[("a", i)][1]["w"])


def test_a_failed_promote_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    store = ContributionStore(tmp_path, device="cpu", device_bytes=REC, host_bytes=REC)
    for i in range(3):
        store.add("a", [i], _tensors(1, offset=float(i)))
    store.delete("a", [2, 1])
    before, contents = _snapshot(store, tmp_path), _contents(store)

    def broken(self, t, tier):
        raise OSError("no memory")
    monkeypatch.setattr(ContributionStore, "_to_tier", broken)
    with pytest.raises(OSError, match="no memory"):
        store.promote()
    assert _snapshot(store, tmp_path) == before
    monkeypatch.undo()
    assert _same_contents(_contents(store), contents)


def test_contributions_of_named_parameters_only(tmp_path):
    from fisher_fast.contributions import per_sample_contributions

    model, batch = _model_case()
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"]
    store = ContributionStore(tmp_path, device="cpu")
    part = per_sample_contributions(model, batch, dtype=torch.float64, store=store,
                                    chunk_size=2, params=names)
    whole = per_sample_contributions(model, batch, dtype=torch.float64)
    assert list(part.tensors) == names and store.parameter_names("default") == names
    for n in names:
        torch.testing.assert_close(part.tensors[n], whole.tensors[n], rtol=1e-12, atol=0)


def test_rollback_removes_a_shard_written_and_emptied_inside(tmp_path):
    store = ContributionStore(tmp_path, device="cpu", device_bytes=0, host_bytes=0)
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction():
            store.add("t", ["a"], _tensors(1))  # a new shard on disk
            store.delete("t", ["a"])  # emptied inside: doomed until commit
            raise RuntimeError("boom")
    assert _shards(tmp_path) == [] and store.tasks() == []


def test_a_later_add_may_list_the_parameters_in_another_order():
    store = _store_with(["x"])
    later = _tensors(1, offset=5.0)
    store.add("a", ["y"], {"b": later["b"], "w": later["w"]})
    assert torch.equal(store.get("a", "y")["w"], later["w"][0])
    assert torch.equal(store.get_stacked("a", ["x", "y"])["b"][1], later["b"][0])
