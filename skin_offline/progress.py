"""Progress you can watch: which stage, how far, how fast, how long to go.

A `Progress` is a log function (call it with a message) that can also open tasks:

    with Progress(Mode.AUTO) as p:                      # the CLI makes one per command (--quiet: Mode.QUIET)
        p("checkpoint: llava layout, 32 layers")        # a message line
        with p.task("decoder int4", total=32, unit="layers") as t:
            for layer in ...:
                t.advance()

On a terminal each task is a rich bar with its count, throughput, elapsed time and ETA (finished ones stay on
screen with their time). When stderr is not a terminal (a pipe, a log file) or `CI` is set, it prints plain lines
instead (no carriage returns, no escape codes): one when a task starts, one at most every `interval_s` while it
runs, and one when it ends, each with count, percent, rate and ETA. Library code takes a plain `log` callable as
before and asks `task(log, ...)` for a task, which does nothing unless `log` is a Progress, so callers that pass
`print` or a lambda see their messages only.
"""

from __future__ import annotations

import enum
import os
import sys
import time
from typing import Callable, TextIO

ENV_INTERVAL = "SKIN_OFFLINE_PROGRESS_INTERVAL"  # seconds between plain progress lines (default 10)
# set to 1: every finished task's line also says its peak resident memory (Linux: VmHWM, reset at each task's
# start through /proc/self/clear_refs), for measuring where a long command's memory goes
ENV_MEMORY = "SKIN_OFFLINE_TRACE_MEMORY"


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration, ValueError):
        return None


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


class Mode(str, enum.Enum):
    AUTO = "auto"  # a bar on a terminal, plain lines otherwise (and whenever CI is set)
    BAR = "bar"
    LINES = "lines"
    QUIET = "quiet"  # nothing: no messages, no progress (errors are still printed by the CLI)


def _resolve(mode: Mode, stream: TextIO) -> Mode:
    if mode != Mode.AUTO:
        return mode
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Mode.BAR if tty and not os.environ.get("CI") and os.environ.get("TERM") != "dumb" else Mode.LINES


def _si(x: float, unit: str) -> str:
    """1234567 B -> '1.2 MB'; 3 layers -> '3 layers'."""
    if unit != "B":
        return f"{x:.0f} {unit}".rstrip() if float(x).is_integer() else f"{x:.1f} {unit}".rstrip()
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f} {prefix}B"
    return f"{x:.0f} B"


def _rate(rate: float, unit: str) -> str:
    """'2.4 layers/s', '1.2 MB/s'; below one item a second, seconds per item ('14.2 s each': a 7B layer's
    verification), since '0.1 layers/s' says nothing."""
    if not rate:
        return ""
    if unit != "B" and rate < 1:
        return f"{1 / rate:.1f} s each"
    return f"{_si(rate, unit)}/s"


def _count(done: float, total: float | None, unit: str) -> str:
    """'12/32 layers', '1.2 GB/4.0 GB', '7 rows' (no total)."""
    if not total:
        return _si(done, unit)
    if unit == "B":
        return f"{_si(done, unit)}/{_si(total, unit)}"
    return f"{_si(done, '')}/{_si(total, unit)}"


def _duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Task:
    """One stage's progress. Use as a context manager; `advance(n)` as work is done."""

    def __init__(self, owner: "Progress | None", description: str, total: float | None, unit: str):
        self.owner, self.description, self.total, self.unit = owner, description, total, unit
        self.completed = 0.0
        self.t0 = time.perf_counter()
        self.peak_rss: int | None = None  # bytes, when ENV_MEMORY is set
        self._last_line = self.t0
        self._rich_id = None

    def __enter__(self) -> "Task":
        if self.owner is not None:
            self.owner._start(self)
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.owner is not None:
            self.owner._finish(self, ok=exc_type is None)

    def advance(self, n: float = 1) -> None:
        self.completed += n
        if self.owner is not None:
            self.owner._update(self)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def line(self, done: bool = False) -> str:
        """The plain-text status: 'decoder int4: 12/32 layers (38%), 0.8 layers/s, ETA 0:25'."""
        el = self.elapsed
        rate = self.completed / el if el > 0 else 0.0
        rate_s = _rate(rate, self.unit) or "-"
        if done:
            mem = f", peak RSS {self.peak_rss / 1e9:.2f} GB" if self.peak_rss else ""
            return f"{self.description}: {_si(self.completed, self.unit)} in {_duration(el)} ({rate_s}){mem}"
        count = _count(self.completed, self.total, self.unit)
        if not self.total:
            return f"{self.description}: {count}, {rate_s}"
        pct = 100 * self.completed / self.total
        eta = _duration((self.total - self.completed) / rate) if rate else "?"
        return f"{self.description}: {count} ({pct:.0f}%), {rate_s}, ETA {eta}"


