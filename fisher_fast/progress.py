"""Progress bars for fisher_fast's long calls, off unless asked for.

``with fisher_fast.show_progress():`` (or ``show_progress(True)`` once) makes every call
that runs the chunk loop — the estimators, ``FisherAccumulator.update``,
``per_sample_gradients``, contributions, interference, conflicts — draw a tqdm bar over its
units on stderr (``leave=False``: it is gone when the call returns). The setting is the
process's, restored when the ``with`` block ends; nothing is drawn by default, so library
calls stay quiet in scripts and logs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tqdm import tqdm

_ENABLED = [False]


@contextlib.contextmanager
def _restoring(previous: bool) -> Iterator[None]:
    try:
        yield
    finally:
        _ENABLED[0] = previous


def show_progress(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Turn the bars on (or off); as a context manager, only inside the ``with`` block.

    Raises:
        ValueError: ``enabled`` is not a bool.
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"show_progress: expected True or False, got {enabled!r}.")
    previous, _ENABLED[0] = _ENABLED[0], enabled
    return _restoring(previous)


def progress_enabled() -> bool:
    """Whether fisher_fast's calls draw bars now."""
    return _ENABLED[0]


def unit_bar(total: int, desc: str = "fisher_fast") -> tqdm:
    """A bar over ``total`` units on stderr, disabled unless ``show_progress`` is on."""
    return tqdm(total=total, desc=desc, unit="unit", file=sys.stderr, leave=False,
                disable=not _ENABLED[0], dynamic_ncols=True)
