"""Progress bars for the CLI (tqdm, on stderr): one over a command's steps, one over a long step's rows.

Bars are drawn only when stderr is a terminal and ``--quiet`` is not given, so piped or
logged output stays clean; they are removed when done (``leave=False``), leaving the
command's own summary on stdout.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from tqdm import tqdm


def wanted(quiet: bool, stream: TextIO | None = None) -> bool:
    """Whether to draw bars: not ``quiet`` and ``stream`` (default: stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not quiet and callable(isatty) and bool(isatty())


class Progress:
    """A bar over a command's ``steps`` on stderr; :meth:`step` names the current one.

    Args:
        steps: how many steps the command takes.
        enabled: draw bars at all (see :func:`wanted`); a disabled Progress costs nothing.
        desc: the bar's label.
    """

    def __init__(self, steps: int, *, enabled: bool, desc: str = "fishercheck"):
        self.enabled = enabled
        self._bar = tqdm(total=steps, desc=desc, unit="step", file=sys.stderr, leave=False,
                         disable=not enabled, dynamic_ncols=True,
                         bar_format="{desc}: {n_fmt}/{total_fmt} steps [{elapsed}]{postfix}")

    @contextlib.contextmanager
    def step(self, name: str, rows: int | None = None,
             unit: str = "row") -> Iterator[Callable[[int], object]]:
        """Run one step named ``name``; with ``rows``, also a bar over them.

        Yields:
            ``advance(n)``: mark ``n`` more rows (or ``unit``) done (a no-op without ``rows``).
        """
        self._bar.set_postfix_str(name)
        inner = tqdm(total=rows, desc=f"  {name}", unit=unit, file=sys.stderr, leave=False,
                     position=1, dynamic_ncols=True, disable=not self.enabled or not rows)
        try:
            yield inner.update
        finally:
            inner.close()
            self._bar.update(1)

    def total(self, steps: int) -> None:
        """Change the number of steps (once a command knows how many it takes)."""
        self._bar.total = steps
        self._bar.refresh()

    def advance(self, name: str) -> None:
        """Mark one step done, ``name`` being the one just finished."""
        self._bar.set_postfix_str(name)
        self._bar.update(1)

    def write(self, line: str) -> None:
        """Print ``line`` on stderr without breaking the bar."""
        if self.enabled:
            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        """Remove the bar."""
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


OFF = Progress(0, enabled=False)  # for library calls: no bars, no output
