"""``--store``: its path checks, the run manifest and fingerprint, the lock, saved states."""

import json

import pytest
import torch

import fisher_fast
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, build_model
from fishercheck.run_store import RunStore, batch_digest, model_digest
from tests.fishercheck.test_outputs import tree

SETTINGS = {"samples": 8, "pairs": 4, "seed": 0}


def fingerprint(**change):
    return {"model": "m", "task_a": "a", "task_b": "b", "settings": dict(SETTINGS), **change}


PLAN = {"chunk_rows": 4, "block_rows": 3}


def test_a_new_store_records_its_fingerprint_and_plan(tmp_path):
    with RunStore(tmp_path / "s") as store:
        assert store.open(fingerprint(), PLAN) is None
    manifest = json.loads((tmp_path / "s" / "run.json").read_text())
    assert manifest["fingerprint"] == fingerprint() and manifest["plan"] == PLAN
    with RunStore(tmp_path / "s") as store:  # the same run again: the recorded plan comes back
        assert store.open(fingerprint(), {"chunk_rows": 32, "block_rows": 32}) == PLAN


@pytest.mark.parametrize("change, message", [
    ({"settings": {**SETTINGS, "pairs": 5}}, r"made with other settings: pairs 5 \(the store's: 4\); "
                                             r"rerun with the store's settings, or use a new --store"),
    ({"model": "m2"}, r"made for a different model \(its class, config or weights differ\)"),
    ({"task_b": "b2"}, r"made for different task B rows"),
])
def test_a_store_of_other_inputs_is_refused_and_left_alone(tmp_path, change, message):
    with RunStore(tmp_path / "s") as store:
        store.open(fingerprint(), PLAN)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"--store: expected the store of a run with this run's "
                                         r"\w+, got '.*s', " + message):
        RunStore(tmp_path / "s").open(fingerprint(**change), PLAN)
    assert tree(tmp_path) == before


def test_a_store_in_use_is_refused(tmp_path):
    with RunStore(tmp_path / "s") as holder:
        holder.open(fingerprint(), PLAN)
        with pytest.raises(ValueError, match=r"--store: expected a store no other fishercheck run "
                                             r"is using, got '.*s' in use by the run with pid \d+"):
            RunStore(tmp_path / "s").open(fingerprint(), PLAN)
    with RunStore(tmp_path / "s") as store:  # released with the holder
        assert store.open(fingerprint(), PLAN) == PLAN


def test_path_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{not json")
    cases = [(tmp_path / "file", None, r"a directory \(created if missing\), got the existing file"),
             (tmp_path / "file" / "s", None, r"a directory path, got '.*file/s' under the existing "
                                             r"file"),
             (tmp_path / "other", None, r"a new or empty directory, or the store of an earlier "
                                        r"fishercheck run, got '.*other' holding notes\.txt"),
             (tmp_path / "out" / "s", tmp_path / "out", r"a directory apart from --out"),
             (tmp_path / "s", tmp_path / "s" / "out", r"a directory apart from --out")]
    for path, out, message in cases:
        with pytest.raises(ValueError, match=r"--store: expected " + message):
            RunStore(path, out=out)
    with pytest.raises(ValueError, match=r"--store: expected a fishercheck store "
                                         r"\(fishercheck\.run_store/1\), got '.*bad/run\.json', "
                                         r"which is not one"):
        RunStore(tmp_path / "bad").open(fingerprint(), PLAN)


def test_moments_resume_from_the_latest_state(tmp_path):
    model = build_model(TinyConfig(arch="gpt2", num_layers=1, num_heads=2, head_dim=4))
    batch = random_batch(batch_size=6, seed=0)
    acc = fisher_fast.FisherAccumulator(model, chunk_size=3)
    with RunStore(tmp_path / "s") as store:
        store.open(fingerprint(), PLAN)
        assert store.load_moments(fisher_fast.FisherAccumulator(model), "A") == 0
        acc.update({k: v[:3] for k, v in batch.items()}, task="A")
        store.save_moments(acc, "A", 3)
        acc.update({k: v[3:] for k, v in batch.items()}, task="A")
        store.save_moments(acc, "A", 6)
        assert sorted(p.name for p in (tmp_path / "s").glob("moments-*")) == \
            ["moments-A.rows-000006.safetensors"]
        again = fisher_fast.FisherAccumulator(model, chunk_size=3)
        assert store.load_moments(again, "A") == 6
        for n, t in acc.empirical_fisher("A").items():
            assert torch.equal(again.empirical_fisher("A")[n], t)
        (tmp_path / "s" / "moments-A.rows-000006.safetensors").write_bytes(b"damaged")
        with pytest.raises(ValueError, match=r"--store: expected a loadable accumulator state in "
                                             r"'.*moments-A\.rows-000006\.safetensors', got: .*"
                                             r"\(remove the file to recompute task A's moments\)"):
            store.load_moments(again, "A")


def test_finished_steps_are_saved_and_read_back(tmp_path):
    with RunStore(tmp_path / "s") as store:
        store.open(fingerprint(), PLAN)
        assert store.block(0) is None and store.result("conflicts") is None
        store.save_block(0, {"sums": [0.1, 1 / 3]})
        store.save_result("conflicts", {"p": [0.5]})
        assert store.block(0) == {"sums": [0.1, 1 / 3]} and store.result("conflicts") == {"p": [0.5]}
        (tmp_path / "s" / "check.json").write_text("{half")
        with pytest.raises(ValueError, match=r"--store: expected a readable result in "
                                             r"'.*check\.json', got JSONDecodeError"):
            store.result("check")


def test_the_digests_see_a_weight_and_a_label():
    model = build_model(TinyConfig(arch="gpt2", num_layers=1, num_heads=2, head_dim=4))
    before = model_digest(model)
    assert model_digest(model) == before
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert model_digest(model) != before
    batch = random_batch(batch_size=3, seed=0)
    batch["sample_ids"] = ["x", "y", "z"]
    digest = batch_digest(batch)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0, -1] = -100
    assert batch_digest(batch) != digest
    batch = random_batch(batch_size=3, seed=0)
    batch["sample_ids"] = ["x", "y", "w"]
    assert batch_digest(batch) != digest
