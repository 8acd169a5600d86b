"""SIGINT and SIGTERM raise Interrupted, held back while a store commits."""

import os
import signal

import pytest
import torch

import fisher_fast
import fisher_fast.file_integrity
from fisher_ref.testing.batches import random_batch
from fisher_ref.testing.models import TinyConfig, build_model
from fishercheck import long_steps
from fishercheck.interference_blocks import slice_names
from fishercheck.interrupts import Interrupted, deferred, signals_interrupt


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_raises_interrupted(sig):
    with pytest.raises(Interrupted) as err, signals_interrupt():
        os.kill(os.getpid(), sig)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert err.value.signum == sig


def test_a_signal_inside_deferred_is_raised_when_the_block_ends():
    done = []
    with pytest.raises(Interrupted) as err, signals_interrupt():
        with deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
            done.append("the block ran to its end")
    assert done and err.value.signum == signal.SIGTERM


def test_a_signal_while_a_chunk_commits_leaves_the_committed_store(tmp_path, monkeypatch):
    # the signal arrives after the store's manifest was renamed into place (while its directory
    # is flushed): raised there, the transaction would roll back and remove the shard the
    # manifest on disk names
    model = build_model(TinyConfig(arch="gpt2", num_layers=1, num_heads=2, head_dim=4))
    units = random_batch(batch_size=4, seed=0)
    units["sample_ids"] = [f"a_{i}" for i in range(4)]
    names = slice_names(fisher_fast.attention_layout(model))
    store = fisher_fast.ContributionStore(tmp_path / "c", device_bytes=0, host_bytes=0)
    flush = fisher_fast.file_integrity._fsync_directory

    def signalled(path):
        flush(path)
        if os.path.basename(os.fspath(path)) == "c":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(fisher_fast.file_integrity, "_fsync_directory", signalled)
    with pytest.raises(Interrupted), signals_interrupt():
        long_steps.file_contributions(model, units, names, store=store, chunk_rows=2,
                                      dtype=torch.float32)
    store.close()
    monkeypatch.undo()
    again = fisher_fast.ContributionStore.open(tmp_path / "c")  # every listed shard is there
    assert again.ids("A") == ["a_0", "a_1"]
    assert torch.equal(again.get_stacked("A", ["a_0", "a_1"])[names[0]],
                       fisher_fast.per_sample_contributions(model, {k: v[:2] for k, v in
                                                                    units.items()},
                                                            params=names, chunk_size=2)
                       .tensors[names[0]])
