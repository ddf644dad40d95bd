"""`skin-offline` command line. Heavy imports live inside the commands so `--help` is instant.

Exit codes: 0 ok, 1 other error, 2 usage, 3 bad input (image/question), 4 bundle/checkpoint,
5 device, 130 interrupted (Ctrl-C prints what was generated so far).
"""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path
from typing import Optional

import typer

from .errors import SkinOfflineError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run the SkinVL dermatology VLM offline.")


DEBUG_ENV = "SKIN_OFFLINE_DEBUG"  # set to see the traceback of an unexpected error


def _fail(msg: str, code: int) -> None:
    one_line = " ".join(line.strip() for line in str(msg).splitlines() if line.strip())
    typer.echo(f"error: {one_line}", err=True)
    raise typer.Exit(code)


def friendly(fn):
    """Turn our named errors into one line + exit code; never a traceback for expected failures."""

    @wraps(fn)
    def wrapper(*a, **kw):
        import errno
        import os

        import click

        try:
            return fn(*a, **kw)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.Abort):  # not errors
            raise
        except SkinOfflineError as e:
            _fail(str(e), e.exit_code)
        except MemoryError:
            _fail("out of memory; try a smaller precision (int4) or close other programs", 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except BrokenPipeError:  # `skin-offline ask ... | head`: the reader left; stay quiet like other tools
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                _fail(f"disk full ({e.filename or 'output'}); free space and retry", 1)
            if os.environ.get(DEBUG_ENV):
                raise
            _fail(f"{e.strerror or e} ({e.filename}); check the path and permissions", 1)
        except Exception as e:  # last resort: still one line, never a traceback (unless debugging)
            if os.environ.get(DEBUG_ENV):
                raise
            _fail(f"unexpected {type(e).__name__}: {e}; rerun with {DEBUG_ENV}=1 for the traceback and report it", 1)

    return wrapper


@app.command()
@friendly
def export(
    src: Optional[Path] = typer.Argument(None, help="checkpoint folder (LLaVA or transformers Llava layout); omit with --base/--lora"),
    out: Optional[Path] = typer.Argument(None, help="bundle folder to write (replaced atomically)"),
    base: Optional[Path] = typer.Option(None, help="base checkpoint a --lora adapter was trained on"),
    lora: Optional[Path] = typer.Option(None, help="PEFT LoRA output folder (adapter + non_lora_trainables.bin), merged onto --base"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would be written, sizes and peak memory; write nothing"),
    vision_tower: Optional[Path] = typer.Option(None, help="local CLIP checkpoint folder when config.json names a hub id"),
    image_mode: Optional[str] = typer.Option(None, help="pad (model default) or crop (MM-Skin's evaluation)"),
    max_context: Optional[int] = typer.Option(None, help="context limit (default: the checkpoint's, 2048 for LLaVA)"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="check the graphs against transformers"),
    precision: str = typer.Option("fp32", help="fp32, or int4/int8/fp16 (quantized with `quantize`'s defaults)"),
):
    """Export a SkinVL / LLaVA checkpoint folder to an ONNX bundle."""
    from .export.to_onnx import export_bundle
    from .manifest import PadMode

    mode = None
    if image_mode is not None:
        if image_mode not in ("pad", "crop"):
            _fail(f"--image-mode must be pad or crop, not {image_mode!r}", 2)
        mode = PadMode(image_mode)
    if (base is None) != (lora is None):
        _fail("--base and --lora go together: --base BASE_CHECKPOINT --lora ADAPTER_FOLDER OUT", 2)
    if lora is not None:
        if out is not None and src is not None:
            _fail("with --base/--lora give only the output folder: export --base BASE --lora ADAPTER OUT", 2)
        src, out = base, out or src
    if src is None or out is None:
        _fail("usage: export SRC OUT, or export --base BASE --lora ADAPTER OUT", 2)
    if dry_run:
        from .export.to_onnx import plan_export

        plan_export(src, out, lora=lora, vision_tower=vision_tower, image_mode=mode, log=lambda m: typer.echo(m))
        return
    if precision not in ("fp32", "int4", "int8", "fp16"):
        _fail(f"--precision must be fp32, int4, int8 or fp16, not {precision!r}", 2)
    export_bundle(src, out, vision_tower=vision_tower, image_mode=mode, max_context=max_context, verify=verify,
                  log=lambda m: typer.echo(m, err=True), lora=lora, precision=precision)


@app.command()
@friendly
def ask(
    image: Path = typer.Argument(..., help="image file (jpg, png, webp, ...)"),
    question: str = typer.Argument(..., help="question about the image"),
    bundle: Optional[Path] = typer.Option(None, help="bundle folder (default: $SKIN_OFFLINE_BUNDLE or the user data dir)"),
    max_new_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    top_k: int = typer.Option(0, min=0),
    seed: Optional[int] = typer.Option(None),
    threads: Optional[int] = typer.Option(None, min=1),
    precision: Optional[str] = typer.Option(None, help="pick a graph variant the bundle carries (fp32, int8, int4, fp16)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of streaming text"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | tensorrt (an unavailable device is an error, exit 5)"),
):
    """Ask a question about an image; the answer streams to stdout."""
    from .runtime.pipeline import SkinVL

    _check_precision(precision)
    model = SkinVL.load(bundle, threads=threads, precision=precision, device=device)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if as_json:
        typer.echo(json.dumps(model.ask(image, question, **kw).to_dict()))
        return
    try:
        _print_stream(model.stream(image, question, **kw))
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        typer.echo("[interrupted]", err=True)
        raise typer.Exit(130)


def _check_precision(precision: Optional[str]) -> None:
    from .manifest import Precision

    if precision is not None and precision not in {p.value for p in Precision}:
        _fail(f"--precision must be one of {', '.join(p.value for p in Precision)}, not {precision!r}", 2)


def _print_stream(responses, prefill: bool = False) -> None:
    """Answer text to stdout as it streams, then one stats line to stderr."""
    last = None
    for r in responses:
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last = r
    sys.stdout.write("\n")
    t = last.timings
    done = f"prefilled {t.prefilled_tokens} of {t.prompt_tokens}, " if prefill else ""
    typer.echo(f"[{t.new_tokens} tokens, {done}ttft {t.ttft_s:.2f}s, {t.decode_tokens_per_s:.1f} tok/s, "
               f"finish: {last.finish_reason}]", err=True)


@app.command()
@friendly
def chat(
    image: Path = typer.Argument(..., help="image file the conversation is about"),
    question: Optional[list[str]] = typer.Option(None, "--question", "-q", help="ask these in order (default: read questions from stdin, one per line)"),
    bundle: Optional[Path] = typer.Option(None, help="bundle folder (default: $SKIN_OFFLINE_BUNDLE or the user data dir)"),
    max_new_tokens: int = typer.Option(256, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    seed: Optional[int] = typer.Option(None),
    threads: Optional[int] = typer.Option(None, min=1),
    precision: Optional[str] = typer.Option(None, help="pick a graph variant the bundle carries (fp32, int8, int4, fp16)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | tensorrt"),
):
    """Multi-turn conversation about one image: each follow-up reuses the KV cache and prefills only its own tokens."""
    from .runtime.pipeline import SkinVL

    _check_precision(precision)
    model = SkinVL.load(bundle, threads=threads, precision=precision, device=device)
    conv = model.conversation(image)
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
            _print_stream(conv.stream(q, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed), prefill=True)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        typer.echo("[interrupted]", err=True)
        raise typer.Exit(130)


@app.command()
@friendly
def verify(bundle: Path = typer.Argument(..., help="bundle folder")):
    """Check every bundle file against the sha256 in its manifest."""
    from .runtime.bundle import verify_bundle

    m = verify_bundle(bundle)
    typer.echo(f"ok: {len(m.files)} files match their sha256 ({sum(e.size for e in m.files.values()) / 1e6:.1f} MB)")


@app.command()
@friendly
def info(bundle: Path = typer.Argument(..., help="bundle folder"), as_json: bool = typer.Option(False, "--json")):
    """Show a bundle's graphs, sizes, preprocessing, provenance and verification figures."""
    from .export.quality import format_details, format_report
    from .manifest import Manifest

    m = Manifest.read(bundle)
    if as_json:
        typer.echo(json.dumps(m.to_dict(), indent=2))
        return
    d = m.model
    typer.echo(f"bundle {bundle} (schema {m.schema_version})")
    typer.echo(f"  model: {d.num_layers} layers, hidden {d.hidden_size}, heads {d.num_heads}/{d.num_kv_heads} kv, "
               f"vocab {d.vocab_size}, context {d.max_context}, {d.image_tokens} image tokens")
    typer.echo(f"  preprocess: {m.preprocess.mode.value}, {m.preprocess.crop_size}px")
    for g in m.graphs:
        size = sum(m.files[f].size for f in (g.file, *g.data_files))
        typer.echo(f"  {g.role:10s} {g.precision.value:5s} {g.flavor.value:8s} {g.file} ({size / 1e6:.1f} MB) "
                   f"{format_details(g.details)}".rstrip())
    typer.echo(f"  source: {m.source.get('layout')} {m.source.get('path')}")
    if m.verification:
        typer.echo("  verification: " + ", ".join(f"{k}={v:.2e}" for k, v in m.verification.items()))
    if m.quality:
        for line in format_report(m.quality):
            typer.echo("  " + line)


@app.command("make-demo-checkpoint")
@friendly
def make_demo_checkpoint(out: Path = typer.Argument(...), layout: str = typer.Option("llava"),
                         preset: str = typer.Option("tiny"), seed: int = typer.Option(0)):
    """Write a random-weight checkpoint of the SkinVL architecture (tests, demo, benchmarks)."""
    from .export.factory import LAYOUTS, PRESETS, make_checkpoint

    if layout not in LAYOUTS or preset not in PRESETS:
        _fail(f"layout must be one of {LAYOUTS} and preset one of {tuple(PRESETS)}", 2)
    make_checkpoint(out, layout=layout, preset_name=preset, seed=seed)
    typer.echo(f"random-weight {preset} checkpoint ({layout} layout) written to {out}", err=True)


# Commands that live in their own modules (skin_offline/commands/*.py), each exposing `register(app, friendly)`.
# Add one import per command module here.
_COMMAND_MODULES: list[str] = [
    "eval",
    "bench",
    "engines",
    "quantize",
    "serve",
]


def _register_commands() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"skin_offline.commands.{name}").register(app, friendly)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
