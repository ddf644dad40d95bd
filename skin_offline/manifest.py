"""Typed bundle manifest: what the exporter writes and the runtime reads (schema in names.py).

A bundle can carry several variants of each graph role (precision x flavor); the runtime picks one.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import names
from .errors import BundleError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


class Flavor(str, enum.Enum):
    STANDARD = "standard"  # standard ONNX ops only (portable, TensorRT-compatible)
    CONTRIB = "contrib"  # onnxruntime contrib ops (MatMulNBits, GroupQueryAttention, ...)


class Attention(str, enum.Enum):
    """How a decoder graph keeps its KV cache (decides the runtime's cache strategy)."""

    CONCAT = "concat"  # standard ops: each step concatenates past and new keys into fresh presents
    GQA = "gqa"  # onnxruntime GroupQueryAttention: past and present share one preallocated buffer, written in place;
    # each row's length comes from its mask, so one decode run serves rows of different lengths (batching)
    GQA_UNIFORM = "gqa-uniform"  # the same, exported before per-row lengths: every row of a run has the mask's width

    @property
    def in_place(self) -> bool:
        return self in (Attention.GQA, Attention.GQA_UNIFORM)


class Kernel(str, enum.Enum):
    """The op a graph's weight MatMuls run through; it decides how a call's cost grows with its rows."""

    FLOAT = "float"  # MatMul in the graph's float type (fp32 / fp16)
    NBITS = "nbits"  # MatMulNBits block-quantized weights: fastest for one row (decode), linear in rows
    QGEMM = "qgemm"  # int8 per-channel weights through onnxruntime's int8 GEMM: nearly flat in rows (prefill, batches)


class Prefill(str, enum.Enum):
    """Which weights multi-row decoder calls (prefill chunks, batched decode steps) run through."""

    INT8 = "int8"  # an int8 QGEMM graph (Kernel.QGEMM) beside the decode graph, sharing its KV cache layout
    DECODER = "decoder"  # the decode graph itself


class PadMode(str, enum.Enum):
    PAD = "pad"  # LLaVA's expand2square (what SkinVL was trained with)
    CROP = "crop"  # resize + centre crop only (what MM-Skin's VQA evaluation used)


def _from_dict(cls, d: dict[str, Any]):
    """Keep known keys only (forward-compatible within a schema version)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class ModelDims:
    vocab_size: int  # rows of the embedding table / lm_head
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_context: int  # longest prompt + answer the runtime accepts
    image_tokens: int  # features per image (576 for ViT-L/14-336)
    vision_hidden_size: int

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want_int = f.type in ("int", int)
            if isinstance(v, bool) or not isinstance(v, int if want_int else (int, float)) or v <= 0:
                raise BundleError(
                    f"manifest model.{f.name} is {v!r}, expected a positive "
                    f"{'integer' if want_int else 'number'}; re-export the bundle"
                )
        if self.num_heads % self.num_kv_heads:
            raise BundleError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class PreprocessConfig:
    mode: PadMode = PadMode.PAD
    size: int = 336  # shortest edge after resize
    crop_size: int = 336
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"

    def __post_init__(self):
        object.__setattr__(self, "mode", PadMode(self.mode))
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        if self.resample != "bicubic":
            raise BundleError(f"unsupported resample {self.resample!r}; only 'bicubic' (CLIP's) is implemented")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        # LLaVA fills the square canvas with the mean colour truncated to int: (122, 116, 104) for CLIP.
        return tuple(int(m * 255) for m in self.mean)


@dataclass(frozen=True)
class PromptConfig:
    template: str = "mistral_instruct"


class TokenizerFamily(str, enum.Enum):
    """How tokenizer.json's pieces map to text (decides the runtime's decoding rules)."""

    SENTENCEPIECE = "sentencepiece"  # Llama/Mistral BPE: "▁" for spaces, <0xNN> byte-fallback pieces, dummy prefix
    BYTE_LEVEL = "byte_level"  # GPT-2 style BPE: every piece is bytes through GPT-2's byte-to-unicode table


@dataclass(frozen=True)
class TokenConfig:
    """Control ids, from the checkpoint's tokenizer and model configs (export/tokenizer.py)."""

    bos_id: int = 1
    eos_id: int = 2
    tokenizer_vocab_size: int = 32000  # ids >= this are padding rows of the embedding / lm_head
    family: TokenizerFamily = TokenizerFamily.SENTENCEPIECE
    pad_id: int | None = None  # the checkpoint's pad token (llava-hf adds one past the vocabulary); informational
    control_ids: tuple[int, ...] = ()  # special tokens inside the vocabulary that decoding skips (beyond BOS/EOS)

    def __post_init__(self):
        object.__setattr__(self, "family", TokenizerFamily(self.family))
        object.__setattr__(self, "control_ids", tuple(int(i) for i in self.control_ids))


