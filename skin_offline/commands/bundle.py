"""`skin-offline info` (what a bundle holds) and `verify` (every file against its sha256)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .options import progress_for, quiet_option


def register(app, friendly) -> None:
    @app.command()
    @friendly
    def verify(
        bundle: Path = typer.Argument(..., help="bundle folder"),
        against: Optional[Path] = typer.Option(
            None,
            help="also check every graph against this checkpoint (the base "
            "with --lora), layer by layer, as export does",
        ),
        lora: Optional[Path] = typer.Option(
            None, help="the LoRA adapter the bundle was exported with (--against BASE)"
        ),
        vision_tower: Optional[Path] = typer.Option(None, help="local CLIP folder when the checkpoint names a hub id"),
        threads: Optional[int] = typer.Option(None, min=1),
        quiet: bool = quiet_option(),
    ):
        """Check every bundle file against the sha256 in its manifest (and with --against, every graph against the
        checkpoint it was exported from)."""
        from ..runtime.bundle import verify_bundle

        with progress_for(quiet) as progress:
            m = verify_bundle(bundle, log=progress)
            if against is not None:
                from ..export.to_onnx import verify_against_checkpoint
                from ..export.verify import format_verification

                rec = verify_against_checkpoint(
                    bundle, against, lora=lora, vision_tower=vision_tower, threads=threads, log=progress
                )
        typer.echo(
            f"ok: {len(m.files)} files match their sha256 ({sum(e.size for e in m.files.values()) / 1e6:.1f} MB)"
        )
        if against is not None:
            for line in format_verification(rec):
                typer.echo(line)

    @app.command()
    @friendly
    def info(bundle: Path = typer.Argument(..., help="bundle folder"), as_json: bool = typer.Option(False, "--json")):
        """Show a bundle's graphs, sizes, preprocessing, provenance and verification figures."""
        from ..export.quality import format_details, format_report
        from ..manifest import Manifest

        m = Manifest.read(bundle)
        if as_json:
            typer.echo(json.dumps(m.to_dict(), indent=2))
            return
        d = m.model
        typer.echo(f"bundle {bundle} (schema {m.schema_version})")
        typer.echo(
            f"  model: {d.num_layers} layers, hidden {d.hidden_size}, heads {d.num_heads}/{d.num_kv_heads} kv, "
            f"vocab {d.vocab_size}, context {d.max_context}, {d.image_tokens} image tokens"
        )
        typer.echo(f"  preprocess: {m.preprocess.mode.value}, {m.preprocess.crop_size}px")
        for g in m.graphs:
            size = sum(m.files[f].size for f in (g.file, *g.data_files))
            typer.echo(
                f"  {g.role:10s} {g.precision.value:5s} {g.flavor.value:8s} {g.file} ({size / 1e6:.1f} MB) "
                f"{format_details(g.details)}".rstrip()
            )
        typer.echo(
            f"  source: {m.source.get('layout')} {m.source.get('path')}"
            + (" (random weights)" if m.random_weights else "")
        )
        if m.source.get("lora"):  # a merged adapter is half of what the bundle is
            typer.echo(
                f"  lora: {m.source['lora']} (r {m.source.get('lora_r')}, alpha {m.source.get('lora_alpha')}, "
                f"{m.source.get('lora_targets')} weights merged); projector: {m.source.get('projector')}"
            )
        if m.verification:
            from ..export.verify import format_verification

            for line in format_verification(m.verification):
                typer.echo("  " + line)
        if m.quality:
            for line in format_report(m.quality):
                typer.echo("  " + line)
