"""Who produced a report: the model (from the bundle manifest) and the software, as the SR's device observer and
algorithm identification name them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, names
from ..manifest import Manifest

SOFTWARE = "skin-offline"


@dataclass(frozen=True)
class Producer:
    model_name: str  # the checkpoint's folder name (e.g. SkinVL-PubMM), else the bundle's
    precision: str  # of the decoder graph that answered (int4, int8, fp32, fp16)
    bundle_fingerprint: str  # sha256 of the manifest's file table: names one exact bundle
    source_fingerprint: str  # the exporter's fingerprint of the checkpoint ('' when the manifest has none)
    random_weights: bool  # exported from a random-weight checkpoint: its answers mean nothing
    software: str = SOFTWARE
    software_version: str = __version__

    @classmethod
    def from_manifest(cls, manifest: Manifest, precision: str, bundle_folder: Path | None = None) -> "Producer":
        src = manifest.source
        name = Path(str(src.get("path") or "")).name or (Path(bundle_folder).resolve().name if bundle_folder else "")
        return cls(
            model_name=name or "SkinVL",
            precision=str(precision),
            bundle_fingerprint=bundle_fingerprint(manifest),
            source_fingerprint=str(src.get("fingerprint") or ""),
            random_weights=manifest.random_weights,
        )

    @classmethod
    def from_model(cls, model) -> "Producer":
        """A loaded SkinVL: the precision is the decoder graph it actually runs."""
        dec = (model.bundle.picked or {}).get(names.ROLE_DECODER) or model.manifest.pick(names.ROLE_DECODER)
        return cls.from_manifest(model.manifest, dec.precision.value, model.bundle.folder)

    @property
    def parameters(self) -> list[str]:
        """TID 4019 Algorithm Parameters: one 'key=value' text each."""
        out = [f"precision={self.precision}", f"bundle_sha256={self.bundle_fingerprint}"]
        if self.source_fingerprint:
            out.append(f"checkpoint_fingerprint={self.source_fingerprint}")
        out.append(f"random_weights={'yes' if self.random_weights else 'no'}")
        return out


def bundle_fingerprint(manifest: Manifest) -> str:
    """sha256 over the manifest's (file name, sha256) table: equal for byte-identical bundles, different after a
    re-export or a quantize (which adds graphs)."""
    table = {k: v.sha256 for k, v in sorted(manifest.files.items())}
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()
