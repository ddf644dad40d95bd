"""Progress you can watch: plain lines when stderr is not a terminal (pipes, CI), a bar on a terminal, nothing with
--quiet. The CLI runs in real subprocesses (stderr a pipe, or a pseudo-terminal)."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys

from skin_offline.progress import Mode, Progress, task

ANSI = re.compile(r"\x1b\[")


def test_lines_mode_says_stage_count_rate_and_eta():
    out = io.StringIO()
    p = Progress(Mode.LINES, stream=out, interval_s=0.0)
    p("a message")
    with p.task("decoder int4", total=4, unit="layers") as t:
        for _ in range(4):
            t.advance()
    with p.task("hashing", total=3_000_000, unit="B") as t:
        t.advance(1_500_000)
        t.advance(1_500_000)
    lines = out.getvalue().splitlines()
    assert lines[0] == "a message" and lines[1] == "decoder int4: 0/4 layers"
    assert re.fullmatch(r"decoder int4: 1/4 layers \(25%\), [\d.]+ layers/s, ETA \d+:\d\d", lines[2]), lines[2]
    assert re.fullmatch(r"decoder int4: 4 layers in \d+:\d\d \([\d.]+ layers/s\)", lines[5]), lines[5]
    assert "hashing: 1.5 MB/3.0 MB (50%)" in out.getvalue() and re.search(
        r"hashing: 3.0 MB in \d+:\d\d \([\d.]+ [kMG]?B/s\)", out.getvalue()
    )
    assert "\r" not in out.getvalue() and not ANSI.search(out.getvalue())


def test_slow_stages_say_seconds_per_item(monkeypatch):
    """A 7B layer takes ~14 s to verify: '0.1 layers/s' would say nothing, '14.0 s each' does."""
    import skin_offline.progress as progress

    clock = iter(range(0, 1000, 7))  # every reading of the clock is 7 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    out = io.StringIO()
    p = Progress(Mode.LINES, stream=out, interval_s=0.0)
    with p.task("verification", total=32, unit="layers") as t:
        t.advance()
    assert re.search(r"verification: 1/32 layers \(3%\), \d+\.\d s each, ETA \d+:\d\d", out.getvalue()), out.getvalue()
    assert re.search(r"verification: 1 layers in \d+:\d\d \(\d+\.\d s each\)", out.getvalue()), out.getvalue()


def test_auto_is_lines_on_a_pipe_and_under_ci_quiet_is_silent(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert Progress(stream=io.StringIO()).mode == Mode.LINES  # not a terminal
    monkeypatch.setenv("CI", "true")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert Progress(stream=Tty()).mode == Mode.LINES
    monkeypatch.delenv("CI")
    assert Progress(stream=Tty()).mode == Mode.BAR
    quiet = io.StringIO()
    q = Progress(Mode.QUIET, stream=quiet)
    q("nothing")
    with q.task("x", 2) as t:
        t.advance(2)
    assert quiet.getvalue() == ""


def test_task_on_a_plain_log_function_counts_silently():
    seen = []
    with task(seen.append, "x", total=3) as t:
        t.advance(3)
    assert seen == [] and t.completed == 3


def _export(args):
    e = {**os.environ, "SKIN_OFFLINE_PROGRESS_INTERVAL": "0"}
    return subprocess.run(
        [sys.executable, "-m", "skin_offline.cli", "export", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=e,
        timeout=300,
    )


def test_cli_export_progress_is_plain_lines_in_a_pipe_and_silent_with_quiet(llava_model, tmp_path):
    r = _export([llava_model.ckpt, tmp_path / "b", "--no-verify"])
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    assert "\r" not in err and not ANSI.search(err), err
    for stage in ("vision graph", "decoder graph", "contrib decoder graph"):
        assert re.search(rf"^{stage}: 2 layers in \d+:\d\d \(", err, re.M), (stage, err)
    assert re.search(r"^hashing: [\d.]+ [kMG]?B in \d+:\d\d", err, re.M), err
    q = _export([llava_model.ckpt, tmp_path / "q", "--no-verify", "--quiet"])
    assert q.returncode == 0 and q.stderr == b"", q.stderr.decode()


def _on_a_terminal(args, env) -> str:
    """Run the CLI with stderr on a pseudo-terminal; return what it drew."""
    master, slave = pty.openpty()
    e = {k: v for k, v in os.environ.items() if k != "CI"}
    p = subprocess.Popen(
        [sys.executable, "-m", "skin_offline.cli", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**e, "TERM": "xterm", **env},
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert p.wait(timeout=300) == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_cli_draws_a_bar_on_a_terminal_but_lines_under_ci(llava_model):
    bar = _on_a_terminal(["verify", llava_model.bundle_dir], {})
    assert ANSI.search(bar) and "hashing" in bar and "━" in bar
    ci = _on_a_terminal(["verify", llava_model.bundle_dir], {"CI": "1"})
    assert not ANSI.search(ci) and re.search(r"hashing: [\d.]+ [kMG]?B in \d+:\d\d", ci), ci
