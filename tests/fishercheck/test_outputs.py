"""Outputs written whole: temporary names, a staged directory swapped in, a lock per --out."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fishercheck.outputs import INCOMPLETE, OutputDir, replacing, write_text

ROOT = Path(__file__).resolve().parents[2]
KNOWN = ("report.json", "report.md", "heads.png")


def tree(root):
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(Path(root).rglob("*"))}


def test_replacing_renames_on_success_and_leaves_the_target_on_failure(tmp_path):
    target = tmp_path / "report.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert tree(tmp_path) == {"report.json": b"old"}
    with replacing(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp.name.startswith(".")
        tmp.write_text("new")
    assert tree(tmp_path) == {"report.json": b"new"}


def test_a_run_is_staged_then_swapped_in_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    (out / "heads.png").write_text("old plot")
    with OutputDir(out, KNOWN) as staging:
        assert staging == tmp_path / f"out.incomplete-{os.getpid()}"
        assert (staging / INCOMPLETE).is_file() and (tmp_path / "out.lock").is_file()
        (staging / "report.json").write_text("new")
        assert tree(out) == {"report.json": b"old", "heads.png": b"old plot"}  # not yet
    # the block ended without a commit: nothing changed, nothing left
    assert tree(tmp_path) == {"out": None, "out/heads.png": b"old plot", "out/report.json": b"old"}
    run = OutputDir(out, KNOWN)
    with run as staging:
        (staging / "report.json").write_text("new")
        run.commit()
    # the stale plot of the earlier run is gone with it: the directory is the new run's only
    assert tree(tmp_path) == {"out": None, "out/report.json": b"new"}


def test_a_failed_run_changes_nothing_and_removes_the_parents_it_made(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError), OutputDir(out, KNOWN) as staging:
        (staging / "report.json").write_text("half")
        raise RuntimeError("model exploded")
    assert tree(tmp_path) == {}


def test_a_second_run_into_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "out"
    with OutputDir(out, KNOWN) as staging:
        second = OutputDir(out, KNOWN)
        with pytest.raises(ValueError, match=rf"--out: expected no other fishercheck run writing to "
                                             rf"it, got '{out}' locked by the run with pid {os.getpid()}"):
            second.__enter__()
        # the refused run left the holder's lock and directory alone
        assert (tmp_path / "out.lock").is_file() and (staging / INCOMPLETE).is_file()
    run = OutputDir(out, KNOWN)  # released: the next run proceeds
    with run as staging:
        (staging / "report.md").write_text("x")
        run.commit()
    assert tree(tmp_path) == {"out": None, "out/report.md": b"x"}


def test_the_next_run_removes_a_killed_runs_directory_and_only_that(tmp_path):
    killed = tmp_path / "out.incomplete-99999999"  # what SIGKILL leaves: the marker inside
    killed.mkdir()
    (killed / INCOMPLETE).write_text("x")
    (killed / "report.json").write_text("{")
    lookalike = tmp_path / "out.incomplete-mine"  # no marker: not ours
    lookalike.mkdir()
    run = OutputDir(tmp_path / "out", KNOWN)
    with run as staging:
        (staging / "report.json").write_text("{}")
        run.commit()
    assert tree(tmp_path) == {"out": None, "out/report.json": b"{}", "out.incomplete-mine": None}


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "out").write_text("x"), r"expected a directory \(created if missing\), got the "
                                            r"existing file '.*out'"),
    (lambda d: (d / "f").write_text("x"), r"expected a directory path, got '.*f/sub/out' under the "
                                          r"existing file '.*/f'"),
    (lambda d: ((d / "out").mkdir(), (d / "out" / "notes.txt").write_text("mine")),
     r"expected a new or empty directory, or one holding only an earlier fishercheck run's files "
     r"\(a run replaces it whole\), got '.*out' holding 1 other entries \(notes\.txt\)"),
], ids=["a-file", "under-a-file", "foreign-files"])
def test_unusable_out_is_refused_before_anything_is_written(tmp_path, make, message):
    make(tmp_path)
    before = tree(tmp_path)
    out = tmp_path / ("f/sub/out" if (tmp_path / "f").exists() else "out")
    with pytest.raises(ValueError, match="--out: " + message):
        OutputDir(out, KNOWN)
    assert tree(tmp_path) == before


def test_out_containing_the_working_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="expected a directory that does not contain the working"):
        OutputDir(".", KNOWN)


@pytest.mark.parametrize("sig", [
    signal.SIGINT,
    pytest.param(signal.SIGTERM, marks=pytest.mark.slow),  # the same path (a fresh process: ~5 s)
], ids=["SIGINT", "SIGTERM"])
def test_a_signalled_run_leaves_out_as_it_was(tmp_path, sig):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("the previous run")
    before = tree(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "fishercheck.cli", "run", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = tmp_path / f"out.incomplete-{proc.pid}"
    deadline = time.monotonic() + 60
    while not staging.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert staging.exists(), proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted ({signal.Signals(sig).name}); --out '{out}' is as it was." in err
    assert tree(tmp_path) == before