@dataclass(frozen=True)
class GraphVariant:
    role: str  # names.ROLE_*
    precision: Precision
    flavor: Flavor
    file: str  # relative to the bundle root
    data_files: tuple[str, ...] = ()
    details: dict = field(default_factory=dict)  # e.g. quantization block size
    # decoders only (None elsewhere). Bundles written before these fields existed get them derived from the
    # flavor and the details they did record (details["attention"], details["op"]).
    attention: Attention | None = None
    kernel: Kernel | None = None

    def __post_init__(self):
        object.__setattr__(self, "precision", Precision(self.precision))
        object.__setattr__(self, "flavor", Flavor(self.flavor))
        object.__setattr__(self, "data_files", tuple(self.data_files))
        for f in (self.file, *self.data_files):
            check_relative(f)
        attention, kernel = self.attention, self.kernel
        if attention is None and self.role == names.ROLE_DECODER:
            legacy = self.details.get("attention")
            # a bundle written before these fields: its GroupQueryAttention graphs take one length for every row
            attention = (
                Attention.CONCAT
                if legacy == "standard" or (legacy is None and self.flavor == Flavor.STANDARD)
                else Attention.GQA_UNIFORM
            )
        if kernel is None:
            op = self.details.get("op")
            kernel = (
                Kernel.NBITS
                if op == "MatMulNBits"
                else Kernel.QGEMM
                if op in ("MatMulInteger", "DynamicQuantizeMatMul")
                else Kernel.FLOAT
            )
        object.__setattr__(self, "attention", None if attention is None else Attention(attention))
        object.__setattr__(self, "kernel", Kernel(kernel))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["precision"] = self.precision.value
        d["flavor"] = self.flavor.value
        d["data_files"] = list(self.data_files)
        d["attention"] = None if self.attention is None else self.attention.value
        d["kernel"] = self.kernel.value
        return d


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


