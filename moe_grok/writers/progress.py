"""Progress of a long loop (training steps, checkpoints, extraction batches, protocol arms): a tqdm bar
on a terminal (or in a notebook), plain lines in a log file.

A bar redraws itself with carriage returns, which fill a batch job's log with one line per refresh.
When the stream is not a terminal, `progress` writes a line instead at every tenth of the total and
at least every 30 s, and one when the loop ends:

  2026-12-07 10:50:48 train 1 seed: 300/3000 step (10%), 12.3 step/s, elapsed 0:00:24, ETA 0:03:39, test_acc=0.05

The lines go straight to the stream (stderr by default, where tqdm draws its bar), not through
`logging`: launchers quiet absl's INFO messages (orbax logs every checkpoint read at INFO) and progress
must stay visible; library code changes no logging setting. `enabled=False` silences both forms.
"""
from __future__ import annotations

import datetime
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

LINE_MARKS = 10  # a line at every tenth of the total
LINE_INTERVAL_S = 30.0  # and at least this often

T = TypeVar("T")


def is_interactive(stream: TextIO) -> bool:
    """Whether `stream` shows a redrawn bar: a terminal, or a Jupyter kernel's output (a widget)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or type(stream).__module__.startswith("ipykernel")


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class ProgressLines:
    """A progress bar's counterpart for logs: plain lines (done/total, rate, elapsed, ETA, postfix) on
    `stream`. Same use as a tqdm bar: `update(n)`, `n`, `set_postfix(mapping)`, `close()`; thread-safe.

    Lines at every 1/`marks` of `total` (None: only by time) and every `interval_s` seconds; `close`
    writes the last state unless that line was the last written, and unless `transient` and nothing was
    written (a short inner loop stays silent); the line of the last item is left to `close`, which
    shows the final postfix. The rate and ETA count this loop's progress past `initial` only (a resumed
    run's earlier steps took no time here), and after the first line only what came after it (the
    first items carry the start-up: compilation, the first checkpoint load).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, stream: TextIO | None = None,
                 marks: int | None = LINE_MARKS, interval_s: float = LINE_INTERVAL_S, transient: bool = False,
                 clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._initial, self._stream, self._clock = initial, stream or sys.stderr, clock
        self._marks, self._interval_s, self._transient = marks, interval_s, transient
        self._started = self._last_time = clock()
        self._postfix: dict[str, Any] = {}
        self._last_line: tuple | None = None  # (n, postfix) of the last line written
        self._rate_since: tuple[float, int] | None = None  # (time, n) of the first line: the rate's start
        self._closed = False
        self._lock = threading.Lock()

    def _mark(self, n: int) -> int:
        """How many of the marks (tenths) of the total `n` has passed (0 without marks)."""
        return n * self._marks // self.total if self.total and self._marks else 0

    def update(self, n: int = 1) -> None:
        with self._lock:
            before, self.n = self.n, self.n + n
            now = self._clock()
            due = self._mark(self.n) > self._mark(before) or now - self._last_time >= self._interval_s
            if due and (self.total is None or self.n < self.total):
                self._write(now)

    def set_postfix(self, values: Mapping[str, Any] | None = None, **kwargs) -> None:
        """Values shown at the end of the next lines (as tqdm's set_postfix)."""
        with self._lock:
            self._postfix = {**(values or {}), **kwargs}

    def line(self, now: float | None = None) -> str:
        """The progress line of the current state (without the time stamp and newline)."""
        now = self._clock() if now is None else now
        elapsed = now - self._started
        since, done = self._rate_since or (self._started, self._initial)
        if self._rate_since is not None and self.n == done:  # nothing new since the first line
            since, done = self._started, self._initial
        rate = (self.n - done) / (now - since) if now > since else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if rate >= 1:
            parts.append(f"{rate:.3g} {self.unit}/s")
        elif rate > 0:
            parts.append(f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.total is not None and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}" if rate > 0 else "ETA ?")
        if self._postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in self._postfix.items()))
        return ", ".join(parts)

    def _write(self, now: float) -> None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        self._stream.write(f"{stamp} {self.line(now)}\n")
        self._stream.flush()
        self._last_time, self._last_line = now, (self.n, dict(self._postfix))
        if self._rate_since is None:
            self._rate_since = (now, self.n)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._last_line == (self.n, self._postfix) or (self._transient and self._last_line is None):
                return
            self._write(self._clock())

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent:
    """progress(..., enabled=False): counts, shows nothing."""

    def __init__(self, initial: int = 0):
        self.n = initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, values: Mapping[str, Any] | None = None, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: int | None = None, *, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
             transient: bool = False, stream: TextIO | None = None):
    """A progress display of a loop of `total` items (None: unknown) that starts at `initial`: a tqdm bar
    when `stream` (default sys.stderr) is interactive, else ProgressLines; nothing when not `enabled`.
    transient: an inner loop: its bar disappears when done, and its lines come only by time (every
    LINE_INTERVAL_S), not at every tenth. Use: `update(n)`, `n`, `set_postfix(mapping)`, `close()`."""
    if not enabled:
        return _Silent(initial)
    stream = sys.stderr if stream is None else stream
    if is_interactive(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=not transient, file=stream)
    return ProgressLines(total, desc, unit, initial, stream, marks=None if transient else LINE_MARKS,
                         transient=transient)


def track(iterable: Iterable[T], total: int | None = None, **kwargs) -> Iterator[T]:
    """Iterate over `iterable`, counting an item as done when the loop body has finished with it;
    `progress`'s keywords. total: default len(iterable) where it has one."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    display = progress(total, **kwargs)
    try:
        for item in iterable:
            yield item
            display.update(1)
    finally:
        display.close()
