"""``fishercheck run --store``: a run killed mid-way (SIGKILL, SIGTERM, SIGINT) and resumed with
the same command writes the report of an uninterrupted run, number for number; the memory
plan's modes agree; a task file with fewer texts than --samples is said.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fishercheck.cli import main

ROOT = Path(__file__).resolve().parents[2]
# 128 rows per task in chunks of 32; a 12 MiB budget scores task B in blocks of ~40 rows
ARGS = ["--samples", "128", "--pairs", "8", "--permutations", "99", "--no-plots", "--quiet",
        "--checkpoint-interval", "0", "--memory-budget", "12M"]
NUMBERS = ("tasks", "interference", "conflicts", "layout")


def numbers(out):
    report = json.loads((out / "report.json").read_text())
    settings = dict(report["settings"])
    memory = {k: v for k, v in settings.pop("memory").items() if k != "budget_bytes"}
    return {k: report[k] for k in NUMBERS}, settings, memory, report


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same run with a store of its own, never interrupted."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    assert main(["run", "--out", str(tmp / "out"), "--store", str(tmp / "store"), *ARGS]) == 0
    return numbers(tmp / "out")


def _records(store):
    path = store / "contributions" / "manifest.json"
    return len(json.loads(path.read_text())["records"]) if path.is_file() else 0


def _moments_started(store):
    return any(int(p.name.split("rows-")[1].split(".")[0]) < 128
               for p in store.glob("moments-A.rows-*.safetensors"))


TRIGGERS = {  # what the killed run has done when it is killed
    "moments": _moments_started,
    "contributions": lambda store: 0 < _records(store) < 128,
    "interference": lambda store: (store / "interference" / "block-0000.json").is_file(),
}


def _killed(tmp_path, when, sig):
    """Start the run in a subprocess and send ``sig`` once ``TRIGGERS[when]`` holds."""
    out, store = tmp_path / "out", tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as the tests' torch
    proc = subprocess.Popen([sys.executable, "-m", "fishercheck.cli", "run", "--out", str(out),
                             "--store", str(store), *ARGS], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not TRIGGERS[when](store):
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGKILL, 128 + sig), (proc.returncode, err)
    assert not out.exists()  # the killed run never swapped a report in
    return out, store, err


@pytest.mark.parametrize("when, sig", [
    ("contributions", signal.SIGKILL),
    pytest.param("moments", signal.SIGKILL, marks=pytest.mark.slow),  # a fresh process each: ~5 s
    pytest.param("interference", signal.SIGKILL, marks=pytest.mark.slow),
    pytest.param("contributions", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("interference", signal.SIGINT, marks=pytest.mark.slow),
], ids=["kill-9-contributions", "kill-9-moments", "kill-9-interference", "SIGTERM", "SIGINT"])
def test_a_killed_run_resumed_writes_the_uninterrupted_report(tmp_path, uninterrupted, when, sig):
    out, store, err = _killed(tmp_path, when, sig)
    if sig != signal.SIGKILL:
        assert f"interrupted ({signal.Signals(sig).name}); --out '{out}' is as it was; --store " \
               f"'{store}' keeps the work done: rerun the same command to continue." in err
    assert main(["run", "--out", str(out), "--store", str(store), *ARGS]) == 0
    got = numbers(out)
    assert got[:3] == uninterrupted[:3]  # every number, bit for bit
    reused = got[3]["store"]["reused"]
    assert reused["moments_A_rows"] > 0  # the killed run's work was used, not redone
    if when in ("contributions", "interference"):
        assert reused["moments_A_rows"] == reused["moments_B_rows"] == 128
        assert reused["contributions_A_rows"] > 0
    if when == "interference":
        assert reused["interference_blocks"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "store"]  # no stale staging


def test_an_interrupted_run_in_process_resumes_from_its_finished_blocks(tmp_path, uninterrupted,
                                                                        monkeypatch):
    import fisher_fast

    calls, original = [], fisher_fast.per_sample_gradients

    def second_block_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    argv = ["run", "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store"), *ARGS]
    with monkeypatch.context() as m:
        m.setattr(fisher_fast, "per_sample_gradients", second_block_interrupted)
        assert main(argv) == 130
    assert main(argv) == 0
    got = numbers(tmp_path / "out")
    assert got[:3] == uninterrupted[:3]
    assert got[3]["store"]["reused"] == {"moments_A_rows": 128, "moments_B_rows": 128,
                                         "contributions_A_rows": 128, "interference_blocks": 1,
                                         "conflicts": False}
    assert main(argv) == 0  # once more: everything comes from the store
    again = numbers(tmp_path / "out")
    assert again[:3] == uninterrupted[:3] and again[3]["store"]["reused"]["conflicts"] is True


def test_the_memory_modes_agree(tmp_path, uninterrupted):
    tasks, settings, memory, _ = uninterrupted
    assert memory["mode"] == "store" and 1 < memory["block_rows"] < 128
    for budget, mode in (("12M", "recompute"), ("1G", "memory")):
        out = tmp_path / mode
        assert main(["run", "--out", str(out), *ARGS[:-1], budget]) == 0
        got, got_settings, got_memory, _ = numbers(out)
        assert got_memory["mode"] == mode and got_settings == settings
        assert got["conflicts"] == tasks["conflicts"] and got["tasks"] == tasks["tasks"]
        for block, means in got["interference"]["means"].items():
            want = tasks["interference"]["means"][block]
            flat = [x for row in means for x in row]  # B's blocks differ: rounding
            assert flat == pytest.approx([x for row in want for x in row], rel=1e-6), block
        assert [t["id_a"] + t["id_b"] for t in got["interference"]["top"]] == \
            [t["id_a"] + t["id_b"] for t in tasks["interference"]["top"]]


def test_a_task_file_with_fewer_texts_than_samples_is_said(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), "--samples", "200", "--pairs", "4",
                 "--permutations", "19", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "fishercheck run: task A: '" in err and "task_a.txt' has 128 texts, fewer than " \
           "--samples 200: all 128 are used" in err
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert meta["samples"] == 200 and meta["rows"] == {"A": 128, "B": 128}
    assert "128 of the 200 rows asked for" in (out / "report.md").read_text()


@pytest.mark.gpu
def test_a_run_on_cuda_interrupted_and_resumed_writes_the_uninterrupted_report(tmp_path, device,
                                                                              monkeypatch):
    import fisher_fast

    small = ["--samples", "64", "--pairs", "8", "--permutations", "99", "--no-plots",
             "--checkpoint-interval", "0", "--memory-budget", "12M", "--device", device]
    assert main(["run", "--out", str(tmp_path / "ref"), "--store", str(tmp_path / "ref-store"),
                 *small]) == 0
    calls, original = [], fisher_fast.per_sample_contributions

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    argv = ["run", "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store"), *small]
    with monkeypatch.context() as m:
        m.setattr(fisher_fast, "per_sample_contributions", interrupted)
        assert main(argv) == 130
    assert main(argv) == 0
    got, want = numbers(tmp_path / "out"), numbers(tmp_path / "ref")
    assert got[:3] == want[:3] and got[3]["meta"]["device"] == "cuda"
    assert got[3]["store"]["reused"]["contributions_A_rows"] == 32
