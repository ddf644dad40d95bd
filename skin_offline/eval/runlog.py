"""Resumable per-row results: a CSV written one flushed row at a time, plus the input-CSV readers.

A rerun reads back the rows already written and skips them, so an interrupted evaluation resumes
where it stopped (a line cut short by a kill is dropped and redone). The file is keyed by the input
row index and checked against the input's image + question, so a different input is refused rather
than silently mixed in.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ImageError, UsageError
from ..progress import Log, task


def read_csv(path: Path) -> list[dict[str, str]]:
    if not Path(path).is_file():
        raise UsageError(f"CSV file {path} not found; pass an existing file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def require_columns(rows: list[dict[str, str]], path: Path, *names: str) -> None:
    have = set(rows[0]) if rows else set()
    missing = [n for n in names if n not in have]
    if missing:
        raise UsageError(f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(sorted(have)) or 'none'}); "
                         f"rename the header or pass the column name option")


class ResultLog:
    """Append-only CSV of results keyed by `row`; `done` holds what earlier runs wrote."""

    def __init__(self, path: Path, fields: list[str], key_fields: tuple[str, ...]):
        self.path = Path(path)
        self.fields = ["row", *fields]
        self.key_fields = key_fields
        self.done: dict[int, dict[str, str]] = {}
        self._file = None
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a kill mid-write left half a line: drop it, it is redone
            raw = raw[: raw.rfind(b"\n") + 1]
            self.path.write_bytes(raw)
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames and list(reader.fieldnames) != self.fields:
                raise UsageError(f"{self.path} was written with other columns; use another --out folder")
            for rec in reader:
                self.done[int(rec["row"])] = rec

    def check(self, index: int, expected: dict[str, str]) -> None:
        rec = self.done.get(index)
        if rec is not None and any(rec[k] != str(expected[k]) for k in self.key_fields):
            raise UsageError(f"{self.path} row {index} belongs to another input CSV; use another --out folder")

    def write(self, index: int, record: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            self._writer = csv.DictWriter(self._file, fieldnames=self.fields)
            if new:
                self._writer.writeheader()
        rec = {"row": index, **{k: record.get(k, "") for k in self.fields[1:]}}
        self._writer.writerow(rec)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[index] = {k: str(v) for k, v in rec.items()}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def resolve_image(images: Path, name: str) -> Path | None:
    """The image file for a CSV entry: DIR/name, else DIR/basename(name); None when neither exists."""
    for p in (Path(images) / name, Path(images) / Path(name).name):
        if p.is_file():
            return p
    return None


@dataclass
class RunResult:
    records: list[dict[str, str]]  # every wanted row's record, this run's and earlier runs', in input order
    missing: list[str] = field(default_factory=list)  # images not found or unreadable (listed, not fatal)
    answered: int = 0  # rows done by this run
    seconds: float = 0.0  # wall time this run spent answering (rows overlap with `batch` > 1)


@dataclass(frozen=True)
class Done:
    """What the work did for one row: its record, or None when its image was unreadable; and how long it took."""

    row: object
    record: dict | None
    seconds: float


def one_at_a_time(pending: list, work: Callable) -> Iterator[Done]:
    """The plain source of results: `work(row, path)` per row (ImageError = unreadable image, listed and skipped).
    A batched source yields the same Done objects, a batch at a time."""
    for r, path in pending:
        t0 = time.perf_counter()
        try:
            record = work(r, path)
        except ImageError:
            record = None
        yield Done(r, record, time.perf_counter() - t0)


def batched(pending: list, work: Callable, batch: int) -> Iterator[Done]:
    """`batch` rows in flight at once, each `work` call in its own thread: calls that go through the model's engine
    (SkinVL.ask) are then decoded together, one decoder run per step for all of them. Results come back in input
    order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        return next(one_at_a_time([item], work))

    with ThreadPoolExecutor(max_workers=batch, thread_name_prefix="eval") as pool:
        yield from pool.map(one, pending)


def run_rows(rows: list, images: Path, log: ResultLog, key: Callable[[object], dict], work: Callable,
             what: str, progress: Log | None = None, batch: int = 1) -> RunResult:
    """The resumable loop shared by `eval` and `classify-eval`: skip rows already in `log`, list missing
    images, call `work(row, path) -> record` for the rest (ImageError = unreadable image, listed and skipped),
    write each record as soon as it exists. Rows carry `.index` and `.image`; `key(row)` is checked against
    what an earlier run wrote for that index. `progress` (a progress.Progress) shows a `what` task: count, rate,
    ETA."""
    result = RunResult(records=[])
    pending = []
    for r in rows:
        log.check(r.index, key(r))
        path = resolve_image(images, r.image)
        if path is None:
            result.missing.append(r.image)
        elif r.index not in log.done:
            pending.append((r, path))
    t0 = time.perf_counter()
    try:
        with task(progress, what, total=len(pending), unit=what) as bar:
            for done in (one_at_a_time(pending, work) if batch <= 1 else batched(pending, work, batch)):
                if done.record is None:  # unreadable file: listed with the missing ones, not fatal
                    result.missing.append(done.row.image)
                else:
                    log.write(done.row.index, {**done.record, "seconds": f"{done.seconds:.3f}"})
                    result.answered += 1
                bar.advance()
    finally:
        result.seconds = time.perf_counter() - t0
        log.close()
    wanted = {r.index for r in rows}
    result.records = [rec for i, rec in sorted(log.done.items()) if i in wanted]
    return result
