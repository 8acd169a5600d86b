"""The on-disk record of a ``ContributionStore``: shard files, a manifest, checksums.

A store directory holds safetensors shards (``shard-<hex>.safetensors``) and one
``manifest.json`` that names, for the last committed state, every task's schema, every record
on disk (task, sample id, insertion number, shard) and every shard's size and SHA-256. Only
the manifest makes a shard part of the store: a shard written by an add that never committed
(a crash, a kill -9 between the shard and the manifest) is not listed and is removed when the
store is next opened for writing.

Crash safety comes from the order of the writes: a shard is written to a temporary name,
flushed to disk and renamed (``file_integrity.atomic_write``); then the manifest is written
the same way (``os.replace`` is atomic on POSIX); only then are the shards the new manifest no
longer lists removed. Whenever the process dies, the manifest on disk names shards that are
complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

from ..file_integrity import atomic_write, tensor_digest

MANIFEST = "manifest.json"
FORMAT = "fisher_fast.contribution_store/1"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"


def new_shard_name() -> str:
    """A fresh shard file name."""
    return f"{SHARD_PREFIX}{uuid.uuid4().hex}{SHARD_SUFFIX}"


def is_shard_name(name: str) -> bool:
    """Whether a file name is one a store gives its shards."""
    return name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)


def is_temporary_name(name: str) -> bool:
    """Whether a file name is one ``file_integrity.atomic_write`` gives a shard or the
    manifest before its rename (``.shard-<hex>.safetensors.<pid>.<hex>.tmp``).
    """
    return name.endswith(".tmp") and (name.startswith("." + SHARD_PREFIX)
                                      or name.startswith("." + MANIFEST))


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_id(sample_id) -> list:
    """A sample id as JSON: ``["i", 3]``, ``["s", "a_1"]`` or ``["t", [...]]`` for a tuple
    (token units are ``(sample_id, position)``); anything else is a ``ValueError``.
    """
    if isinstance(sample_id, bool):
        raise ValueError(f"sample id: expected an int, a str or a tuple of them for a store on "
                         f"disk, got {sample_id!r}.")
    if isinstance(sample_id, int):
        return ["i", sample_id]
    if isinstance(sample_id, str):
        return ["s", sample_id]
    if isinstance(sample_id, tuple):
        return ["t", [encode_id(x) for x in sample_id]]
    raise ValueError(f"sample id: expected an int, a str or a tuple of them for a store on disk, "
                     f"got {sample_id!r} ({type(sample_id).__name__}).")


def decode_id(encoded: list):
    """The inverse of ``encode_id``."""
    tag, value = encoded
    if tag == "i":
        return int(value)
    if tag == "s":
        return str(value)
    return tuple(decode_id(x) for x in value)


def write_manifest(directory: str, text: str) -> None:
    """Write ``text`` (the manifest's JSON) as the directory's ``manifest.json``, atomically."""
    with atomic_write(os.path.join(directory, MANIFEST)) as tmp:
        tmp.write_text(text)


def manifest_text(directory: str) -> str | None:
    """The manifest's JSON as it is on disk, or ``None`` where it cannot be read."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            return f.read()
    except OSError:
        return None


def read_manifest(directory: str) -> dict:
    """The directory's manifest, checked for format; a clear error when it is missing,
    unreadable, or of another format.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise ValueError(f"ContributionStore.open: expected a store directory with {MANIFEST}, "
                         f"got none in {directory!r}.")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"ContributionStore.open: expected a readable JSON manifest, got "
                         f"{path!r}: {e}.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"ContributionStore.open: expected a manifest of format {FORMAT!r}, got "
                         f"{got!r} in {path!r}.")
    return manifest


def verify_shard(directory: str, shard: str, want: dict, store_id: str) -> None:
    """The shard exists, has the manifest's size and SHA-256, and names this store; else a
    ``ValueError`` naming the file (and, where its header is intact, the damaged tensor).
    """
    path = os.path.join(directory, shard)
    if not os.path.exists(path):
        raise ValueError(f"ContributionStore.open: expected shard {path!r} listed in the manifest, "
                         "got no such file (missing shard).")
    size = os.path.getsize(path)
    if size != want["bytes"]:
        raise ValueError(f"ContributionStore.open: expected shard {path!r} of {want['bytes']} bytes, "
                         f"got {size} bytes (truncated or rewritten).")
    if sha256_file(path) != want["sha256"]:
        raise ValueError(f"ContributionStore.open: checksum mismatch in shard {path!r}"
                         f"{_damaged_tensor(path)}: its bytes are not those the store wrote.")
    owner = shard_store_id(path)
    if owner != store_id:
        raise ValueError(f"ContributionStore.open: expected shard {path!r} to belong to store "
                         f"{store_id}, got one written by store {owner} (a foreign shard).")


def _damaged_tensor(path: str) -> str:
    """`` (tensor 'r3.p0')`` for the first tensor whose checksum in the shard's metadata
    differs, where the header is still readable; else ``""``.
    """
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            sums = json.loads((f.metadata() or {}).get("sha256", "{}"))
            for key in f.keys():
                if sums.get(key) != tensor_digest(f.get_tensor(key)):
                    return f" (tensor {key!r})"
    except Exception:  # a header that does not parse: say so, not why
        return " (its header is unreadable)"
    return ""


def shard_store_id(path: str) -> str | None:
    """The id of the store that wrote a shard (its metadata), or ``None``."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("store_id")