def check_relative(name: str) -> None:
    """Refuse file names that could escape the bundle folder (absolute, '..', backslashes)."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or ":" in name:
        raise BundleError(f"manifest names a file outside the bundle: {name!r}; re-export the bundle")


@dataclass(frozen=True)
class Manifest:
    model: ModelDims
    preprocess: PreprocessConfig
    prompt: PromptConfig
    tokens: TokenConfig
    graphs: tuple[GraphVariant, ...]
    files: dict[str, FileEntry]
    source: dict = field(default_factory=dict)
    exporter: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    schema_version: int = names.SCHEMA_VERSION

    @property
    def random_weights(self) -> bool:
        """Exported from a random-weight checkpoint (`make-demo-checkpoint`, the test factory): its answers mean
        nothing, and a ranked diagnosis from it would look real, so every front end says so."""
        return bool(self.source.get(names.SOURCE_RANDOM_WEIGHTS, False))

    def multi_row_partner(self, decoder: GraphVariant) -> GraphVariant | None:
        """The int8 QGEMM decoder that many-row calls of `decoder` run through (Prefill.INT8), if the bundle has
        one: same I/O and GroupQueryAttention KV layout, so either graph continues the other's cache. Only quantized
        decoders have one: an fp32 / fp16 decoder (`--precision fp32` of a --keep-source bundle) runs every call
        through itself, so its answers stay the reference's."""
        if (
            decoder.attention is None
            or not decoder.attention.in_place
            or decoder.kernel == Kernel.QGEMM
            or decoder.precision not in (Precision.INT4, Precision.INT8)
        ):
            return None
        return next(
            (
                g
                for g in self.variants(names.ROLE_DECODER)
                if g.kernel == Kernel.QGEMM and g.attention == decoder.attention
            ),
            None,
        )

    def variants(self, role: str) -> list[GraphVariant]:
        return [g for g in self.graphs if g.role == role]

    def pick(self, role: str, precision: Precision | None = None, flavor: Flavor | None = None) -> GraphVariant:
        """The variant for `role` at `precision` (default: the first listed, i.e. the bundle's default)."""
        cands = self.variants(role)
        if flavor is not None:
            cands = [g for g in cands if g.flavor == flavor] or cands
        if precision is not None:
            exact = [g for g in cands if g.precision == Precision(precision)]
            if not exact:
                have = ", ".join(sorted({g.precision.value for g in self.variants(role)}))
                raise BundleError(
                    f"bundle has no {Precision(precision).value} {role} graph (it has: {have}); "
                    f"make one with `skin-offline quantize`"
                )
            cands = exact
        if not cands:
            raise BundleError(f"bundle has no {role} graph; re-export it with `skin-offline export`")
        return cands[0]

    # --- (de)serialisation ---
    def to_dict(self) -> dict:
        pre = dataclasses.asdict(self.preprocess)
        pre["mode"] = self.preprocess.mode.value
        return {
            names.K_SCHEMA: self.schema_version,
            names.K_MODEL: dataclasses.asdict(self.model),
            names.K_PREPROCESS: pre,
            names.K_PROMPT: dataclasses.asdict(self.prompt),
            names.K_TOKENS: {
                **dataclasses.asdict(self.tokens),
                "family": self.tokens.family.value,
                "control_ids": list(self.tokens.control_ids),
            },
            names.K_GRAPHS: [g.to_dict() for g in self.graphs],
            names.K_FILES: {k: dataclasses.asdict(v) for k, v in sorted(self.files.items())},
            names.K_SOURCE: self.source,
            names.K_EXPORTER: self.exporter,
            names.K_VERIFICATION: self.verification,
            names.K_QUALITY: self.quality,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        version = d.get(names.K_SCHEMA)
        if not isinstance(version, int):
            raise BundleError("manifest has no schema_version; this is not a skin-offline bundle")
        if version > names.SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema {version} is newer than this skin-offline understands "
                f"({names.SCHEMA_VERSION}); upgrade skin-offline"
            )
        try:
            files = {}
            for k, v in d[names.K_FILES].items():
                check_relative(k)
                files[k] = _from_dict(FileEntry, v)
            return cls(
                model=_from_dict(ModelDims, d[names.K_MODEL]),
                preprocess=_from_dict(PreprocessConfig, d[names.K_PREPROCESS]),
                prompt=_from_dict(PromptConfig, d.get(names.K_PROMPT, {})),
                tokens=_from_dict(TokenConfig, d[names.K_TOKENS]),
                graphs=tuple(_from_dict(GraphVariant, g) for g in d[names.K_GRAPHS]),
                files=files,
                source=d.get(names.K_SOURCE, {}),
                exporter=d.get(names.K_EXPORTER, {}),
                verification=d.get(names.K_VERIFICATION, {}),
                quality=d.get(names.K_QUALITY, {}),
                schema_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # e.g. a null section
            raise BundleError(f"manifest is malformed ({type(e).__name__}: {e}); re-export the bundle") from None

    def write(self, folder: Path) -> None:
        (Path(folder) / names.MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = Path(folder) / names.MANIFEST
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise BundleError(
                f"{path} not found; export a bundle with `skin-offline export CHECKPOINT {folder}`"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path} is not valid JSON ({e}); re-export the bundle") from None
        if not isinstance(d, dict):
            raise BundleError(f"{path} is not a manifest object; re-export the bundle")
        return cls.from_dict(d)


def sha256_file(path: Path, chunk: int = 8 << 20, on_bytes=None) -> str:
    """sha256 of a file read in chunks; `on_bytes(n)` after each chunk (progress)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return h.hexdigest()


def file_entry(path: Path, on_bytes=None) -> FileEntry:
    return FileEntry(size=Path(path).stat().st_size, sha256=sha256_file(path, on_bytes=on_bytes))


def folder_entries(folder: Path, log=None) -> dict[str, FileEntry]:
    """Size + sha256 of every file in a bundle folder, with a `hashing` progress task when `log` is a Progress."""
    from .progress import task

    paths = [p for p in sorted(Path(folder).iterdir()) if p.is_file()]
    with task(log, "hashing", total=sum(p.stat().st_size for p in paths), unit="B") as t:
        return {p.name: file_entry(p, on_bytes=t.advance) for p in paths}
