"""`ask --sr OUT.dcm` and `chat --sr OUT.dcm`: everything checked before the model loads, the report written after the
answer (chat: one report for the whole conversation, written when it ends)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from .document import Turn
from .source import SourceImage


@dataclass
class ReportTarget:
    path: Path
    force: bool
    source: SourceImage

    @classmethod
    def prepare(cls, image, frame: int, path: Path, force: bool) -> "ReportTarget":
        """The checked target (highdicom installed, the file writable, the image a DICOM file
        with the UIDs a report needs), or a one-line error before any slow work."""
        from . import _highdicom, check_output, read_source

        _highdicom()
        check_output(path, force)
        return cls(Path(path), force, read_source(image, frame))

    def write(self, model, turns: list[tuple[str, str, object]]) -> None:
        """turns: (question, answer text, finish reason) in order."""
        from . import Producer, structured_report, write_report

        if not turns:
            typer.echo("note: no question was answered, so no DICOM SR was written", err=True)
            return
        ds = structured_report(self.source, [Turn(*t) for t in turns], Producer.from_model(model))
        write_report(ds, self.path, force=self.force)
        typer.echo(f"note: DICOM SR written to {self.path}", err=True)
