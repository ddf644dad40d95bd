"""`skin-offline bench BUNDLE`: per-stage medians, peak RSS, machine and bandwidth roofline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..manifest import Prefill
from .options import Device, Precision, device_option, threads_option


def register(app, friendly) -> None:
    @app.command("bench")
    @friendly
    def bench(
        bundle: Path = typer.Argument(..., help="bundle folder"),
        image: Optional[Path] = typer.Option(None, help="image file (default: a seeded random image)"),
        question: Optional[str] = typer.Option(None, help="question (default: a short lesion question)"),
        runs: int = typer.Option(3, min=1, help="measured runs (medians are reported)"),
        warmup: int = typer.Option(1, min=0, help="discarded runs before measuring"),
        prompt_tokens: Optional[int] = typer.Option(
            None, min=1, help="pad the question until image + text tokens reach N"
        ),
        new_tokens: int = typer.Option(128, min=1, help="tokens to generate per run"),
        threads: Optional[int] = threads_option(),
        precision: Optional[Precision] = typer.Option(None, help="decoder precision the bundle carries"),
        prefill: Optional[Prefill] = typer.Option(
            None,
            help="many-row calls through the bundle's int8 GEMM graph (int8) or the "
            "decoder itself (decoder: the int4-only tier); default: int8 when it "
            "is there and RAM holds it",
        ),
        device: Device = device_option(),
        as_json: bool = typer.Option(False, "--json", help="print the full result as JSON"),
        chart: Optional[Path] = typer.Option(None, help="write a PNG chart of the stage breakdown"),
        probe: bool = typer.Option(True, "--probe/--no-probe", help="measure memory bandwidth for the roofline"),
    ):
        """Time every stage of a request on BUNDLE; report medians next to the bandwidth roofline."""
        from ..bench.report import render, to_json, write_chart
        from ..bench.run import DEFAULT_QUESTION, BenchConfig, run_bench

        cfg = BenchConfig(
            bundle=bundle,
            image=image,
            question=question or DEFAULT_QUESTION,
            runs=runs,
            warmup=warmup,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            threads=threads,
            precision=precision.value if precision else None,
            device=device.value,
            probe_bandwidth=probe,
            prefill=prefill.value if prefill else None,
        )
        result = run_bench(cfg, log=(lambda m: None) if as_json else (lambda m: typer.echo(m, err=True)))
        if chart is not None:
            write_chart(result, chart)
        if as_json:
            typer.echo(to_json(result))
        else:
            render(result)
            if chart is not None:
                typer.echo(f"chart written to {chart}", err=True)
