"""Checksums, path checks and atomic writes for the files fisher_fast writes.

Used by the accumulator's state files (``stats/state_file.py``); a foundation module, so
that the contribution store's shards and manifest (``store/``) can use the same helpers:

- :func:`tensor_digest`: the sha256 of a tensor's dtype, shape and bytes, to store beside it
  and compare on load (:func:`check_digests`), so that corrupted payload bytes under an
  intact header are caught;
- :func:`text_digest`: the sha256 of a metadata string (a JSON header);
- :func:`writable_path` / :func:`readable_file`: a path argument checked before any work,
  with one-line ``ValueError`` messages (a missing directory, a directory given for a file);
- :func:`atomic_write`: write into a temporary file in the target's own directory, flush it
  to disk (``fsync``) and ``os.replace`` it onto the target, so that a reader sees the old
  file or the new one, never a part; on failure the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

PathLike = str | os.PathLike


def tensor_digest(tensor: torch.Tensor) -> str:
    """The sha256 (hex) of ``tensor``'s dtype, shape and bytes (row-major, any device).

    Two tensors have the same digest exactly when they hold the same bytes with the same
    dtype and shape; a tensor on a GPU is copied to the CPU first.
    """
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def text_digest(text: str) -> str:
    """The sha256 (hex) of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()


def check_digests(path: PathLike, tensors: Mapping[str, torch.Tensor],
                  digests: Mapping[str, str]) -> None:
    """Every tensor of the file at ``path`` has the digest recorded for it, and every recorded
    digest has its tensor.

    Raises:
        ValueError: naming the file and the first tensor that differs, is missing or has
            no recorded digest.
    """
    missing = sorted(set(digests) - set(tensors))
    if missing:
        raise ValueError(f"{path}: expected tensor {missing[0]!r} (recorded in the header), "
                         "got a file without it.")
    for key, t in tensors.items():
        if key not in digests:
            raise ValueError(f"{path}: expected a checksum for every tensor, got none for "
                             f"{key!r}.")
        got = tensor_digest(t)
        if got != digests[key]:
            raise ValueError(f"{path}: expected tensor {key!r} to have the checksum recorded "
                             f"when it was written (sha256 {digests[key][:16]}…), got "
                             f"{got[:16]}…: the file is corrupted.")


def _as_path(path: PathLike, what: str) -> Path:
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{what}: expected a str or os.PathLike, got {type(path).__name__}.")
    p = Path(path)
    if str(path) == "":
        raise ValueError(f"{what}: expected a file name, got ''.")
    return p


def writable_path(path: PathLike, what: str = "path") -> Path:
    """``path`` as a ``Path``: a file (new or to be replaced) in an existing directory.

    Raises:
        ValueError: a path that is not a str or ``os.PathLike``, names a directory, or lies
            in a directory that does not exist.
    """
    p = _as_path(path, what)
    if p.is_dir():
        raise ValueError(f"{what}: expected a file name, got the directory {str(p)!r}.")
    parent = p.parent
    if not parent.is_dir():
        raise ValueError(f"{what}: expected a file in an existing directory, got {str(p)!r} "
                         f"(no directory {str(parent)!r}; create it first).")
    return p


def readable_file(path: PathLike, what: str = "path") -> Path:
    """``path`` as a ``Path`` to an existing file.

    Raises:
        ValueError: a path that is not a str or ``os.PathLike``, does not exist, or is not
            a file.
    """
    p = _as_path(path, what)
    if not p.exists():
        raise ValueError(f"{what}: expected an existing file, got {str(p)!r} (no such file).")
    if not p.is_file():
        raise ValueError(f"{what}: expected a file, got {str(p)!r} (not a regular file).")
    return p


def _fsync_directory(directory: Path) -> None:
    """Flush a directory entry (the rename) to disk, where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, what: str = "path") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, flush it to disk and
    rename it onto ``path``.

    The temporary file lives in ``path``'s directory (so the rename is atomic on POSIX), is
    created with the usual permissions (``0o666`` less the umask), and is removed when the
    block raises (``KeyboardInterrupt`` included) or the flush or rename fails; the old
    ``path``, if any, is then left as it was.

    Raises:
        ValueError: from :func:`writable_path`, before the block runs.
    """
    target = writable_path(path, what)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(target.parent)
