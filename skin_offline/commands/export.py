"""`skin-offline export` (checkpoint -> bundle) and `make-demo-checkpoint` (random weights of the architecture)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from ..export.choices import DemoLayout, DemoPreset, QuantMethod
from ..manifest import PadMode, Precision
from .options import (
    calibration_images_option,
    progress_for,
    quant_method_option,
    quiet_option,
    scale_search_option,
)


def _source(src: Optional[Path], out: Optional[Path], base: Optional[Path], lora: Optional[Path]) -> tuple[Path, Path]:
    """(checkpoint, output) from `export SRC OUT` or `export --base BASE --lora ADAPTER OUT`."""
    if (base is None) != (lora is None):
        raise UsageError("--base and --lora go together: --base BASE_CHECKPOINT --lora ADAPTER_FOLDER OUT")
    if lora is not None:
        if out is not None and src is not None:
            raise UsageError("with --base/--lora give only the output folder: export --base BASE --lora ADAPTER OUT")
        src, out = base, out or src
    if src is None or out is None:
        raise UsageError("usage: export SRC OUT, or export --base BASE --lora ADAPTER OUT")
    return src, out


def register(app, friendly) -> None:
    @app.command()
    @friendly
    def export(
        src: Optional[Path] = typer.Argument(
            None, help="checkpoint folder (LLaVA or transformers Llava layout); omit with --base/--lora"
        ),
        out: Optional[Path] = typer.Argument(None, help="bundle folder to write (replaced atomically)"),
        base: Optional[Path] = typer.Option(None, help="base checkpoint a --lora adapter was trained on"),
        lora: Optional[Path] = typer.Option(
            None, help="PEFT LoRA output folder (adapter + non_lora_trainables.bin), merged onto --base"
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="print what would be written, sizes and peak memory; write nothing"
        ),
        vision_tower: Optional[Path] = typer.Option(
            None, help="local CLIP checkpoint folder when config.json names a hub id"
        ),
        image_mode: Optional[PadMode] = typer.Option(
            None, help="pad (the model's training default) or crop (MM-Skin's evaluation)"
        ),
        max_context: Optional[int] = typer.Option(
            None, min=2, help="context limit (default: the checkpoint's, 2048 for LLaVA)"
        ),
        verify: bool = typer.Option(
            True, "--verify/--no-verify", help="check every graph against the checkpoint (transformers), layer by layer"
        ),
        quality: bool = typer.Option(
            True,
            "--quality/--no-quality",
            help="int4/int8/fp16: measure agreement with the checkpoint in fp32 (stored in the manifest, shown by `info`)",
        ),
        threads: Optional[int] = typer.Option(None, min=1, help="threads for verification and the quality report"),
        precision: Precision = typer.Option(
            Precision.FP32, help="fp32, or int4/int8/fp16 (quantized with `quantize`'s defaults)"
        ),
        quant_method: Optional[QuantMethod] = quant_method_option(),
        scale_search: Optional[bool] = scale_search_option(),
        calibration_images: Optional[Path] = calibration_images_option(),
        quiet: bool = quiet_option(),
    ):
        """Export a SkinVL / LLaVA checkpoint folder to an ONNX bundle."""
        src, out = _source(src, out, base, lora)
        if dry_run:
            from ..export.plan import plan_export

            plan_export(
                src,
                out,
                lora=lora,
                vision_tower=vision_tower,
                image_mode=image_mode,
                precision=precision,
                max_context=max_context,
                verify=verify,
                quality=quality,
                log=lambda m: typer.echo(m),
                quant_method=quant_method,
                scale_search=scale_search,
                calibration_images=calibration_images,
            )
            return
        from ..export.to_onnx import export_bundle

        with progress_for(quiet) as progress:
            export_bundle(
                src,
                out,
                vision_tower=vision_tower,
                image_mode=image_mode,
                max_context=max_context,
                verify=verify,
                quality=quality,
                log=progress,
                lora=lora,
                precision=precision,
                threads=threads,
                quant_method=quant_method,
                scale_search=scale_search,
                calibration_images=calibration_images,
            )

    @app.command("make-demo-checkpoint")
    @friendly
    def make_demo_checkpoint(
        out: Path = typer.Argument(...),
        layout: DemoLayout = typer.Option(DemoLayout.LLAVA),
        preset: DemoPreset = typer.Option(DemoPreset.TINY),
        seed: int = typer.Option(0),
    ):
        """Write a random-weight checkpoint of the SkinVL architecture (tests, demo, benchmarks)."""
        from ..export.factory import make_checkpoint

        make_checkpoint(out, layout=layout.value, preset_name=preset.value, seed=seed)
        typer.echo(f"random-weight {preset.value} checkpoint ({layout.value} layout) written to {out}", err=True)
