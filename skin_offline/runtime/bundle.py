"""Open a bundle folder: manifest, file checks, onnxruntime sessions, the memory-mapped embedding table.

Load checks every file the manifest lists exists inside the folder with its recorded size (cheap, catches
truncation and missing files), hashes the small ones (graphs, tokenizer) and refuses graphs whose external
data points anywhere but their listed files; the sha256 of the big weight files is checked by
`skin-offline verify` or `check_hashes=True` (hashing 4-15 GB on every start would cost seconds to
minutes in a desktop tool that opens it daily).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import names
from ..errors import BundleError
from ..manifest import Attention, Flavor, GraphVariant, Kernel, Manifest, Precision, Prefill, sha256_file
from .decoder import Decoder, make_decoder
from .external_data import external_locations
from .kernels.policy import overflows_here
from .sessions import SessionFactory
from .tensorrt import device_for_bundle, graph_providers
from .vision import VisionEncoder

ENV_BUNDLE = "SKIN_OFFLINE_BUNDLE"


def default_bundle_path() -> Path:
    """$SKIN_OFFLINE_BUNDLE, else the user data dir ($XDG_DATA_HOME or ~/.local/share)/skin-offline/bundle."""
    if os.environ.get(ENV_BUNDLE):
        return Path(os.environ[ENV_BUNDLE]).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "skin-offline" / "bundle"


# Files up to this size (graph protobufs, tokenizer, small tables) are hashed at every load: a few ms,
# and a bit flip in a graph's structure is caught before onnxruntime parses it. Bigger files (weights,
# 0.5-15 GB) only have their size checked at load; `skin-offline verify` / check_hashes=True hash them.
HASH_AT_LOAD_MAX_BYTES = 64 << 20


def check_files(folder: Path, manifest: Manifest, hashes: bool, on_bytes: Callable[[int], Any] | None = None) -> None:
    """Every listed file present, inside the folder, of its recorded size; sha256 checked for all (`hashes`) or for
    the small ones. `on_bytes(n)` is called as bytes are hashed (progress)."""
    root = folder.resolve()
    for name, entry in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing; re-export the bundle")
        if not path.resolve().is_relative_to(root):  # a symlink pointing out of the bundle
            raise BundleError(f"bundle file {path} links outside the bundle folder; refusing it, re-export the bundle")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(
                f"bundle file {path} is {size} bytes, manifest says {entry.size} (truncated?); re-export it"
            )
        if (hashes or size <= HASH_AT_LOAD_MAX_BYTES) and sha256_file(path, on_bytes=on_bytes) != entry.sha256:
            raise BundleError(f"bundle file {path} does not match its sha256 (corrupted); re-export the bundle")
    for g in manifest.graphs:
        for f in (g.file, *g.data_files):
            if f not in manifest.files:
                raise BundleError(f"graph file {f} is not listed in the manifest's files; re-export the bundle")
        if g.file.endswith(".onnx"):
            check_external_data(folder, g.file, set(g.data_files))


def check_external_data(folder: Path, graph_file: str, allowed: set[str]) -> None:
    """Refuse a graph whose external weights are not files this bundle lists for it (path traversal,
    absolute paths, files the manifest does not hash): onnxruntime would otherwise open them."""
    for loc in external_locations(folder / graph_file):
        if loc not in allowed:
            raise BundleError(
                f"graph {graph_file} reads weights from {loc!r}, which is not one of its bundle files "
                f"{sorted(allowed)}; refusing it, re-export the bundle"
            )


def _decoder_flavor(
    manifest: Manifest, prec: Precision | None, flavor: Flavor | str | None, sessions: SessionFactory
) -> Flavor:
    """The asked flavor, else CONTRIB on the CPU provider when the bundle has it at that precision (faster
    there: GroupQueryAttention + in-place KV cache), else STANDARD (portable, TensorRT)."""
    if flavor is not None:
        return Flavor(flavor)
    want = prec or manifest.pick(names.ROLE_DECODER).precision
    has = any(g.flavor == Flavor.CONTRIB and g.precision == want for g in manifest.variants(names.ROLE_DECODER))
    first = sessions.providers[0]
    cpu = (first[0] if isinstance(first, tuple) else first) == "CPUExecutionProvider"
    return Flavor.CONTRIB if has and cpu else Flavor.STANDARD


def _load_table(folder: Path, manifest: Manifest, emb: GraphVariant) -> tuple[np.ndarray, np.ndarray | None]:
    """The memory-mapped embedding table [V,H] (fp32/fp16/int8) and, for int8, its per-row scales [V]."""
    try:
        table = np.load(folder / emb.file, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise BundleError(f"cannot read embedding table {folder / emb.file}: {e}; re-export the bundle") from None
    if table.shape != (manifest.model.vocab_size, manifest.model.hidden_size):
        raise BundleError(f"embedding table shape {table.shape} does not match the manifest; re-export the bundle")
    if table.dtype != np.int8:
        return table, None
    if not emb.data_files:
        raise BundleError(f"int8 embedding table {emb.file} has no scales file; re-quantize the bundle")
    scales = np.load(folder / emb.data_files[0])  # [V] float32
    if scales.shape != (table.shape[0],):
        raise BundleError(f"embedding scales {emb.data_files[0]} shape {scales.shape} does not match; re-quantize")
    return table, scales


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _multi_row_graph(
    folder: Path, manifest: Manifest, dec: GraphVariant, prefill: Prefill | None, first_provider: Any
) -> tuple[GraphVariant | None, tuple[str, ...]]:
    """The int8 QGEMM graph many-row calls should run through, if any, and a notice when it is left unloaded."""
    provider = first_provider[0] if isinstance(first_provider, tuple) else first_provider
    partner = manifest.multi_row_partner(dec) if provider == "CPUExecutionProvider" else None
    if prefill == Prefill.DECODER:
        return None, ()
    if prefill == Prefill.INT8 and partner is None:
        raise BundleError(
            f"bundle {folder} has no int8 prefill graph for its {dec.precision.value} decoder; "
            f"make one with `skin-offline quantize ... --prefill int8`, or use --prefill decoder"
        )
    if partner is None:
        return None, ()
    if overflows_here(partner.details):
        # a graph exported before 7-bit codes, on a CPU without VNNI: its kernel's int16 sums clip (a trained
        # model's answers go wrong, measured on the proxy: 0.9% top-1 agreement with fp32); auto mode leaves it out
        why = (
            f"prefill graph {partner.file}'s int8 codes overflow this CPU's int8 kernel (no VNNI); re-export the bundle"
        )
        if prefill is None:
            return None, (f"{why}; prompts prefill on the {dec.precision.value} graph meanwhile",)
        return partner, (f"{why} (loaded anyway: --prefill int8 asked for it)",)
    size = sum(manifest.files[f].size for f in {partner.file, *partner.data_files})
    free = _available_memory()
    # the int8 graph is the bigger half of a hybrid bundle (7 GB at 7B): auto mode leaves it out rather than
    # push a small machine into swap; prefill then runs on the decode graph (slower first token, same answers' path)
    if prefill is None and free is not None and free < 1.2 * size + (512 << 20):
        return None, (
            f"prefill graph {partner.file} ({size / 1e9:.1f} GB) left unloaded: {free / 1e9:.1f} GB of RAM "
            f"available; prompts prefill on the {dec.precision.value} graph (slower first token)",
        )
    return partner, ()


@dataclass
class Bundle:
    folder: Path
    manifest: Manifest
    vision: VisionEncoder
    decoder: Decoder
    embeddings: np.ndarray  # [V, H] memory-mapped (float32, float16, or int8 with row scales)
    embedding_scales: np.ndarray | None = None  # [V] float32 per-row scales of an int8 table
    notices: tuple[str, ...] = ()  # one-line facts a front end should show (e.g. a graph left unloaded)
    picked: dict[str, GraphVariant] = field(
        default_factory=dict
    )  # role -> the GraphVariant loaded for it (+ "multi_row" when the int8 GEMM graph is loaded)

    def loaded_files(self) -> set[str]:
        """The bundle files this Bundle's sessions and table read."""
        return {f for g in self.picked.values() for f in (g.file, *g.data_files)}

    @classmethod
    def load(
        cls,
        folder: Path | str | None = None,
        *,
        threads: int | None = None,
        precision: Precision | str | None = None,
        check_hashes: bool = False,
        sessions: SessionFactory | None = None,
        flavor: Flavor | str | None = None,
        device: Any = None,
        allow_cpu_fp16: bool = False,
        prefill: Prefill | str | None = None,
    ) -> "Bundle":
        """`prefill`: INT8 runs many-row calls through the bundle's int8 QGEMM graph (error if it has none), DECODER
        through the decode graph; None (auto) loads the QGEMM graph when the bundle has one and RAM holds it."""
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
        # device (auto|cpu|cuda|tensorrt) -> providers (devices.py); TensorRT gets the bundle's engines per graph
        choice = sessions.device if sessions is not None else device_for_bundle(device, folder)
        sessions = sessions or SessionFactory(threads=threads, device=choice)
        prec = Precision(precision) if precision is not None else None
        # vision: the requested precision when the bundle has it, else its default (there is no int4 vision)
        vis = manifest.pick(
            names.ROLE_VISION, prec if prec in {g.precision for g in manifest.variants(names.ROLE_VISION)} else None
        )
        dec = manifest.pick(names.ROLE_DECODER, prec, _decoder_flavor(manifest, prec, flavor, sessions))
        first = sessions.providers[0]
        if (
            dec.precision == Precision.FP16
            and not allow_cpu_fp16
            and (first[0] if isinstance(first, tuple) else first) == "CPUExecutionProvider"
        ):
            # measured (export/quantize.py): onnxruntime's CPU provider runs fp16 through inserted casts, slower than fp32
            from ..errors import DeviceError

            raise DeviceError(
                "fp16 graphs are for GPU providers (on the CPU provider they decode slower than fp32); "
                "use --device cuda, or --precision fp32/int8/int4 (`skin-offline quantize`) on CPU"
            )
        emb = manifest.pick(
            names.ROLE_EMBEDDINGS,
            prec if prec in {g.precision for g in manifest.variants(names.ROLE_EMBEDDINGS)} else None,
        )
        overflow_notices: tuple[str, ...] = ()
        if vis.kernel == Kernel.QGEMM and overflows_here(vis.details):  # exported before 7-bit codes, no VNNI here
            fp32 = [g for g in manifest.variants(names.ROLE_VISION) if g.precision == Precision.FP32]
            why = f"vision graph {vis.file}'s int8 codes overflow this CPU's int8 kernel (no VNNI)"
            if fp32:
                vis = fp32[0]
                overflow_notices = (f"{why}; using the bundle's fp32 vision graph (slower); re-export the bundle",)
            else:
                overflow_notices = (f"{why}, which blurs image features; re-export the bundle",)
        if dec.kernel == Kernel.QGEMM and overflows_here(dec.details):  # the int8-only tier, exported before
            overflow_notices += (
                f"decoder graph {dec.file}'s int8 codes overflow this CPU's int8 kernel (no VNNI), which degrades "
                f"answers; re-export the bundle",
            )
        table, scales = _load_table(folder, manifest, emb)
        vision = VisionEncoder(
            sessions.create(folder / vis.file, graph_providers(choice, folder, names.ROLE_VISION, vis))
        )
        dec_session = sessions.create(folder / dec.file, graph_providers(choice, folder, names.ROLE_DECODER, dec))
        partner, notices = _multi_row_graph(folder, manifest, dec, None if prefill is None else Prefill(prefill), first)
        gemm = (
            sessions.create(folder / partner.file, graph_providers(choice, folder, names.ROLE_DECODER, partner))
            if partner is not None
            else None
        )
        return cls(
            folder=folder,
            manifest=manifest,
            vision=vision,
            decoder=make_decoder(
                dec_session,
                manifest.model,
                share_buffer=dec.attention is not None and dec.attention.in_place,
                gemm_session=gemm,
            ),
            embeddings=table,
            embedding_scales=scales,
            notices=overflow_notices + notices,
            picked={
                names.ROLE_VISION: vis,
                names.ROLE_DECODER: dec,
                names.ROLE_EMBEDDINGS: emb,
                **({"multi_row": partner} if partner is not None else {}),
            },
        )

    def check_parallel(self, parallel: int) -> None:
        """Refuse `parallel` > 1 on a decoder that takes one length for every row (exported before batching)."""
        dec = (self.picked or {}).get(names.ROLE_DECODER)
        if parallel > 1 and dec is not None and dec.attention == Attention.GQA_UNIFORM:
            raise BundleError(
                f"bundle {self.folder} was exported before batched decoding (its decoder takes one "
                f"length for every row); re-export it with `skin-offline export` to serve requests in "
                f"parallel, or run with parallel 1"
            )

    def embed(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """[n] token ids -> [n, H] float32 rows of the embedding table."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.embeddings.shape[0]):
            raise BundleError(f"token id out of range for a vocabulary of {self.embeddings.shape[0]}")
        rows = np.asarray(self.embeddings[ids], dtype=np.float32)  # [n,H]; fp16 / int8 rows dequantized here
        if self.embedding_scales is not None:
            rows *= self.embedding_scales[ids][:, None]
        return rows


def verify_bundle(folder: Path, log: Any = None) -> Manifest:
    """Full integrity check: every file present, right size, right sha256 (a `hashing` task on `log` when it is a
    progress.Progress)."""
    from ..progress import task

    manifest = Manifest.read(Path(folder))
    with task(log, "hashing", total=sum(e.size for e in manifest.files.values()), unit="B") as t:
        check_files(Path(folder), manifest, hashes=True, on_bytes=t.advance)
    return manifest
