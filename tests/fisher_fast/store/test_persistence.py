"""A ContributionStore on disk survives its process: reopened elsewhere it gives back every
record; damaged, missing or foreign files are named; a kill -9 mid-write loses at most the
write in flight; a read-only store cannot be changed; one writer per directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fisher_fast.store.contribution_store import ContributionStore

ROOT = Path(__file__).resolve().parents[3]


def _tensors(n, offset=0.0):
    a = torch.arange(n * 6, dtype=torch.float64).reshape(n, 2, 3) + offset
    return {"w": a, "b": -torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) - offset}


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


FILL = """
import sys, torch
from fisher_fast.store.contribution_store import ContributionStore
with ContributionStore(sys.argv[1] if len(sys.argv) > 1 else {d!r}, device="cpu",
                       host_bytes=80) as s:
    s.add("task a", [3, "x_1"], {{"w": torch.ones(2, 2, 3, dtype=torch.float64),
                                  "b": torch.full((2, 4), 2.0)}})
    s.add(("b", 1), [(7, 2)], {{"w": torch.zeros(1, 5)}})
    s.add("task a", ["last"], {{"w": torch.full((1, 2, 3), 4.0, dtype=torch.float64),
                                "b": torch.zeros(1, 4)}})
"""


def test_a_store_filled_in_one_process_is_read_in_another(tmp_path):
    p = _python(FILL.format(d=str(tmp_path)))
    assert p.wait(timeout=120) == 0, p.stderr.read()
    store = ContributionStore.open(tmp_path, device="cpu")
    assert store.tasks() == ["task a", ("b", 1)]
    assert store.ids("task a") == [3, "x_1", "last"] and store.ids(("b", 1)) == [(7, 2)]
    got = store.get_stacked("task a", ["last", 3])
    assert torch.equal(got["w"], torch.stack([torch.full((2, 3), 4.0, dtype=torch.float64),
                                              torch.ones(2, 3, dtype=torch.float64)]))
    assert got["b"].dtype == torch.float32 and torch.equal(got["b"][1], torch.full((4,), 2.0))
    assert store.tier_of("task a", 3) == "disk"
    store.add("task a", ["more"], _tensors(1))  # and it goes on from there
    store.close()
    again = ContributionStore.open(tmp_path, read_only=True, device="cpu")
    assert again.ids("task a") == [3, "x_1", "last", "more"]


def _filled(tmp_path) -> ContributionStore:
    store = ContributionStore(tmp_path, device="cpu", device_bytes=0, host_bytes=0)
    store.add("a", ["x", "y"], _tensors(2))
    store.add("a", ["z"], _tensors(1, offset=3.0))
    store.close()
    return store


def _shard(tmp_path) -> Path:
    return sorted(tmp_path.glob("shard-*.safetensors"))[0]


def _truncate(tmp_path):
    p = _shard(tmp_path)
    p.write_bytes(p.read_bytes()[:-7])
    return p, "truncated"


def _remove(tmp_path):
    p = _shard(tmp_path)
    p.unlink()
    return p, "missing shard"


def _flip_payload_byte(tmp_path):
    p = _shard(tmp_path)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF  # in the last tensor's payload: the header stays intact
    p.write_bytes(bytes(data))
    return p, r"checksum mismatch .*\(tensor 'r\d\.p\d'\)"


def _foreign_manifest(tmp_path):
    other = tmp_path.parent / (tmp_path.name + "-other")
    _filled(other)
    shutil.copy(other / "manifest.json", tmp_path / "manifest.json")
    missing = sorted(other.glob("shard-*"))[0].name
    return tmp_path / missing, "missing shard"


def _other_format(tmp_path):
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["format"] = "something/9"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    return tmp_path / "manifest.json", "expected a manifest of format"


@pytest.mark.parametrize("damage", [_truncate, _remove, _flip_payload_byte, _foreign_manifest,
                                    _other_format])
def test_damage_is_named(tmp_path, damage):
    _filled(tmp_path)
    path, message = damage(tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        ContributionStore.open(tmp_path, device="cpu")
    assert str(path) in str(info.value)


def test_no_store_here(tmp_path):
    with pytest.raises(ValueError, match="expected a store directory with manifest.json"):
        ContributionStore.open(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        ContributionStore.open(tmp_path / "nowhere")


def test_read_only_store_refuses_every_write(tmp_path):
    _filled(tmp_path)
    before = sorted(os.listdir(tmp_path)), (tmp_path / "manifest.json").read_bytes()
    store = ContributionStore.open(tmp_path, read_only=True, device="cpu")
    for write in (lambda: store.add("a", ["new"], _tensors(1)), lambda: store.delete("a", ["x"]),
                  store.promote, store.flush, lambda: store.transaction().__enter__()):
        with pytest.raises(ValueError, match="opened read-only"):
            write()
    assert store.ids("a") == ["x", "y", "z"]
    assert (sorted(os.listdir(tmp_path)), (tmp_path / "manifest.json").read_bytes()) == before


def test_one_writer_per_directory_and_no_second_store_over_one(tmp_path):
    store = ContributionStore(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="locked by another store"):
        ContributionStore.open(tmp_path)
    ContributionStore.open(tmp_path, read_only=True).close()  # readers are welcome
    store.close()
    with pytest.raises(ValueError, match="holds one .*ContributionStore.open"):
        ContributionStore(tmp_path)
    ContributionStore.open(tmp_path).close()


def test_ids_that_cannot_be_saved_are_refused_before_writing(tmp_path):
    store = ContributionStore(tmp_path, device="cpu", host_bytes=0)
    with pytest.raises(ValueError, match="sample id: expected an int, a str or a tuple"):
        store.add("a", [1.5], _tensors(1))
    assert store.tasks() == [] and not list(tmp_path.glob("shard-*"))


def test_flush_moves_memory_records_to_disk(tmp_path):
    store = ContributionStore(tmp_path, device="cpu")  # everything in memory
    store.add("a", ["x", "y"], _tensors(2))
    assert store.usage()["disk"] == 0
    assert ContributionStore.open(tmp_path, read_only=True).ids("a") == []  # not yet on disk
    assert store.flush() == 2 and store.tier_of("a", "x") == "disk"
    store.close()
    assert ContributionStore.open(tmp_path, read_only=True).ids("a") == ["x", "y"]
    with pytest.raises(ValueError, match="expected a store with a directory"):
        ContributionStore(device="cpu").flush()


def test_an_uncommitted_shard_is_removed_on_open(tmp_path):
    _filled(tmp_path)
    shard = _shard(tmp_path)
    stray = tmp_path / "shard-0123456789abcdef.safetensors"
    shutil.copy(shard, stray)  # as a crashed add leaves it: written, never in the manifest
    unrelated = tmp_path / "shard-notours.safetensors"
    unrelated.write_bytes(b"someone else's file")
    ContributionStore.open(tmp_path, read_only=True).close()
    assert stray.exists()  # a reader changes nothing
    ContributionStore.open(tmp_path).close()
    assert not stray.exists() and unrelated.exists()


WRITER = """
import sys, torch
from fisher_fast.store.contribution_store import ContributionStore
s = ContributionStore(sys.argv[1], device="cpu", device_bytes=0, host_bytes=0)
for k in range(100000):
    s.add("t", [k], {"w": torch.full((1, 64, 64), float(k))})
    print(k, flush=True)
