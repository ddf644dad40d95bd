"""`skin-offline ask` (one question, streamed) and `chat` (multi-turn about one image)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .options import (
    Device,
    ImageNotices,
    Precision,
    bundle_option,
    device_option,
    frame_option,
    image_source,
    precision_option,
    show_notices,
    threads_option,
    warn_if_random,
)


def print_stream(responses, prefill: bool = False, before=None):
    """Answer text to stdout as it streams, then one stats line to stderr; `before()` runs once the request is
    prepared (before its first response). Returns (answer text, last response)."""
    last, parts = None, []
    for i, r in enumerate(responses):
        if i == 0 and before is not None:
            before()
        sys.stdout.write(r.text)
        sys.stdout.flush()
        parts.append(r.text)
        last = r
    sys.stdout.write("\n")
    t = last.timings
    done = f"prefilled {t.prefilled_tokens} of {t.prompt_tokens}, " if prefill else ""
    typer.echo(
        f"[{t.new_tokens} tokens, {done}ttft {t.ttft_s:.2f}s, {t.decode_tokens_per_s:.1f} tok/s, "
        f"finish: {last.finish_reason}]",
        err=True,
    )
    return "".join(parts), last


def _report_target(image: Path, frame: int, sr: Optional[Path], force: bool):
    """--sr: everything checked before the slow load; the SR writer (pydicom, highdicom) imported only when asked for."""
    if sr is None:
        return None
    from ..sr.cli import ReportTarget

    return ReportTarget.prepare(image, frame, sr, force)


def _sr_option():
    return typer.Option(
        None,
        "--sr",
        metavar="OUT.dcm",
        help="also write the answer as a DICOM Structured Report, "
        "filed with the DICOM image's patient and study (README 'Filing the answer in a PACS')",
    )


def _force_option():
    return typer.Option(False, "--force", help="overwrite the --sr file if it exists")


def read_constraint(
    json_schema: Optional[Path], regex: Optional[str], choice: Optional[list[str]], grammar: Optional[Path]
):
    """The one constraint option given (runtime/constraints.py) and its option name, or (None, "")."""
    from ..errors import UsageError
    from ..runtime.constraints import Choice, Grammar, JsonSchema, Regex

    given = [
        (n, v)
        for n, v in (("--json-schema", json_schema), ("--regex", regex), ("--choice", choice), ("--grammar", grammar))
        if v
    ]
    if len(given) > 1:
        raise UsageError(f"pass one constraint, not {' and '.join(n for n, _ in given)}")
    if not given:
        return None, ""
    name, value = given[0]
    if name in ("--json-schema", "--grammar"):
        try:
            text = Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(
                f"{name} {value}: cannot be read ({getattr(e, 'strerror', None) or e}); pass a UTF-8 text file"
            ) from None
        if name == "--grammar":
            return Grammar(text), name
        try:
            return JsonSchema(json.loads(text)), name
        except json.JSONDecodeError as e:
            raise UsageError(
                f"{name} {value}: not JSON ({e.msg} at line {e.lineno}); pass a JSON Schema file"
            ) from None
    return (Regex(value) if name == "--regex" else Choice(value)), name


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
        json_schema: Optional[Path] = typer.Option(
            None,
            "--json-schema",
            help="answer with JSON valid under this JSON Schema file (see README: Structured answers)",
        ),
        regex: Optional[str] = typer.Option(None, "--regex", help="answer with text that fully matches this regex"),
        choice: Optional[list[str]] = typer.Option(None, "--choice", help="answer with exactly one of these (repeat)"),
        grammar: Optional[Path] = typer.Option(None, "--grammar", help="answer in the language of this Lark grammar"),
        top_logprobs: Optional[int] = typer.Option(
            None,
            "--top-logprobs",
            min=0,
            max=20,
            help="with --json: each token's log-probability and this many alternatives",
        ),
        device: Device = device_option(),
        sr: Optional[Path] = _sr_option(),
        force: bool = _force_option(),
    ):
        """Ask a question about an image; the answer streams to stdout."""
        from ..errors import UsageError
        from ..runtime.constraints import structured_value
        from ..runtime.pipeline import SkinVL, collect
        from ..runtime.request import GenerationParams

        kw = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            logprobs=top_logprobs,
        )
        GenerationParams(**kw)  # checked before the slow load
        if top_logprobs is not None and not as_json:
            raise UsageError("--top-logprobs prints with the JSON answer: add --json")
        constraint, field = read_constraint(json_schema, regex, choice, grammar)
        report = _report_target(image, frame, sr, force)
        model = SkinVL.load(bundle, threads=threads, precision=precision, device=device, parallel=1)
        warn_if_random(model.manifest)
        show_notices(model)
        req = model.prepare(image_source(image, frame), question, constraint=constraint, constraint_field=field, **kw)
        ImageNotices().show(req.notices)
        if as_json:
            answer = collect(model.engine.submit(req))
            typer.echo(json.dumps(answer.to_dict(model.tokenizer)))
            text, finish = answer.answer, answer.finish_reason
        else:
            try:
                text, last = print_stream(model.engine.submit(req))
            except KeyboardInterrupt:
                _interrupted()
            finish = last.finish_reason
        if report:
            report.write(model, [(question, text, finish, structured_value(req.matcher, text, finish))])

    @app.command()
    @friendly
    def chat(
        image: Path = typer.Argument(..., help="image file the conversation is about"),
        frame: int = frame_option(),
        question: Optional[list[str]] = typer.Option(
            None, "--question", "-q", help="ask these in order (default: read questions from stdin, one per line)"
        ),
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
        from ..runtime.pipeline import SkinVL
        from ..runtime.request import GenerationParams

        GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)  # before the slow load
        report, turns = _report_target(image, frame, sr, force), []
        model = SkinVL.load(bundle, threads=threads, precision=precision, device=device, parallel=1)
        warn_if_random(model.manifest)
        show_notices(model)
        conv = model.conversation(image_source(image, frame))
        notices = ImageNotices()
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
                turn = conv.stream(q, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
                text, last = print_stream(turn, prefill=True, before=lambda: notices.show(conv.notices))
                turns.append((q, text, last.finish_reason))
        except KeyboardInterrupt:
            _interrupted()  # no report: the conversation was abandoned
        if report:
            report.write(model, turns)
