"""``--store DIR``: what an interrupted main job needs to continue where it stopped.

The directory holds

- ``run.json``: the run's manifest — a fingerprint of its inputs (the model's class, config and
  a sha256 of every parameter; each task's token ids, masks, labels and sample ids; the
  settings that change the numbers, the chunks and scoring blocks among them) and the memory
  plan it was started with. Written once, when the store is created; a run whose fingerprint
  differs is refused, naming what differs;
- ``contributions/``: a ``fisher_fast.ContributionStore`` (every add goes to disk at once)
  holding task A's contributions C_A, keyed by sample id;
- ``moments-A.rows-000064.safetensors`` (and B): the accumulator of a task after its first
  64 rows (``FisherAccumulator.save``; the number of rows in the name, so that the state and
  how far it got are one file);
- ``interference/block-0003.json``: the sums and largest entries of a finished scoring block;
- ``conflicts.json``, ``check.json``: the results of those steps, once finished.

Every file is written whole (a temporary name, then ``os.replace``), and the contribution
store commits each chunk atomically, so a run killed at any moment (SIGKILL included) leaves
a state the next run with the same command continues from. A run holds ``DIR/.lock``
(``flock``, released when the process dies) for as long as it lives: a second run on the same
store is refused. A store is never removed by fishercheck: delete the directory when its
report is written and it is no longer wanted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import torch

import fisher_fast
from fisher_fast.file_integrity import tensor_digest
from fishercheck.interrupts import deferred
from fishercheck.outputs import write_text

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

FORMAT = "fishercheck.run_store/1"
MANIFEST = "run.json"
CONTRIBUTIONS = "contributions"
_STATE = re.compile(r"moments-(?P<task>[AB])\.rows-(?P<rows>\d+)\.safetensors")
_OURS = re.compile(r"(run\.json|\.lock|contributions|interference|conflicts\.json|check\.json|"
                   r"moments-[AB]\.rows-\d+\.safetensors)")
# a temporary file of a write a killed run left: fishercheck's (.run.tmp-PID.json) or
# fisher_fast's (.moments-A.rows-000032.safetensors.PID.HEX.tmp)
_TEMPORARY = re.compile(r"\.(run|conflicts|check)\.tmp-\d+\.json|\.moments-[AB]\.rows-\d+"
                        r"\.safetensors\.\d+\.[0-9a-f]+\.tmp")


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of the model's class, config and every parameter's name, shape, dtype and bytes."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict(keep_vars=False).items():
        h.update(f"{name}:{tensor_digest(p)}".encode())
    return h.hexdigest()


def batch_digest(batch: dict) -> str:
    """sha256 of a task's rows: token ids, attention mask, labels and sample ids."""
    h = hashlib.sha256()
    for key in ("input_ids", "attention_mask", "labels"):
        h.update(f"{key}:{tensor_digest(batch[key])}".encode())
    h.update(json.dumps(list(batch["sample_ids"])).encode())
    return h.hexdigest()


