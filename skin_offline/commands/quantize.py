"""`skin-offline quantize BUNDLE OUT --precision int4|int8|fp16`: write a bundle at a lower precision."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..export.choices import QuantMethod
from ..manifest import Precision, Prefill
from .options import (
    calibration_images_option,
    progress_for,
    quant_method_option,
    quiet_option,
    scale_search_option,
)


def register(app, friendly) -> None:
    @app.command("quantize")
    @friendly
    def quantize(
        bundle: Path = typer.Argument(..., help="fp32 bundle folder (what `export` wrote)"),
        out: Path = typer.Argument(..., help="new bundle folder to write (replaced atomically)"),
        precision: Precision = typer.Option(
            ..., help="decoder precision: int4, int8 (MatMulNBits) or fp16 (GPU providers)"
        ),
        block_size: Optional[int] = typer.Option(
            None,
            help="int4/int8: weights per scale along K (16, 32, 64, 128, 256); default: the largest <= 128 dividing every input size",
        ),
        symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help="int4/int8: zero points or not"),
        accuracy_level: int = typer.Option(4, help="MatMulNBits compute: 4 = int8 activations (fast), 0 = fp32"),
        quant_method: Optional[QuantMethod] = quant_method_option(),
        scale_search: Optional[bool] = scale_search_option(),
        calibration_images: Optional[Path] = calibration_images_option(),
        lm_head: Optional[Precision] = typer.Option(
            None, help="lm_head precision for int4/int8 decoders: fp32, int8 (default) or int4"
        ),
        vision: Optional[Precision] = typer.Option(
            None,
            help="vision encoder: int8 (dynamic quantization, ~3x faster encode on CPU; the default for int4/int8, kept when its features match fp32 within cosine 0.999), fp32 or fp16",
        ),
        embeddings: Optional[Precision] = typer.Option(
            None, help="token table: fp32, fp16 or int8 (default int8; fp16 for fp16)"
        ),
        prefill: Optional[Prefill] = typer.Option(
            None,
            help="what many-row calls (prefill, batched decode) run through: "
            "int8 (an int8 GEMM graph beside the decoder; default for int4: faster "
            "first token, ~2x the int4 bundle's size) or decoder (the decoder itself)",
        ),
        keep_source: bool = typer.Option(
            False, "--keep-source", help="also carry BUNDLE's variants (ask --precision picks)"
        ),
        quality: bool = typer.Option(True, "--quality/--no-quality", help="measure agreement with the fp32 graphs"),
        threads: Optional[int] = typer.Option(None, min=1, help="threads for the quality measurement"),
        quiet: bool = quiet_option(),
    ):
        """Quantize a bundle's decoder (and optionally vision encoder) in bounded memory, with a quality report."""
        from ..export.calibration import CalibrationSpec
        from ..export.quantize import QuantConfig, quantize_bundle

        # QuantConfig checks which precisions each part accepts (ConfigError, exit 2), before any work
        cfg = QuantConfig(
            precision=precision,
            block_size=block_size,
            symmetric=symmetric,
            accuracy_level=accuracy_level,
            method=quant_method,
            scale_search=scale_search,
            lm_head=lm_head,
            vision=vision,
            embeddings=embeddings,
            prefill=prefill,
            calibration=CalibrationSpec(image_dir=calibration_images),
        )
        with progress_for(quiet) as progress:
            quantize_bundle(
                bundle, out, cfg, quality=quality, log=progress, probe_kw={"threads": threads}, keep_source=keep_source
            )
