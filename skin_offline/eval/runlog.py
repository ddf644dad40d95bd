"""Resumable per-row results: a CSV written one flushed row at a time, the loop that fills it from any source of
answered rows (this process, or Ray actors: eval/cluster.py), plus the input-CSV readers.

A rerun reads back the rows already written and skips them, so an interrupted evaluation resumes
where it stopped (a line cut short by a kill is dropped and redone). The file is keyed by the input
row index and checked against the input's image + question, so a different input is refused rather
than silently mixed in. A row that failed is written as an error row (its `error` column says why) and
is tried again by the next run; the last line written for a row is the one that counts.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ImageError, PromptError, UsageError
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
        raise UsageError(
            f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(sorted(have)) or 'none'}); "
            f"rename the header or pass the column name option"
        )


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


ERROR_FIELD = "error"  # the last column of every results CSV: why a row has no answer ("" when it has one)


@dataclass
class RunResult:
    records: list[dict[str, str]]  # every wanted row's answered record, this run's and earlier runs', in input order
    missing: list[str] = field(default_factory=list)  # images not found or unreadable (listed, not fatal)
    errors: list[dict[str, str]] = field(default_factory=list)  # error rows (written; a rerun tries them again)
    answered: int = 0  # rows done by this run (error rows included)
    seconds: float = 0.0  # wall time this run spent answering (rows overlap with `batch` > 1)


@dataclass(frozen=True)
class Done:
    """What the work did for one row: its record; or None when its image was unreadable (`error` empty) or the row
    failed (`error` says why: it becomes an error row); and how long it took."""

    row: object
    record: dict | None
    seconds: float
    error: str = ""


WorkFn = Callable[[object, object], dict]  # (row, image: a path or the file's bytes) -> record
Source = Callable[[list], Iterator[Done]]  # [(row, image path), ...] -> a Done per row, in any order


def describe(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line for the error column (our errors name the problem, never patient data)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:limit] if text else type(e).__name__


def answer_row(row, image, work: WorkFn) -> Done:
    """One row through `work`, the same on this machine and on a Ray actor. An unreadable image (ImageError) gives
    no record (listed with the missing ones); a question that cannot become a prompt (PromptError: too long for
    the context, ...) fails this row only (an error row). Anything else propagates: a local run stops on it, a
    cluster run retries the row (eval/cluster.py)."""
    t0 = time.perf_counter()
    try:
        return Done(row, work(row, image), time.perf_counter() - t0)
    except ImageError:
        return Done(row, None, time.perf_counter() - t0)
    except PromptError as e:
        return Done(row, None, time.perf_counter() - t0, error=describe(e))


def one_at_a_time(pending: list, work: WorkFn) -> Iterator[Done]:
    """The plain source of results: `work(row, path)` per row, in input order."""
    for r, path in pending:
        yield answer_row(r, path, work)


def batched(pending: list, work: WorkFn, batch: int) -> Iterator[Done]:
    """`batch` rows in flight at once, each `work` call in its own thread: calls that go through the model's engine
    (SkinVL.ask) are then decoded together, one decoder run per step for all of them. Results come back in input
    order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=batch, thread_name_prefix="eval") as pool:
        yield from pool.map(lambda item: answer_row(*item, work), pending)


def local_source(work: WorkFn, batch: int = 1) -> Source:
    """Rows answered in this process (`batch` at once through one engine)."""
    return lambda pending: one_at_a_time(pending, work) if batch <= 1 else batched(pending, work, batch)


def run_rows(
    rows: list,
    images: Path,
    log: ResultLog,
    key: Callable[[object], dict],
    source: Source,
    what: str,
    progress: Log | None = None,
) -> RunResult:
    """The resumable loop shared by `eval` and `classify-eval`, local or on Ray: skip rows already in `log` (error
    rows are tried again), list missing images, hand the rest to `source` (local_source, or a cluster's) and write
    each result as soon as it arrives, in whatever order: an answered row's record, or an error row (`key(row)` +
    the error). Rows carry `.index` and `.image`; `key(row)` is checked against what an earlier run wrote for that
    index. `progress` (a progress.Progress) shows a `what` task: count, rate, ETA."""
    result = RunResult(records=[])
    pending = []
    for r in rows:
        log.check(r.index, key(r))
        path = resolve_image(images, r.image)
        if path is None:
            result.missing.append(r.image)
        elif r.index not in log.done or log.done[r.index].get(ERROR_FIELD):
            pending.append((r, path))
    t0 = time.perf_counter()
    try:
        with task(progress, what, total=len(pending), unit=what) as bar:
            for done in source(pending):
                if done.error:
                    log.write(
                        done.row.index, {**key(done.row), "seconds": f"{done.seconds:.3f}", ERROR_FIELD: done.error}
                    )
                    result.answered += 1
                elif done.record is None:  # unreadable file: listed with the missing ones, not fatal
                    result.missing.append(done.row.image)
                else:
                    log.write(done.row.index, {**done.record, "seconds": f"{done.seconds:.3f}", ERROR_FIELD: ""})
                    result.answered += 1
                bar.advance()
    finally:
        result.seconds = time.perf_counter() - t0
        log.close()
    wanted = {r.index for r in rows}
    for i, rec in sorted(log.done.items()):
        if i in wanted:
            (result.errors if rec.get(ERROR_FIELD) else result.records).append(rec)
    return result
