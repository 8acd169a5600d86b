"""A store of per-unit contributions C_u = g_u² at full shape, tiered GPU → pinned CPU → disk.

Records are keyed by (task, sample_id); each holds one tensor per parameter name. Sample ids
are opaque hashable values, compared with ``==`` and never parsed (``"a_1"`` is one id); on
disk they never appear in file names or keys.

Tiers, fastest first: ``"device"`` (tensors on ``device``, a GPU when there is one),
``"host"`` (CPU memory, pinned when CUDA is available), ``"disk"`` (safetensors shards in
``directory``). Each tier has a byte budget (payload bytes of the records it holds; ``None``
means unbounded). New records enter the fastest tier; when a tier is over budget its *oldest*
records (insertion order across tasks) move down one tier or more. Records never move up on
their own; ``promote()`` moves the newest ones up into room that deletions freed.
``transaction()`` groups several writes into one all-or-nothing step.

Writes are all-or-nothing: ``add`` validates everything, then builds the new placement
(copies and new shard files) beside the old one, and only swaps it in when every copy and
file write succeeded. A failed ``add`` (bad input, budget exhausted, I/O error) raises and
leaves the store exactly as it was, with no stray files.

A store with a directory survives its process: every committed write ends with an atomic
``manifest.json`` naming the records on disk and each shard's size and SHA-256
(``store/manifest.py``), so ``ContributionStore.open(directory)`` in another process gives
back every record that was on disk, after checking each shard (a truncated, missing, altered
or foreign shard is a ``ValueError`` naming the file). Records in the device and host tiers
live in memory: ``flush()`` (or leaving a ``with`` block, or ``close()``) writes them to the
disk tier first. ``open(directory, read_only=True)`` gives a store that refuses every write.
A kill -9 at any moment leaves the last committed state readable.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import uuid
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, replace

import torch

from ..batching.checks import all_finite
from ..file_integrity import atomic_write, tensor_digest
from . import manifest as mf

TIERS = ("device", "host", "disk")


@dataclass(frozen=True)
class _Record:
    seq: int                      # global insertion number (oldest first), also the disk key
    tier: str
    nbytes: int
    tensors: tuple | None         # in-memory tensors in schema order (device / host tiers)
    shard: str | None             # file name of the shard holding it (disk tier)


class ContributionStore:
    """Per-unit contributions keyed by (task, sample_id), spilling oldest-first across tiers.

    Args:
        directory: folder for the disk tier's safetensors shards; ``None`` disables the tier.
        device_bytes, host_bytes, disk_bytes: byte budgets per tier (``None``: unbounded).
        device: where the fastest tier lives (default: ``"cuda"`` when available, else CPU).
        pin_memory: pin host-tier tensors (default: whether CUDA is available).
    """

    def __init__(self, directory: str | os.PathLike | None = None, *,
                 device_bytes: int | None = None, host_bytes: int | None = None,
                 disk_bytes: int | None = None, device: str | torch.device | None = None,
                 pin_memory: bool | None = None) -> None:
        self._setup(directory, device_bytes, host_bytes, disk_bytes, device, pin_memory)
        if self.directory is not None:
            if os.path.exists(os.path.join(self.directory, mf.MANIFEST)):
                self._release()
                raise ValueError(f"directory: expected a folder without a store, got "
                                 f"{self.directory!r}, which holds one (reopen it with "
                                 "ContributionStore.open(directory)).")
            self._write_manifest()

    @classmethod
    def open(cls, directory: str | os.PathLike, *, read_only: bool = False,
             device_bytes: int | None = None, host_bytes: int | None = None,
             disk_bytes: int | None = None, device: str | torch.device | None = None,
             pin_memory: bool | None = None) -> ContributionStore:
        """The store saved in ``directory`` (by this or another process), every record on its
        disk tier, each shard checked against the manifest's size and SHA-256 first.

        Args:
            directory: the folder the store was created in.
            read_only: refuse every write (``add``, ``delete``, ``promote``, ``flush``); such
                a store takes no lock, so several processes may read one directory.
            device_bytes: as for the constructor (budgets are the opener's, not saved).
            host_bytes: as for the constructor.
            disk_bytes: as for the constructor.
            device: as for the constructor.
            pin_memory: as for the constructor.

        Raises:
            ValueError: no manifest, a manifest of another format, a missing, truncated,
                altered or foreign shard (naming the file), or the directory held by
                another writer.
        """
        store = cls.__new__(cls)
        store._setup(directory, device_bytes, host_bytes, disk_bytes, device, pin_memory,
                     read_only=read_only, exists=True)
        try:
            store._load(mf.read_manifest(store.directory))
        except BaseException:
            store._release()
            raise
        return store

    def _setup(self, directory, device_bytes, host_bytes, disk_bytes, device, pin_memory, *,
               read_only=False, exists=False):
        for name, b in (("device_bytes", device_bytes), ("host_bytes", host_bytes),
                        ("disk_bytes", disk_bytes)):
            if b is not None and (not isinstance(b, int) or b < 0):
                raise ValueError(f"{name}: expected None or an int >= 0, got {b!r}.")
        self.device = torch.device(device if device is not None
                                   else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.directory = None if directory is None else os.fspath(directory)
        self.read_only = bool(read_only)
        self._lock = None
        self._store_id = uuid.uuid4().hex
        if self.directory is not None:
            if exists and not os.path.isdir(self.directory):
                raise ValueError(f"ContributionStore.open: expected a store directory, got "
                                 f"{self.directory!r}, which is not a folder.")
            os.makedirs(self.directory, exist_ok=True)
            if not self.read_only:
                self._take_lock()
        self.budgets = {"device": device_bytes, "host": host_bytes,
                        "disk": disk_bytes if self.directory is not None else 0}
        self._records: OrderedDict[tuple, _Record] = OrderedDict()   # (task, id) -> record
        self._schemas: dict = {}      # task -> tuple of (name, shape, dtype)
        self._shard_refs: dict[str, int] = {}
        self._shard_sums: dict[str, dict] = {}  # shard -> {"bytes", "sha256"} for the manifest
        self._seq = itertools.count()
        self._open = 0                # depth of open transactions
        self._doomed: list[str] = []  # shard files to remove when the transaction commits

    # ---------------------------------------------------------------- queries
    def tasks(self) -> list[Hashable]:
        """Tasks with at least one record, in order of first insertion."""
        return list(dict.fromkeys(t for t, _ in self._records))

    def ids(self, task: Hashable) -> list[Hashable]:
        """The sample ids of ``task``, in insertion order."""
        return [s for t, s in self._records if t == task]

    def contains(self, task: Hashable, sample_id: Hashable) -> bool:
        """Whether ``(task, sample_id)`` has a record."""
        return (task, sample_id) in self._records

    def __contains__(self, key: tuple) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def tier_of(self, task: Hashable, sample_id: Hashable) -> str:
        """Which tier holds the record: "device", "host" or "disk"."""
        return self._get_record(task, sample_id).tier

    def usage(self) -> dict[str, int]:
        """Payload bytes held per tier."""
        out = dict.fromkeys(TIERS, 0)
        for r in self._records.values():
            out[r.tier] += r.nbytes
        return out

    def parameter_names(self, task: Hashable) -> list[str]:
        """The parameter names of ``task``'s records, in schema order."""
        return [n for n, _, _ in self._schema(task)]

    def get(self, task: Hashable, sample_id: Hashable,
            device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """``{parameter name: C_u}`` of one record, on ``device`` (default: the store's)."""
        return {n: t[0] for n, t in self.get_stacked(task, [sample_id], device).items()}

    def get_stacked(self, task: Hashable, ids: Iterable[Hashable],
                    device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """``{parameter name: Tensor[N, *shape]}`` for ``ids`` (in that order)."""
        from safetensors import safe_open

        ids = list(ids)
        dev = self.device if device is None else torch.device(device)
        schema = self._schema(task)
        recs = [self._get_record(task, s) for s in ids]
        out = {n: torch.empty((len(ids), *shape), dtype=dt, device=dev) for n, shape, dt in schema}
        by_shard: dict[str, list[tuple[int, _Record]]] = {}
        for row, r in enumerate(recs):
            if r.tier == "disk":
                by_shard.setdefault(r.shard, []).append((row, r))
            else:
                for (n, _, _), t in zip(schema, r.tensors, strict=True):
                    out[n][row].copy_(t, non_blocking=False)
        for shard, rows in by_shard.items():
            with safe_open(os.path.join(self.directory, shard), framework="pt") as f:
                for row, r in rows:
                    for j, (n, _, _) in enumerate(schema):
                        out[n][row].copy_(f.get_tensor(_key(r.seq, j)))
        return out

    # ---------------------------------------------------------------- writes
    @contextlib.contextmanager
    def transaction(self) -> Iterator[ContributionStore]:
        """Everything inside happens, or nothing: on an exception the store returns to its
        state at entry (records, their tiers and contents, schemas), the shard files written
        inside are removed, and the exception propagates. Shard files emptied by a
        ``delete`` inside are removed only when the transaction commits. Nested
        transactions join the outermost one.

        ``per_sample_contributions(..., store=)`` files a batch chunk by chunk inside one,
        so that a chunk that fails takes the chunks before it back out.
        """
        self._writable("transaction")
        if self._open:
            self._open += 1
            try:
                yield self
            finally:
                self._open -= 1
            return
        saved = (OrderedDict(self._records), dict(self._schemas), dict(self._shard_refs),
                 dict(self._shard_sums))
        self._open, self._doomed = 1, []
        try:
            try:
                yield self
                self._write_manifest()  # the commit point
            except BaseException:
                if self._manifest_is_current():  # the manifest's rename happened: committed
                    self._remove_doomed()
                    raise
                # shards written inside: still referenced, or already emptied again (doomed)
                current = set(self._shard_refs) | {os.path.basename(p) for p in self._doomed}
                written = current - set(saved[2])
                self._records, self._schemas, self._shard_refs, self._shard_sums = saved
                for shard in written:
                    path = os.path.join(self.directory, shard)
                    if os.path.exists(path):
                        os.remove(path)
                raise
            self._remove_doomed()
        finally:
            self._open, self._doomed = 0, []

    def _remove_doomed(self) -> None:
        """Remove the shards the committed manifest no longer names."""
        for path in self._doomed:
            self._shard_sums.pop(os.path.basename(path), None)
            if os.path.exists(path):
                os.remove(path)

    def add(self, task: Hashable, sample_ids: Iterable[Hashable],
            tensors: dict[str, torch.Tensor]) -> None:
        """Add one record per id: ``tensors[name][u]`` is C_u of parameter ``name``.

        Raises:
            ValueError: duplicate or already stored ids, inconsistent shapes, a schema that
                differs from the task's earlier records, or no tier with room. The store is
                then unchanged (as for any other exception during the write).
        """
        with self.transaction():
            self._add(task, list(sample_ids), tensors)

    def _add(self, task, ids: list, tensors: dict) -> None:
        schema = self._validate(task, ids, tensors)
        seqs = [next(self._seq) for _ in ids]
        per_rec = sum(_numel(shape) * _itemsize(dt) for _, shape, dt in schema)
        new = OrderedDict(self._records)
        for s, sid in zip(seqs, ids, strict=True):
            new[(task, sid)] = _Record(seq=s, tier="new", nbytes=per_rec, tensors=None, shard=None)
        placement = self._place(new)
        staged = self._materialise(new, placement, schema, task, ids, tensors)
        # commit: pure bookkeeping, cannot fail half-way
        self._records = staged
        self._schemas.setdefault(task, schema)
        for r in staged.values():
            if r.tier == "disk" and r.shard not in self._shard_refs:
                self._shard_refs[r.shard] = 0
        self._recount_shards()

    def delete(self, task: Hashable, sample_ids: Iterable[Hashable] | None = None) -> None:
        """Delete the given ids of ``task`` (all of the task's records when ``None``)."""
        self._writable("delete")
        ids = self.ids(task) if sample_ids is None else list(sample_ids)
        if len(set(ids)) != len(ids):
            twice = sorted({str(s) for s in ids if ids.count(s) > 1})
            raise ValueError(f"sample_ids: expected distinct ids to delete, got {twice} more "
                             f"than once.")
        for s in ids:
            self._get_record(task, s)
        with self.transaction():
            for s in ids:
                del self._records[(task, s)]
            if not self.ids(task):
                self._schemas.pop(task, None)
            self._recount_shards()

    def promote(self) -> int:
        """Move records up into room that deletions freed: newest first, each to the fastest
        tier above its own that has room (never down, never over a budget). Records do not
        move up on their own; this is the one way up. All or nothing (a failed read leaves
        the store as it was); a shard emptied by the moves is removed. Returns how many
        records moved.
        """
        from safetensors import safe_open

        self._writable("promote")
        usage, moves = self.usage(), {}
        for key in reversed(self._records):
            r = self._records[key]
            for tier in TIERS[:TIERS.index(r.tier)]:
                budget = self.budgets[tier]
                if budget is None or usage[tier] + r.nbytes <= budget:
                    usage[tier] += r.nbytes
                    usage[r.tier] -= r.nbytes
                    moves[key] = tier
                    break
        if not moves:
            return 0
        with self.transaction():
            new = OrderedDict(self._records)
            by_shard: dict[str, list] = {}
            for key, tier in moves.items():
                r = new[key]
                if r.tier == "disk":
                    by_shard.setdefault(r.shard, []).append(key)
                else:
                    new[key] = replace(r, tier=tier,
                                       tensors=tuple(self._to_tier(t, tier) for t in r.tensors))
            for shard, keys in by_shard.items():
                with safe_open(os.path.join(self.directory, shard), framework="pt") as f:
                    for key in keys:
                        r, n = new[key], len(self._schemas[key[0]])
                        src = tuple(f.get_tensor(_key(r.seq, j)) for j in range(n))
                        new[key] = replace(r, tier=moves[key], shard=None,
                                           tensors=tuple(self._to_tier(t, moves[key]) for t in src))
            self._records = new
            self._recount_shards()
        return len(moves)

    def flush(self) -> int:
        """Move every record held in memory (device and host tiers) to the disk tier, so
        that ``open(directory)`` in another process gives back all of them; all or nothing.
        Returns how many records moved. A store without a directory cannot flush.

        Raises:
            ValueError: no directory, a read-only store, or a disk budget too small.
        """
        self._writable("flush")
        if self.directory is None:
            raise ValueError("flush: expected a store with a directory, got directory=None.")
        moving = [k for k, r in self._records.items() if r.tier != "disk"]
        if not moving:
            return 0
        with self.transaction():
            need = sum(self._records[k].nbytes for k in moving) + self.usage()["disk"]
            budget = self.budgets["disk"]
            if budget is not None and need > budget:
                raise ValueError(f"flush: expected the records to fit the disk budget of "
                                 f"{budget} bytes, got {need} bytes.")
            by_task: dict = {}
            for k in moving:
                by_task.setdefault(k[0], []).append(k)
            records = OrderedDict(self._records)
            for task, keys in by_task.items():
                schema = self._schemas[task]
                part = OrderedDict((k, records[k]) for k in keys)
                staged = self._materialise(part, {k: "disk" for k in keys}, schema, task, [], {})
                records.update(staged)
            self._records = records
            self._recount_shards()
        return len(moving)

    def close(self) -> None:
        """Write the records held in memory to disk (``flush``, for a writable store with a
        directory), then release the directory's writer lock. The store stays readable in
        this process.
        """
        try:
            if self.directory is not None and not self.read_only and self._lock is not None:
                self.flush()
        finally:
            self._release()

    def _release(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.close()

    def __enter__(self) -> ContributionStore:
        return self

    def __exit__(self, *exc) -> bool:
        if exc[0] is None:
            self.close()
        else:  # what was committed stays on disk; the memory tiers are not written
            self._release()
        return False

    def __del__(self):
        self._release()

    # ---------------------------------------------------------------- internals
    def _writable(self, what: str) -> None:
        if self.read_only:
            raise ValueError(f"{what}: expected a writable store, got one opened read-only "
                             f"({self.directory!r}).")

    def _take_lock(self) -> None:
        """One writer per directory: an exclusive, non-blocking lock on ``.lock`` (released
        with ``close()``, or by the OS when the process dies).
        """
        import fcntl

        lock = open(os.path.join(self.directory, ".lock"), "a")  # held open
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise ValueError(f"directory: expected a store directory no other writer holds, "
                             f"got {self.directory!r}, locked by another store (close it, or "
                             "open this one with read_only=True).") from None
        self._lock = lock

    def _manifest_text(self) -> str | None:
        """The JSON of the state to commit (``None`` for a store without a directory)."""
        if self.directory is None:
            return None
        disk = [(k, r) for k, r in self._records.items() if r.tier == "disk"]
        sums = {sh: self._shard_sums[sh] for sh in sorted({r.shard for _, r in disk})}
        return json.dumps({
            "format": mf.FORMAT, "store_id": self._store_id, "next_seq": self._next_seq(),
            "schemas": [[mf.encode_id(t), [[n, list(shape), str(dt).replace("torch.", "")]
                                           for n, shape, dt in schema]]
                        for t, schema in self._schemas.items()],
            "records": [[mf.encode_id(t), mf.encode_id(sid), r.seq, r.nbytes, r.shard]
                        for (t, sid), r in disk],
            "shards": sums,
        }, separators=(",", ":"))

    def _write_manifest(self) -> None:
        """The committed state, on disk: schemas, the disk tier's records, shard checksums."""
        text = self._manifest_text()
        if text is not None:
            mf.write_manifest(self.directory, text)

    def _manifest_is_current(self) -> bool:
        """Whether the manifest on disk already is the state in memory (an exception that
        arrived after the manifest's rename must not roll the commit back).
        """
        text = self._manifest_text()
        return text is not None and mf.manifest_text(self.directory) == text

    def _next_seq(self) -> int:
        nxt = next(self._seq)
        self._seq = itertools.count(nxt)
        return nxt

    def _load(self, manifest: dict) -> None:
        """Records, schemas and shards from a manifest, every shard verified; then the
        shards of this store that no committed state names (a crashed write) are removed.
        """
        self._store_id = manifest["store_id"]
        for shard, want in manifest["shards"].items():
            mf.verify_shard(self.directory, shard, want, self._store_id)
        self._shard_sums = dict(manifest["shards"])
        self._schemas = {mf.decode_id(t): tuple((n, tuple(shape), getattr(torch, dt))
                                                for n, shape, dt in schema)
                         for t, schema in manifest["schemas"]}
        self._records = OrderedDict(
            ((mf.decode_id(t), mf.decode_id(sid)),
             _Record(seq=seq, tier="disk", nbytes=nbytes, tensors=None, shard=shard))
            for t, sid, seq, nbytes, shard in manifest["records"])
        self._seq = itertools.count(int(manifest["next_seq"]))
        self._recount_shards()
        self._doomed = []
        if not self.read_only:
            for name in os.listdir(self.directory):
                path = os.path.join(self.directory, name)
                if mf.is_shard_name(name) and name not in self._shard_sums \
                        and self._is_own(path):
                    os.remove(path)
                elif mf.is_temporary_name(name):  # a write killed before its rename
                    os.remove(path)

    def _is_own(self, path: str) -> bool:
        try:
            return mf.shard_store_id(path) == self._store_id
        except Exception:  # unreadable: not provably ours (a crashed write leaves a .tmp)
            return False

    def _schema(self, task):
        if task not in self._schemas:
            raise ValueError(f"Unknown task: expected one of {self.tasks()}, got {task!r}.")
        return self._schemas[task]

    def _get_record(self, task, sample_id) -> _Record:
        try:
            return self._records[(task, sample_id)]
        except KeyError:
            raise ValueError(f"Unknown sample id for task {task!r}: expected one of the stored "
                             f"ids, got {sample_id!r}.") from None
        except TypeError:
            raise ValueError(f"Sample ids must be hashable, got {type(sample_id).__name__}.") from None

    def _validate(self, task, ids, tensors):
        if not isinstance(tensors, dict) or not tensors:
            raise ValueError("tensors: expected a non-empty dict of parameter name -> Tensor[N, ...], "
                             f"got {type(tensors).__name__}.")
        if self.directory is not None:  # ids and tasks must survive a round trip through JSON
            for s in [task, *ids]:
                mf.encode_id(s)
        seen = set()
        for s in ids:
            try:
                hash(s)
            except TypeError:
                raise ValueError(f"Sample ids must be hashable, got {type(s).__name__}.") from None
            if s in seen:
                raise ValueError(f"Duplicate sample id: expected unique ids, got {s!r} twice.")
            seen.add(s)
            if (task, s) in self._records:
                raise ValueError(f"Duplicate sample id: task {task!r} already holds {s!r}.")
        for n, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != len(ids):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"tensors[{n!r}]: expected shape ({len(ids)}, ...), got {got}.")
            if t.is_floating_point() and not all_finite([t]):
                row = int((~torch.isfinite(t.reshape(len(ids), -1))).any(dim=1).nonzero()[0])
                raise ValueError(f"tensors[{n!r}]: expected finite contributions, got a "
                                 f"non-finite value for id {ids[row]!r}.")
        schema = tuple((n, tuple(t.shape[1:]), t.dtype) for n, t in tensors.items())
        old = self._schemas.get(task)
        if old is not None and set(old) != set(schema):
            describe = lambda sch: sorted((n, s, str(d).replace("torch.", "")) for n, s, d in sch)  # noqa: E731
            raise ValueError(f"Task {task!r}: expected the parameters, shapes and dtypes of its "
                             f"earlier records {describe(old)}, got {describe(schema)}.")
        return old if old is not None else schema  # the task's order, whatever the dict's

    def _place(self, records: OrderedDict) -> dict[tuple, str]:
        """Newest first, each record takes the fastest tier at or below its own with room."""
        used = dict.fromkeys(TIERS, 0)
        out = {}
        for key in reversed(records):
            r = records[key]
            start = 0 if r.tier == "new" else TIERS.index(r.tier)
            for tier in TIERS[start:]:
                budget = self.budgets[tier]
                if budget is None or used[tier] + r.nbytes <= budget:
                    used[tier] += r.nbytes
                    out[key] = tier
                    break
            else:
                raise ValueError(
                    f"ContributionStore full: expected the records to fit the budgets "
                    f"{self.budgets} (bytes), got {sum(x.nbytes for x in records.values())} bytes "
                    f"in all{'' if self.directory else ' (no directory: the disk tier is off)'}."
                )
        return out

    def _materialise(self, records, placement, schema, task, ids, tensors) -> OrderedDict:
        """The new record table; on any error, remove the shard files it wrote and re-raise."""
        new_rows = {sid: u for u, sid in enumerate(ids)}
        staged: OrderedDict = OrderedDict()
        to_disk: dict[str, torch.Tensor] = {}
        disk_keys = []
        shard = None
        try:
            for key, r in records.items():
                tier = placement[key]
                if r.tier == tier:
                    staged[key] = r
                    continue
                if r.tier == "new":
                    src = tuple(tensors[n][new_rows[key[1]]] for n, _, _ in schema)
                else:
                    src = r.tensors
                if tier == "disk":
                    shard = shard or mf.new_shard_name()
                    for j, t in enumerate(src):
                        to_disk[_key(r.seq, j)] = t.detach().to("cpu").contiguous()
                    disk_keys.append(key)
                    staged[key] = replace(r, tier="disk", tensors=None, shard=shard)
                else:
                    staged[key] = replace(r, tier=tier, tensors=tuple(self._to_tier(t, tier) for t in src))
            if to_disk:
                self._write_shard(shard, to_disk)
        except BaseException:
            if shard is not None and os.path.exists(os.path.join(self.directory, shard)):
                os.remove(os.path.join(self.directory, shard))
            raise
        return staged

    def _write_shard(self, shard: str, tensors: dict) -> None:
        """Write a shard under a temporary name, flush it, rename it; its metadata names
        this store and each tensor's SHA-256, and the manifest-to-be its size and SHA-256.
        """
        from safetensors.torch import save

        meta = {"store_id": self._store_id,
                "sha256": json.dumps({k: tensor_digest(t) for k, t in tensors.items()})}
        data = save(tensors, metadata=meta)
        with atomic_write(os.path.join(self.directory, shard)) as tmp:
            tmp.write_bytes(data)
        self._shard_sums = {**self._shard_sums,
                            shard: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}

    def _to_tier(self, t: torch.Tensor, tier: str) -> torch.Tensor:
        if tier == "device":
            return t.detach().to(self.device, copy=True)
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin_memory)
        out.copy_(t.detach())
        return out

    def _recount_shards(self) -> None:
        refs = dict.fromkeys(self._shard_refs, 0)
        for r in self._records.values():
            if r.tier == "disk":
                refs[r.shard] = refs.get(r.shard, 0) + 1
        for shard, n in refs.items():
            if n == 0:  # removed when the transaction commits (the manifest no longer names it)
                self._doomed.append(os.path.join(self.directory, shard))
        self._shard_refs = {s: n for s, n in refs.items() if n > 0}


def _key(seq: int, j: int) -> str:
    return f"r{seq}.p{j}"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