class Progress:
    """A log callable with progress tasks; `mode` decides how (or whether) they show. Writes to stderr."""

    def __init__(self, mode: Mode = Mode.AUTO, stream: TextIO | None = None, interval_s: float | None = None):
        self.stream = stream or sys.stderr
        self.mode = _resolve(Mode(mode), self.stream)
        self.interval_s = float(os.environ.get(ENV_INTERVAL, 10.0)) if interval_s is None else interval_s
        self._rich = None
        self.trace_memory = bool(os.environ.get(ENV_MEMORY))
        self.peak_rss = 0  # the largest task peak seen (ENV_MEMORY), since resetting VmHWM hides the process's own

    # --- a log function ---
    def __call__(self, message: str) -> None:
        if self.mode == Mode.QUIET:
            return
        if self._rich is not None:
            self._rich.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def task(self, description: str, total: float | None = None, unit: str = "") -> Task:
        return Task(self, description, total, unit)

    # --- lifetime ---
    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        if self.trace_memory and self.mode != Mode.QUIET:
            self.peak_rss = max(self.peak_rss, (_status_kb("VmHWM") or 0) * 1024)
            self(f"peak RSS of the whole command: {self.peak_rss / 1e9:.2f} GB")
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    # --- task events ---
    def _bar(self):
        if self._rich is None:
            from rich.console import Console
            from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[count]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._rich.start()
        return self._rich

    def _fields(self, t: Task) -> dict:
        el = t.elapsed
        rate = t.completed / el if el > 0 and t.completed else 0.0
        return {"count": _count(t.completed, t.total, t.unit), "rate": _rate(rate, t.unit)}

    def _start(self, t: Task) -> None:
        if self.trace_memory:
            kb = _status_kb("VmHWM")
            self.peak_rss = max(self.peak_rss, (kb or 0) * 1024)
            _reset_peak()
        if self.mode == Mode.BAR:
            t._rich_id = self._bar().add_task(t.description, total=t.total, **self._fields(t))
        elif self.mode == Mode.LINES:
            self(f"{t.description}: {_count(0, t.total, t.unit)}")

    def _update(self, t: Task) -> None:
        if self.mode == Mode.BAR and t._rich_id is not None:
            self._rich.update(t._rich_id, completed=t.completed, **self._fields(t))
        elif self.mode == Mode.LINES:
            now = time.perf_counter()
            if now - t._last_line >= self.interval_s and (not t.total or t.completed < t.total):
                t._last_line = now
                self(t.line())

    def _finish(self, t: Task, ok: bool) -> None:
        if self.trace_memory:
            t.peak_rss = (_status_kb("VmHWM") or 0) * 1024
            self.peak_rss = max(self.peak_rss, t.peak_rss)
        if self.mode == Mode.BAR and t._rich_id is not None:
            self._rich.update(t._rich_id, completed=t.completed, **self._fields(t))
            self._rich.stop_task(t._rich_id)
        elif self.mode == Mode.LINES and ok:
            self(t.line(done=True))


Log = Callable[[str], None]


def task(log: Log | None, description: str, total: float | None = None, unit: str = "") -> Task:
    """A task on `log` when it is a Progress; otherwise one that counts but shows nothing."""
    if isinstance(log, Progress):
        return log.task(description, total, unit)
    return Task(None, description, total, unit)


def silent() -> Progress:
    return Progress(Mode.QUIET)
