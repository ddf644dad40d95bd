"""`skin-offline build-engines BUNDLE`: TensorRT engines for the bundle's standard-op graphs (export/tensorrt.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..manifest import Precision


def register(app, friendly) -> None:
    @app.command("build-engines")
    @friendly
    def build_engines_cmd(
        bundle: Path = typer.Argument(..., help="bundle folder (engines are written into it)"),
        fp16: bool = typer.Option(False, "--fp16", help="let TensorRT use fp16 kernels"),
        int8: bool = typer.Option(False, "--int8", help="int8 kernels (needs a calibration table per graph)"),
        max_context: Optional[int] = typer.Option(
            None, min=2, help="longest prompt + answer the engines accept (default: the bundle's context)"
        ),
        workspace: float = typer.Option(4.0, min=0.25, help="TensorRT builder workspace, GB"),
        precision: Optional[Precision] = typer.Option(
            None, help="standard-op graph precision to build from (default: the bundle's first)"
        ),
    ):
        """Build TensorRT engines (once per GPU and TensorRT version) for `--device tensorrt`."""
        from ..export.tensorrt import build_engines

        rec = build_engines(
            bundle,
            fp16=fp16,
            int8=int8,
            max_context=max_context,
            workspace_gb=workspace,
            precision=precision,
            log=lambda m: typer.echo(m, err=True),
        )
        typer.echo(
            f"engines for {', '.join(rec.graphs)} built with TensorRT {rec.tensorrt_version} on {rec.gpu_name} "
            f"(compute {rec.compute_capability}), context {rec.max_context}; run with --device tensorrt"
        )
