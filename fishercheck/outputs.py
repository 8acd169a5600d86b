"""Outputs written whole: each file through a temporary name, each run through a fresh directory.

A run into ``--out DIR`` holds the lock ``DIR.lock`` (beside ``DIR``; a second run into the
same ``DIR`` is refused while the first lives, and the lock dies with its process), writes
everything into the fresh sibling ``DIR.incomplete-PID/`` (marked by a file ``INCOMPLETE``)
and, once every file is written, swaps it in for ``DIR``. A run that fails or is interrupted
(an exception, SIGINT, SIGTERM) removes its directory and lock and leaves ``DIR`` as it was;
one killed outright (SIGKILL) leaves ``DIR.incomplete-PID/`` with its marker, which the next
run into ``DIR`` removes. Each file is written to a hidden temporary name in its directory
and renamed over the target (``os.replace``), so no reader ever sees half a file.

Because a run replaces the whole directory, an existing ``DIR`` must be empty or hold only a
previous run's files (:class:`OutputDir` refuses anything else).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: an exclusive-create lock file instead (left behind by a crash)
    fcntl = None

INCOMPLETE = "INCOMPLETE"  # the marker file of a run's directory until it is swapped in


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` on success.

    The temporary name keeps the suffix (``.report.tmp-PID.json``), so writers that read the
    format from it (matplotlib) still work; on failure it is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole (a temporary file, then ``os.replace``)."""
    with replacing(path) as tmp:
        tmp.write_text(text)


class OutputDir:
    """A run's output directory: checked, locked, staged in a fresh sibling, swapped in whole.

    Use as a context manager: the value is the directory to write into; :meth:`commit`
    swaps it in for ``out``. Leaving the block without a commit (an error, an interrupt)
    removes it, the lock, and any parent directories this run created.

    Args:
        out: the ``--out`` directory (created if missing; its parents too).
        known: the file names a previous run may have left in ``out``.
        option: the option named in error messages.

    Raises:
        ValueError: ``out`` is an existing file, lies under one, holds files other than
            ``known``, contains the working directory, cannot be created or written, or
            another run holds its lock (on construction or on entering).
    """

    def __init__(self, out: str | Path, known: Iterable[str], option: str = "--out"):
        self.option, self.given = option, str(out)
        self.out = Path(out).expanduser().resolve()
        self.parent, self.name = self.out.parent, self.out.name
        self.lock_path = self.parent / f"{self.name}.lock"
        self.path = self.parent / f"{self.name}.incomplete-{os.getpid()}"
        self._known, self._created, self._lock = set(known), [], None
        self._staged = self._committed = False
        self._check()

    def _error(self, expected: str, got: str) -> ValueError:
        return ValueError(f"{self.option}: expected {expected}, got {got}.")

    def _check(self) -> None:
        out, given = self.out, repr(self.given)
        if out.exists() and not out.is_dir():
            raise self._error("a directory (created if missing)", f"the existing file {given}")
        cwd = Path.cwd().resolve()
        if cwd == out or out in cwd.parents:
            raise self._error("a directory that does not contain the working directory (a run "
                              "replaces it whole)", given)
        if out.is_dir():
            other = sorted(set(os.listdir(out)) - self._known)
            if other:
                shown = ", ".join(other[:4]) + (", …" if len(other) > 4 else "")
                raise self._error("a new or empty directory, or one holding only an earlier "
                                  "fishercheck run's files (a run replaces it whole)",
                                  f"{given} holding {len(other)} other entries ({shown})")
        ancestor = next(p for p in out.parents if p.exists())
        if not ancestor.is_dir():
            raise self._error("a directory path", f"{given} under the existing file {str(ancestor)!r}")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise self._error("a writable location", f"{given}: cannot write in {str(ancestor)!r}")

    def __enter__(self) -> Path:
        try:
            self._make_parents()
            self._acquire()
            self._remove_stale()
            self.path.mkdir()
            self._staged = True
            (self.path / INCOMPLETE).write_text(
                f"fishercheck run (pid {os.getpid()}) into {self.out}: in progress, or "
                f"interrupted; not a complete report. The next run into it removes this.\n")
        except BaseException as exc:
            self._cleanup()
            if isinstance(exc, OSError):
                raise self._error("a writable location",
                                  f"{self.given!r}: {exc.strerror or exc} ({exc.filename})") from None
            raise
        return self.path

    def commit(self) -> None:
        """Swap the written directory in for ``out`` (the previous one, if any, is removed)."""
        (self.path / INCOMPLETE).unlink()
        if self.out.exists():
            old = self.parent / f"{self.name}.old-{os.getpid()}"
            os.rename(self.out, old)
            try:
                os.rename(self.path, self.out)
            except BaseException:
                os.rename(old, self.out)  # the previous run's files back in place
                raise
            self._committed = True
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.path, self.out)
            self._committed = True

    def __exit__(self, *exc_info: object) -> None:
        self._cleanup()

    def _make_parents(self) -> None:
        missing = [p for p in reversed(self.out.parents) if not p.exists()]
        for p in missing:
            p.mkdir()
            self._created.append(p)

    def _acquire(self) -> None:
        if fcntl is None:
            try:
                self._lock = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise self._busy() from None
        else:
            while True:  # the lock file may be removed by its holder between open and lock
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._busy() from None
                try:
                    same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self._lock = fd
                    break
                os.close(fd)
        os.ftruncate(self._lock, 0)
        os.write(self._lock, f"{os.getpid()}\n".encode())

    def _busy(self) -> ValueError:
        try:
            pid = self.lock_path.read_text().strip() or "?"
        except OSError:
            pid = "?"
        return self._error("no other fishercheck run writing to it",
                           f"{self.given!r} locked by the run with pid {pid} "
                           f"({str(self.lock_path)!r}); wait for it or choose another --out")

    def _remove_stale(self) -> None:
        """Directories of earlier runs into ``out`` that were killed (we hold the lock)."""
        for stale in glob.glob(glob.escape(str(self.parent / self.name)) + ".incomplete-*"):
            if (Path(stale) / INCOMPLETE).is_file():
                shutil.rmtree(stale, ignore_errors=True)
        if self.out.is_dir():  # a swap cut short after its first rename leaves DIR.old-PID
            for old in glob.glob(glob.escape(str(self.parent / self.name)) + ".old-*"):
                shutil.rmtree(old, ignore_errors=True)

    def _cleanup(self) -> None:
        if self._staged and not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
            self._staged = False
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self.lock_path.unlink()  # while still holding it: the next run finds none
            os.close(self._lock)
            self._lock = None
        if not self._committed:
            for p in reversed(self._created):
                with contextlib.suppress(OSError):
                    p.rmdir()  # only if empty
            self._created = []
