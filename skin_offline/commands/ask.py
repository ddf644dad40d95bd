"""`skin-offline ask` (one question, streamed) and `chat` (multi-turn about one image)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .options import (Device, Precision, bundle_option, device_option, frame_option, image_source, precision_option,
                      threads_option, warn_if_random, show_notices)


def print_stream(responses, prefill: bool = False):
    """Answer text to stdout as it streams, then one stats line to stderr; returns (answer text, last response)."""
    last, parts = None, []
    for r in responses:
        sys.stdout.write(r.text)
        sys.stdout.flush()
        parts.append(r.text)
        last = r
    sys.stdout.write("\n")
    t = last.timings
    done = f"prefilled {t.prefilled_tokens} of {t.prompt_tokens}, " if prefill else ""
    typer.echo(f"[{t.new_tokens} tokens, {done}ttft {t.ttft_s:.2f}s, {t.decode_tokens_per_s:.1f} tok/s, "
               f"finish: {last.finish_reason}]", err=True)
    return "".join(parts), last


def _report_target(image: Path, frame: int, sr: Optional[Path], force: bool):
    """--sr: everything checked before the slow load; the SR writer (pydicom, highdicom) imported only when asked for."""
    if sr is None:
        return None
    from ..sr.cli import ReportTarget

    return ReportTarget.prepare(image, frame, sr, force)


def _sr_option():
    return typer.Option(None, "--sr", metavar="OUT.dcm", help="also write the answer as a DICOM Structured Report, "
                        "filed with the DICOM image's patient and study (README 'Filing the answer in a PACS')")


def _force_option():
    return typer.Option(False, "--force", help="overwrite the --sr file if it exists")


def _interrupted() -> None:
    sys.stdout.write("\n")
    typer.echo("[interrupted]", err=True)
    raise typer.Exit(130)


def register(app, friendly) -> None:
    @app.command()
    @friendly
    def ask(
        image: Path = typer.Argument(..., help="image file (jpg, png, heic, DICOM, ...)"),
        question: str = typer.Argument(..., help="question about the image"),
        frame: int = frame_option(),
        bundle: Optional[Path] = bundle_option(),
        max_new_tokens: int = typer.Option(256, min=1),
        temperature: float = typer.Option(0.0, help="0 = greedy"),
        top_p: float = typer.Option(1.0, max=1.0, help="nucleus sampling: keep the smallest set holding this mass"),
        top_k: int = typer.Option(0, help="keep the k most likely tokens (0 = off)"),
        seed: Optional[int] = typer.Option(None),
        threads: Optional[int] = threads_option(),
        precision: Optional[Precision] = precision_option(),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of streaming text"),
        device: Device = device_option(),
        sr: Optional[Path] = _sr_option(),
        force: bool = _force_option(),
    ):
        """Ask a question about an image; the answer streams to stdout."""
        from ..runtime.kernels.sampling import SamplingConfig
        from ..runtime.pipeline import SkinVL

        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)  # checked before the slow load
        report = _report_target(image, frame, sr, force)
        model = SkinVL.load(bundle, threads=threads, precision=precision, device=device)
        warn_if_random(model.manifest)
        show_notices(model)
        if as_json:
            answer = model.ask(image_source(image, frame), question, **kw)
            typer.echo(json.dumps(answer.to_dict()))
            text, finish = answer.answer, answer.finish_reason
        else:
            try:
                text, last = print_stream(model.stream(image_source(image, frame), question, **kw))
            except KeyboardInterrupt:
                _interrupted()
            finish = last.finish_reason
        if report:
            report.write(model, [(question, text, finish)])

    @app.command()
    @friendly
    def chat(
        image: Path = typer.Argument(..., help="image file the conversation is about"),
        frame: int = frame_option(),
        question: Optional[list[str]] = typer.Option(None, "--question", "-q", help="ask these in order (default: read questions from stdin, one per line)"),
        bundle: Optional[Path] = bundle_option(),
        max_new_tokens: int = typer.Option(256, min=1),
        temperature: float = typer.Option(0.0, help="0 = greedy"),
        seed: Optional[int] = typer.Option(None),
        threads: Optional[int] = threads_option(),
        precision: Optional[Precision] = precision_option(),
        device: Device = device_option(),
        sr: Optional[Path] = _sr_option(),
        force: bool = _force_option(),
    ):
        """Multi-turn conversation about one image: each follow-up reuses the KV cache and prefills only its own tokens.
        With --sr, one DICOM SR holding every question and answer is written when the conversation ends."""
        from ..runtime.kernels.sampling import SamplingConfig
        from ..runtime.pipeline import SkinVL

        SamplingConfig(temperature=temperature, seed=seed)
        report, turns = _report_target(image, frame, sr, force), []
        model = SkinVL.load(bundle, threads=threads, precision=precision, device=device)
        warn_if_random(model.manifest)
        show_notices(model)
        conv = model.conversation(image_source(image, frame))
        interactive = not question and sys.stdin.isatty()
        questions = iter(question) if question else (line.rstrip("\n") for line in sys.stdin)
        try:
            while True:
                if interactive:
                    sys.stderr.write("> ")
                    sys.stderr.flush()
                q = next(questions, None)
                if q is None or q.strip() in ("exit", "quit"):
                    break
                if not q.strip():
                    continue
                text, last = print_stream(conv.stream(q, max_new_tokens=max_new_tokens, temperature=temperature,
                                                      seed=seed), prefill=True)
                turns.append((q, text, last.finish_reason))
        except KeyboardInterrupt:
            _interrupted()  # no report: the conversation was abandoned
        if report:
            report.write(model, turns)
