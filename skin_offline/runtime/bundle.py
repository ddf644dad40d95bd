"""Open a bundle folder: manifest, file checks, onnxruntime sessions, the memory-mapped embedding table.

Load checks every file the manifest lists exists with its recorded size (cheap, catches truncation and
missing files); the sha256 of every byte is checked by `skin-offline verify` or `check_hashes=True`
(hashing 4-15 GB on every start would cost seconds to minutes in a desktop tool that opens it daily).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import names
from ..errors import BundleError
from ..manifest import Flavor, Manifest, Precision, sha256_file
from .decoder import Decoder
from .sessions import SessionFactory
from .vision import VisionEncoder

ENV_BUNDLE = "SKIN_OFFLINE_BUNDLE"


def default_bundle_path() -> Path:
    """$SKIN_OFFLINE_BUNDLE, else the user data dir ($XDG_DATA_HOME or ~/.local/share)/skin-offline/bundle."""
    if os.environ.get(ENV_BUNDLE):
        return Path(os.environ[ENV_BUNDLE]).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "skin-offline" / "bundle"


def check_files(folder: Path, manifest: Manifest, hashes: bool) -> None:
    for name, entry in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing; re-export the bundle")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"bundle file {path} is {size} bytes, manifest says {entry.size} (truncated?); re-export it")
        if hashes and sha256_file(path) != entry.sha256:
            raise BundleError(f"bundle file {path} does not match its sha256 (corrupted); re-export the bundle")
    for g in manifest.graphs:
        for f in (g.file, *g.data_files):
            if f not in manifest.files:
                raise BundleError(f"graph file {f} is not listed in the manifest's files; re-export the bundle")


@dataclass
class Bundle:
    folder: Path
    manifest: Manifest
    vision: VisionEncoder
    decoder: Decoder
    embeddings: np.ndarray  # [V, H] memory-mapped

    @classmethod
    def load(cls, folder: Path | str | None = None, *, threads: int | None = None, precision: Precision | str | None = None,
             check_hashes: bool = False, sessions: SessionFactory | None = None) -> "Bundle":
        folder = Path(folder) if folder is not None else default_bundle_path()
        if not folder.exists():
            raise BundleError(
                f"no bundle at {folder}; export one with `skin-offline export CHECKPOINT {folder}` "
                f"or point --bundle / ${ENV_BUNDLE} at an existing bundle"
            )
        if not folder.is_dir():
            raise BundleError(f"bundle path {folder} is not a folder")
        manifest = Manifest.read(folder)
        check_files(folder, manifest, check_hashes)
        sessions = sessions or SessionFactory(threads=threads)
        prec = Precision(precision) if precision is not None else None
        vis = manifest.pick(names.ROLE_VISION, None if prec in (Precision.INT4,) else prec, Flavor.STANDARD)
        dec = manifest.pick(names.ROLE_DECODER, prec)
        emb = manifest.pick(names.ROLE_EMBEDDINGS)
        try:
            table = np.load(folder / emb.file, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise BundleError(f"cannot read embedding table {folder / emb.file}: {e}; re-export the bundle") from None
        if table.shape != (manifest.model.vocab_size, manifest.model.hidden_size):
            raise BundleError(f"embedding table shape {table.shape} does not match the manifest; re-export the bundle")
        return cls(
            folder=folder, manifest=manifest,
            vision=VisionEncoder(sessions.create(folder / vis.file)),
            decoder=Decoder(sessions.create(folder / dec.file), manifest.model),
            embeddings=table,
        )

    def embed(self, ids) -> np.ndarray:
        """[n] token ids -> [n, H] float32 rows of the embedding table."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.embeddings.shape[0]):
            raise BundleError(f"token id out of range for a vocabulary of {self.embeddings.shape[0]}")
        return np.asarray(self.embeddings[ids], dtype=np.float32)


def verify_bundle(folder: Path) -> Manifest:
    """Full integrity check: every file present, right size, right sha256."""
    manifest = Manifest.read(Path(folder))
    check_files(Path(folder), manifest, hashes=True)
    return manifest
