"""SIGINT and SIGTERM as an exception (so that a run cleans up after itself), held back while
a store commits.

:func:`signals_interrupt` makes both signals raise :class:`Interrupted` in the main thread,
wherever it is. Inside :func:`deferred` a signal is only noted, and raised when the block
ends: a ContributionStore's transaction that an exception reaches after its manifest was
renamed into place (its commit point) would roll back in memory and remove the shards the
committed manifest names, so the filing of a chunk, and the opening of a store, run deferred.
A SIGKILL cannot be held back, and needs not be: no rollback runs then, and the files on
disk are the last committed state.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_state = {"depth": 0, "pending": None}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a run (``main`` exits with 128 + the signal's number)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` (outside :func:`deferred` blocks)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        if _state["depth"]:
            _state["pending"] = signum
            return
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state["pending"] = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then raise :class:`Interrupted`
    (unless the block raised: its exception propagates).
    """
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    if _state["depth"] == 0 and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        raise Interrupted(signum)