class RunStore:
    """The ``--store`` directory of a main job (see the module docstring).

    Checked on construction (nothing is created then); :meth:`open` takes the lock and
    creates or checks ``run.json``.

    Args:
        path: the directory (created by :meth:`open` if missing).
        out: the run's ``--out``, which must neither contain the store nor lie inside it.

    Raises:
        ValueError: ``path`` is a file, lies under one, cannot be written, overlaps ``out``,
            or holds files that are not a fishercheck store's.
    """

    def __init__(self, path: str | Path, out: str | Path | None = None):
        self.given = str(path)
        self.path = Path(path).expanduser().resolve()
        self._lock = None
        self._contributions = None
        p, given = self.path, repr(self.given)
        if p.exists() and not p.is_dir():
            raise self._error("a directory (created if missing)", f"the existing file {given}")
        ancestor = next(a for a in p.parents if a.exists())
        if not p.exists() and not ancestor.is_dir():
            raise self._error("a directory path", f"{given} under the existing file "
                                                  f"{str(ancestor)!r}")
        where = p if p.exists() else ancestor
        if not os.access(where, os.W_OK | os.X_OK):
            raise self._error("a writable location", f"{given}: cannot write in {str(where)!r}")
        if out is not None:
            o = Path(out).expanduser().resolve()
            if o == p or o in p.parents or p in o.parents:
                raise self._error("a directory apart from --out (a run replaces --out whole)",
                                  f"{given} and --out {str(out)!r}")
        if p.is_dir():
            other = sorted(n for n in os.listdir(p)
                           if not (_OURS.fullmatch(n) or _TEMPORARY.fullmatch(n)))
            if other or (os.listdir(p) and not (p / MANIFEST).is_file()):
                shown = ", ".join((other or sorted(os.listdir(p)))[:4])
                raise self._error("a new or empty directory, or the store of an earlier "
                                  "fishercheck run", f"{given} holding {shown}")

    def _error(self, expected: str, got: str) -> ValueError:
        return ValueError(f"--store: expected {expected}, got {got}.")

    # ------------------------------------------------------------------ manifest and lock
    def open(self, fingerprint: dict, plan: dict) -> dict | None:
        """Take the store's lock; create ``run.json`` or check it against ``fingerprint``.

        Args:
            fingerprint: ``{"model", "task_a", "task_b", "settings"}`` of this run.
            plan: this run's memory plan (``Plan.describe()``), recorded when the store is new.

        Returns:
            The recorded plan of an existing store (the run resumes with its chunks), or
            None for a new one.

        Raises:
            ValueError: another run holds the store, its ``run.json`` is unreadable, or it
                was made for other inputs (naming which); nothing is changed then.
        """
        manifest = self._read_manifest()
        if manifest is not None:  # in use by another run: said first, whatever its inputs
            self._acquire()
            try:
                self._compare(manifest["fingerprint"], fingerprint)
            except BaseException:
                self.close()
                raise
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self._acquire()
        if self._lock is not None:  # ours now (the pid written once the store is this run's)
            os.ftruncate(self._lock, 0)
            os.write(self._lock, f"{os.getpid()}\n".encode())
        for stale in self.path.iterdir():  # a killed run's half-written file (we hold the lock)
            if _TEMPORARY.fullmatch(stale.name):
                stale.unlink(missing_ok=True)
        if manifest is None:
            if (self.path / MANIFEST).exists():  # another run created it meanwhile
                manifest = self._read_manifest()
                self._compare(manifest["fingerprint"], fingerprint)
            else:
                write_text(self.path / MANIFEST, json.dumps(
                    {"format": FORMAT, "fingerprint": fingerprint, "plan": plan}, indent=1) + "\n")
                return None
        return manifest["plan"]

    def _read_manifest(self) -> dict | None:
        path = self.path / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
            ok = manifest.get("format") == FORMAT and {"fingerprint", "plan"} <= set(manifest)
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise self._error(f"a fishercheck store ({FORMAT})",
                              f"{str(path)!r}, which is not one (unreadable or of another format)")
        return manifest

    def _compare(self, stored: dict, current: dict) -> None:
        old, new = stored.get("settings", {}), current["settings"]
        differ = [f"{k} {new.get(k)!r} (the store's: {old.get(k)!r})"
                  for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if differ:
            raise self._error("the store of a run with this run's settings", f"{self.given!r}, "
                              f"made with other settings: {', '.join(differ)}; rerun with the "
                              f"store's settings, or use a new --store")
        what = {"model": "a different model (its class, config or weights differ)",
                "task_a": "different task A rows (another task file, text field or tokenizer)",
                "task_b": "different task B rows (another task file, text field or tokenizer)"}
        for key, words in what.items():
            if stored.get(key) != current[key]:
                raise self._error("the store of a run with this run's inputs", f"{self.given!r}, "
                                  f"made for {words}; rerun with that run's inputs, or use a new "
                                  f"--store")

    def _acquire(self) -> None:
        if fcntl is None:
            return
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                pid = (self.path / ".lock").read_text().strip() or "?"
            except OSError:
                pid = "?"
            raise self._error("a store no other fishercheck run is using",
                              f"{self.given!r} in use by the run with pid {pid}; wait for it "
                              "or use another --store") from None
        self._lock = fd

    def close(self) -> None:
        """Release the contribution store and the lock (the files stay)."""
        if self._contributions is not None:
            with contextlib.suppress(Exception):
                self._contributions.close()
            self._contributions = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ contributions
    def contributions(self, device: torch.device) -> fisher_fast.ContributionStore:
        """Task A's ContributionStore (created on first use; every add on disk at once).

        Raises:
            ValueError: a damaged store (a missing, truncated or altered shard, naming it).
        """
        if self._contributions is None:
            d = self.path / CONTRIBUTIONS
            try:
                with deferred():  # it may write its manifest and remove a crashed write's shard
                    if (d / "manifest.json").exists():
                        self._contributions = fisher_fast.ContributionStore.open(
                            d, device_bytes=0, host_bytes=0, device=device)
                    else:
                        self._contributions = fisher_fast.ContributionStore(
                            d, device_bytes=0, host_bytes=0, device=device)
            except ValueError as exc:
                raise ValueError(f"--store: expected a readable contribution store in "
                                 f"{str(d)!r}, got: {exc}") from None
        return self._contributions

    # ------------------------------------------------------------------ accumulators
    def load_moments(self, acc: fisher_fast.FisherAccumulator, task: str) -> int:
        """Load the latest saved state of ``task`` into ``acc``; returns its rows (0: none).

        Raises:
            ValueError: a saved state that does not load (damaged, or of another model),
                naming the file.
        """
        saved = self._states(task)
        if not saved:
            return 0
        rows, path = saved[-1]
        try:
            acc.load(path)
        except ValueError as exc:
            raise ValueError(f"--store: expected a loadable accumulator state in "
                             f"{str(path)!r}, got: {exc} (remove the file to recompute task "
                             f"{task}'s moments)") from None
        return rows

    def save_moments(self, acc: fisher_fast.FisherAccumulator, task: str, rows: int) -> None:
        """Save ``acc`` as the state of ``task`` after ``rows`` rows; older states go."""
        path = self.path / f"moments-{task}.rows-{rows:06d}.safetensors"
        acc.save(path)
        for r, p in self._states(task):
            if r != rows:
                p.unlink(missing_ok=True)

    def _states(self, task: str) -> list[tuple[int, Path]]:
        found = []
        for p in self.path.glob(f"moments-{task}.rows-*.safetensors"):
            m = _STATE.fullmatch(p.name)
            if m:
                found.append((int(m["rows"]), p))
        return sorted(found)

    # ------------------------------------------------------------------ finished steps
    def block(self, j: int) -> dict | None:
        """The saved result of scoring block ``j``, or None."""
        return self._read(self.path / "interference" / f"block-{j:04d}.json")

    def save_block(self, j: int, data: dict) -> None:
        """Save the result of scoring block ``j``."""
        (self.path / "interference").mkdir(exist_ok=True)
        write_text(self.path / "interference" / f"block-{j:04d}.json", json.dumps(data) + "\n")

    def result(self, name: str) -> dict | None:
        """The saved result of step ``name`` (``conflicts``, ``check``), or None."""
        return self._read(self.path / f"{name}.json")

    def save_result(self, name: str, data: dict) -> None:
        """Save the result of step ``name``."""
        write_text(self.path / f"{name}.json", json.dumps(data) + "\n")

    def _read(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--store: expected a readable result in {str(path)!r}, got "
                             f"{type(exc).__name__}: {exc} (remove the file to recompute "
                             "it)") from None
