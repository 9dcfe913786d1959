"""Progress of long jobs: a tqdm bar on a terminal, a plain line every few seconds in a log (no carriage returns).

`progress(total, desc=..., unit=...)` returns a tqdm bar when the stream (stderr) is a terminal and a
LineProgress otherwise: CI logs, `nohup`, cluster jobs and `2> file` get one readable line every
`OVDET_PROGRESS_SECONDS` (default 5) with done/total, rate and ETA, and a last line when the job ends,
instead of thousands of redraw frames. `quiet=True` prints nothing. Both have update(n), write(msg),
close() and work as context managers. The description and written messages (which may quote file and class
names) are shown with control characters escaped (ovdet.util.display.shown): a message is one line.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from tqdm import tqdm

from ovdet.util.display import shown

__all__ = ["LineProgress", "progress"]

_INTERVAL_ENV = "OVDET_PROGRESS_SECONDS"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(_INTERVAL_ENV, "5")))
    except ValueError:
        return 5.0


class LineProgress:
    """Progress as whole lines: `desc: 120/1500 (8%) 12.3 img/s, ETA 1:52`, at most one per `interval` seconds."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
                 file: IO[str] | None = None, interval: float | None = None, unit_scale: bool = False,
                 disable: bool = False):
        self.total = total or None
        self.desc, self.unit, self.unit_scale = shown(desc), unit, unit_scale
        self.n = self.initial = initial
        self.file = file
        self.interval = _interval() if interval is None else interval
        self.disable = disable
        self.start = self._last = time.monotonic()
        self.closed = False

    def _count(self, n: float) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(n, divisor=1024)
        return f"{n:g}" if isinstance(n, float) else str(n)

    def _line(self, final: bool) -> str:
        elapsed = time.monotonic() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        done = self._count(self.n) + (f"/{self._count(self.total)}" if self.total else "")
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        speed = f"{self._count(rate) if self.unit_scale else f'{rate:.1f}'} {self.unit}/s"
        head = f"{self.desc}: " if self.desc else ""
        if final:
            return f"{head}{done}{pct} in {tqdm.format_interval(elapsed)} ({speed})"
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {tqdm.format_interval(max(0.0, (self.total - self.n) / rate))}"
        return f"{head}{done}{pct} {speed}{eta}"

    def _print(self, text: str) -> None:
        print(text, file=self.file if self.file is not None else sys.stderr, flush=True)

    def update(self, n: float = 1) -> None:
        """Count `n` more done; prints a line if `interval` seconds passed since the last one."""
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self._last >= self.interval:
            self._last = now
            self._print(self._line(final=False))

    def write(self, message: str) -> None:
        """Print a message line, also when quiet (like tqdm.write): messages are not progress."""
        self._print(shown(message))

    def close(self) -> None:
        """Print the last line (done, time, rate) once."""
        if not self.closed and not self.disable:
            self._print(self._line(final=True))
        self.closed = True

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Bar(tqdm):
    """tqdm whose write() shows control characters in the message escaped."""

    @classmethod
    def write(cls, s: str, file: IO[str] | None = None, end: str = "\n", nolock: bool = False) -> None:
        super().write(shown(s), file=file, end=end, nolock=nolock)


def progress(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0, quiet: bool = False,
             file: IO[str] | None = None, unit_scale: bool = False) -> tqdm | LineProgress:
    """A progress display for `total` items: tqdm on a terminal, LineProgress otherwise, silent if `quiet`."""
    stream = file if file is not None else sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        terminal = False
    if terminal:
        return _Bar(total=total, desc=shown(desc), unit=unit, initial=initial, disable=quiet, file=file,
                    dynamic_ncols=True, smoothing=0.05, unit_scale=unit_scale,
                    unit_divisor=1024 if unit_scale else 1000)
    return LineProgress(total, desc, unit, initial, file=file, unit_scale=unit_scale, disable=quiet)