"""


@pytest.mark.parametrize("delay", [0.4, 0.9, 1.7])
def test_kill_9_mid_write_leaves_the_last_committed_state(tmp_path, delay):
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    out, _ = p.communicate(timeout=60)
    printed = [int(x) for x in out.split()]
    store = ContributionStore.open(tmp_path, device="cpu")
    ids = store.ids("t")
    assert ids == list(range(len(ids)))  # a prefix of the adds
    assert len(ids) >= len(printed)  # every add that returned is there
    if ids:
        got = store.get_stacked("t", ids)["w"]
        assert torch.equal(got, torch.tensor(ids, dtype=torch.float32)[:, None, None].expand(-1, 64, 64))
    assert len(list(tmp_path.glob("shard-*"))) == len({r for r in ids})  # no stray shard left


def test_an_interrupt_after_the_manifest_rename_keeps_the_commit(tmp_path, monkeypatch):
    """Ctrl-C arriving after the new manifest is in place (but before the write returns)
    must not roll the store back in memory: the manifest on disk names the new shard.
    """
    import fisher_fast.file_integrity as fi

    store = ContributionStore(tmp_path, device="cpu", device_bytes=0, host_bytes=0)
    store.add("a", ["x"], _tensors(1))
    real = os.replace

    def replace_then_interrupt(src, dst):
        real(src, dst)
        if os.path.basename(dst) == "manifest.json":
            raise KeyboardInterrupt

    monkeypatch.setattr(fi.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        store.add("a", ["y"], _tensors(1, offset=2.0))
    monkeypatch.setattr(fi.os, "replace", real)
    assert store.ids("a") == ["x", "y"]
    store.add("a", ["z"], _tensors(1, offset=4.0))  # and the store goes on
    store.close()
    again = ContributionStore.open(tmp_path, device="cpu")
    assert again.ids("a") == ["x", "y", "z"]
    assert torch.equal(again.get("a", "y")["w"], _tensors(1, offset=2.0)["w"][0])


def test_a_killed_writes_temporary_files_are_removed_on_open(tmp_path):
    _filled(tmp_path)
    left = [tmp_path / ".shard-0123.safetensors.999.abcd.tmp", tmp_path / ".manifest.json.999.ab.tmp"]
    for p in left:
        p.write_bytes(b"half a file")
    ContributionStore.open(tmp_path, read_only=True).close()
    assert all(p.exists() for p in left)  # a reader changes nothing
    ContributionStore.open(tmp_path).close()
    assert not any(p.exists() for p in left)
