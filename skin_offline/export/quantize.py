"""Streaming quantizer: an fp32 bundle -> a bundle with int4 / int8 / fp16 graph variants.

Why not onnxruntime's `MatMulNBitsQuantizer`: it loads the whole fp32 model (~4.8x its size in RAM,
FINDINGS.md), 140 GB at 7B. Here the graph proto is loaded without its weights, and each initializer is
read alone from the external-data file (seek/read, no mmap, so its pages never count as our RSS),
packed with onnxruntime's own kernels (`quantize_matmul_4bits/8bits`, the ones its quantizer calls) and
appended to the new `.data` file. Peak memory is one fp32 weight plus its packed copy.

Weight MatMuls (`MatMul(x, W[K,N])` with W an initializer) become com.microsoft `MatMulNBits`
(block-wise scales along K, optional zero points). An int4 decoder's layer weights are calibrated by default
(calibrate.py: GPTQ on activations of shipped calibration sequences, run layer by layer as the weights stream);
`--quant-method rtn` rounds to nearest with onnxruntime's own packer. Same stored format either way. int8 is also MatMulNBits (bits=8): measured here
against DynamicQuantizeMatMul on a 4096x14336 GEMV (2 threads) it is as fast (6.2 vs 6.3 ms, fp32 17 ms)
and more accurate (block scales vs per-column), and it keeps one code path.
"""

from __future__ import annotations

import enum
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import names
from ..errors import BundleError, ConfigError, UsageError
from ..manifest import Flavor, GraphVariant, Kernel, Manifest, Precision, Prefill, folder_entries
from ..progress import task
from .atomic import atomic_folder
from .calibrate import MethodSpec, QuantMethod, calibrated_weight
from .calibration import CalibrationSpec
from .codecs import MS_DOMAIN, QGEMM_MAX_CODE, Codec, NBits, QGemm
from .onnx_writer import ExternalData, save

Log = Callable[[str], None]
BLOCK_SIZES = (16, 32, 64, 128, 256)
CHUNK_ROWS = 4096  # embedding rows converted per read (4096 x 4096 x 4 B = 64 MB at 7B)


class EmbeddingPrecision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # symmetric, one float32 scale per row


def _choice(cls: type[enum.Enum], value, flag: str):
    """`value` (an enum member of any str enum, or its string) as a member of `cls`, else a ConfigError naming the flag."""
    value = getattr(value, "value", value)
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{flag} must be one of {', '.join(str(m.value) for m in cls)}, not {value!r}") from None


@dataclass(frozen=True)
class QuantConfig:
    precision: Precision  # decoder weights
    # None = the largest of 128/64/32/16 dividing every quantized input size: 128 for SkinVL (4096, 14336).
    # Measured on the bench preset (7B widths, 4 layers, 2 threads): int4 decode 53.7-61.1 tok/s at block 128
    # vs 52.6-52.9 at 64 and 42.6-45.5 at 32, prefill 201-207 vs 151-154 vs 146-147 tok/s (fp32 scales make
    # block 32 spend 20% of its bytes on scales); 128 is also the group size GPTQ/AWQ int4 models use.
    block_size: int | None = None
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fast VNNI path); 0 = fp32 (int8 weights: ~70x slower)
    # The output projection is the most sensitive MatMul, so it stays above the body's precision: int8 by
    # default for int4/int8 decoders (a quarter of fp32's bytes: at 7B widths the fp32 head alone is 524 MB
    # read per token), fp32 for fp16 decoders.
    lm_head: Precision | None = None
    # None: int8 for int4/int8 decoders (3x faster CLIP-L encode on CPU, the bigger half of the first token's wait),
    # kept only when its image features pass the cosine gate below against the fp32 tower; fp32 for fp16 decoders
    vision: Precision | None = None
    embeddings: EmbeddingPrecision | None = None  # None: int8 for int4/int8 decoders, fp16 for fp16
    # How the decoder's layer weights are rounded (calibrate.py). None: GPTQ for int4 decoders (calibrated on the
    # shipped sequences, measured on the real-weights proxy: README "int4 quality"), round to nearest otherwise.
    method: QuantMethod | None = None
    # Each block's scale chosen by the activation-weighted error on calibration activations instead of absmax.
    # None: on with GPTQ, off with RTN (`--quant-method rtn --scale-search`: calibrated scales, rounded codes).
    # The earlier weight-error search (no calibration) clipped the outlier weights a trained model needs (perplexity
    # +71% at block 32 on the proxy) and is gone; bundles made with it still verify (codecs.NBits.scale_search).
    scale_search: bool | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    # Multi-row calls (prefill chunks, batched decode) through int8 per-column weights and onnxruntime's int8
    # GEMM, single-row decode through the MatMulNBits graph. None: INT8 for int4 decoders (a second, int8 weight
    # set: more disk and RAM, see README "Precision tiers"), DECODER for int8 / fp16 ones. int8 + INT8: one
    # QGEMM graph serves every call (the int8-only tier).
    prefill: Prefill | None = None

    def __post_init__(self):
        flags = {"precision": "--precision", "lm_head": "--lm-head", "vision": "--vision", "embeddings": "--embeddings"}
        if self.lm_head is None:
            object.__setattr__(
                self,
                "lm_head",
                Precision.FP32
                if _choice(Precision, self.precision, "--precision") == Precision.FP16
                else Precision.INT8,
            )
        for k in ("precision", "lm_head", "vision"):
            if getattr(self, k) is not None:
                object.__setattr__(self, k, _choice(Precision, getattr(self, k), flags[k]))
        emb = self.embeddings
        if emb is None:
            emb = EmbeddingPrecision.FP16 if self.precision == Precision.FP16 else EmbeddingPrecision.INT8
        object.__setattr__(self, "embeddings", _choice(EmbeddingPrecision, emb, flags["embeddings"]))
        if self.prefill is not None:  # None: decided by quantize_bundle from the source graph (default_prefill)
            object.__setattr__(self, "prefill", _choice(Prefill, self.prefill, "--prefill"))
        if self.precision == Precision.FP32:
            raise ConfigError("--precision must be int4, int8 or fp16 (the source bundle already is fp32)")
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"--block-size {self.block_size} unsupported; use one of {BLOCK_SIZES}")
        if not 0 <= self.accuracy_level <= 4:
            raise ConfigError(f"--accuracy-level {self.accuracy_level} must be 0..4 (onnxruntime MatMulNBits)")
        if self.lm_head == Precision.FP16 or (self.precision == Precision.FP16 and self.lm_head != Precision.FP32):
            raise ConfigError("--lm-head must be fp32, int8 or int4 (an fp16 decoder keeps its lm_head in fp16)")
        if self.vision == Precision.INT4:
            raise ConfigError("--vision must be fp32, int8 or fp16")
        if self.prefill == Prefill.INT8 and self.precision == Precision.FP16:
            raise ConfigError("--prefill int8 is for CPU bundles (int4/int8); an fp16 decoder prefills through itself")
        if self.method is None:
            calibrate = self.precision == Precision.INT4 and self.symmetric
            object.__setattr__(self, "method", QuantMethod.GPTQ if calibrate else QuantMethod.RTN)
        object.__setattr__(self, "method", _choice(QuantMethod, self.method, "--quant-method"))
        if self.scale_search is None:
            object.__setattr__(self, "scale_search", self.method == QuantMethod.GPTQ)
        if self.calibrated and self.precision not in _BITS:
            raise ConfigError(
                f"--quant-method gptq / --scale-search are for int4/int8 decoders, not {self.precision.value}"
            )
        if self.calibrated and not self.symmetric:
            raise ConfigError(
                "--quant-method gptq and --scale-search work with --symmetric only; "
                "use --quant-method rtn for --asymmetric"
            )

    @property
    def calibrated(self) -> bool:
        """The decoder's layer weights come from the calibrated pass (calibrate.Calibrator)."""
        return self.method == QuantMethod.GPTQ or bool(self.scale_search)

    def method_spec(self) -> MethodSpec:
        return MethodSpec(gptq=self.method == QuantMethod.GPTQ, scale_search=bool(self.scale_search))

    @property
    def vision_defaulted(self) -> bool:
        return self.vision is None

    def resolved_vision(self) -> Precision:
        if self.vision is not None:
            return self.vision
        return Precision.FP32 if self.precision == Precision.FP16 else Precision.INT8

    def default_prefill(self, source: GraphVariant) -> Prefill:
        """INT8 for an int4 decoder built from a GroupQueryAttention graph (the multi-row graph shares its KV
        cache in place); the decoder itself otherwise."""
        return (
            Prefill.INT8
            if self.precision == Precision.INT4 and source.attention is not None and source.attention.in_place
            else Prefill.DECODER
        )

    def details(self, bits_precision: Precision) -> dict:
        d = {
            "block_size": self.block_size,
            "symmetric": self.symmetric,
            "accuracy_level": self.accuracy_level,
            "op": "MatMulNBits",
            "bits": _BITS[bits_precision],
            "method": self.method.value if self.calibrated else QuantMethod.RTN.value,
            "scales": "activation-search" if self.calibrated and self.scale_search else "absmax",
        }
        if self.calibrated:
            d["method_detail"] = self.method_spec().describe()
        return d


_BITS = {Precision.INT4: 4, Precision.INT8: 8}


def bytes_per_weight(bits: int, block_size: int, symmetric: bool) -> float:
    """Theoretical MatMulNBits storage: packed bits + one fp32 scale (+ a packed zero point) per block."""
    zp = 0.0 if symmetric else (bits / 8) / block_size
    return bits / 8 + 4 / block_size + zp


# --- reading one initializer ------------------------------------------------------------------------------
def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def read_tensor(t: TensorProto, folder: Path) -> np.ndarray:
    """One initializer as a NumPy array; external data read with seek/read (never the whole file)."""
    if not is_external(t):
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    length = int(info["length"])
    with open(Path(folder) / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        buf = bytearray(length)  # writable, so NumPy can own it without a copy
        if f.readinto(buf) != length:
            raise BundleError(f"{info['location']} is truncated at tensor {t.name}; re-export the bundle")
    return np.frombuffer(buf, dtype=dtype).reshape(tuple(t.dims))


# --- planning (all checks before any file is written) -----------------------------------------------------
@dataclass(frozen=True)
class GraphSource:
    """An fp32 graph to rewrite: its structure (no weights) and how to read each initializer, from an fp32 bundle's
    external data (`quantize`) or straight from the checkpoint (`export --precision`, onnx_writer.LazyData)."""

    name: str  # the fp32 graph's file name (recorded as the variant's source_file)
    model: onnx.ModelProto
    read: Callable[[TensorProto], np.ndarray]

    @classmethod
    def from_file(cls, path: Path) -> "GraphSource":
        path = Path(path)
        return cls(path.name, onnx.load(str(path), load_external_data=False), lambda t: read_tensor(t, path.parent))

    @classmethod
    def lazy(cls, name: str, model: onnx.ModelProto, data) -> "GraphSource":
        return cls(name, model, lambda t: data.read(t) if is_external(t) else numpy_helper.to_array(t))


@dataclass(frozen=True)
class GraphPlan:
    source: GraphSource
    dst_name: str
    codecs: dict[str, Codec]  # weight initializer name -> how it is stored (export/codecs.py)
    to_fp16: bool = False
    quantized_params: int = 0
    float_params: int = 0
    tensors: int = 0  # initializers to stream
    kernel: Kernel = Kernel.NBITS  # QGEMM: the int8 prefill graph (or the int8-only tier's one graph)


def _weight_matmuls(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """initializer name -> the MatMul that uses it as its 2-D right operand (sole consumer only)."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and len(n.input) == 2:
            w = inits.get(n.input[1])
            if w is not None and len(w.dims) == 2 and uses[w.name] == 1 and w.data_type == TensorProto.FLOAT:
                out[w.name] = n
    return out


def auto_block_size(graphs: list[onnx.ModelProto]) -> int:
    """The largest block size <= 128 that divides the input size K of every weight MatMul in `graphs`."""
    ks = {int(t.dims[0]) for m in graphs for t in m.graph.initializer if t.name in _weight_matmuls(m)}
    return next((b for b in (128, 64, 32, 16) if all(k % b == 0 for k in ks)), 16)


def plan_graph(
    source: GraphSource,
    dst_name: str,
    precision: Precision,
    cfg: QuantConfig,
    lm_head: Precision | None,
    kernel: Kernel = Kernel.NBITS,
) -> GraphPlan:
    """Which weights of `src` get which codec (all checks before any file is written). `kernel` QGEMM: every weight
    MatMul (lm_head included) as int8 per-column for DynamicQuantizeMatMul; NBITS: MatMulNBits at `precision`,
    the lm_head at `lm_head`."""
    model = source.model
    codecs: dict[str, Codec] = {}
    qparams = 0
    if kernel == Kernel.QGEMM or precision in _BITS:
        for wname, node in _weight_matmuls(model).items():
            t = next(t for t in model.graph.initializer if t.name == wname)
            k, n = t.dims
            if kernel == Kernel.QGEMM:
                # a hybrid's prefill graph is smoothed with the calibrated pass's statistics (prefill_gate.smoothed);
                # the int8-only tier's one graph has no such pass before it
                smooth = cfg.calibrated and cfg.precision == Precision.INT4 and calibrated_weight(wname)
                codecs[wname] = QGemm(smooth=smooth)
            else:
                p = lm_head if (lm_head is not None and node.output[0] == names.LOGITS) else precision
                if p not in _BITS:
                    continue
                if k % cfg.block_size:
                    raise UsageError(
                        f"--block-size {cfg.block_size} does not divide the input size {k} of {wname} in {source.name}; "
                        f"use a block size that divides {k}"
                    )
                calibrated = cfg.calibrated and p == precision and calibrated_weight(wname)
                codecs[wname] = NBits(
                    _BITS[p], cfg.block_size, cfg.symmetric, cfg.accuracy_level, calibrated=calibrated
                )
            qparams += k * n
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)
    return GraphPlan(
        source,
        dst_name,
        codecs,
        precision == Precision.FP16,
        qparams,
        total - qparams,
        len(model.graph.initializer),
        kernel,
    )


# --- rewriting one graph --------------------------------------------------------------------------------
def quantize_graph(
    plan: GraphPlan, out_dir: Path, cfg: QuantConfig, on_tensor: Callable[[], None] | None = None, calibrator=None
) -> tuple[str, str]:
    """Write plan.dst_name (+ .data) into out_dir, streaming each initializer. Returns (graph, data) names."""
    return quantize_graphs([plan], out_dir, on_tensor, calibrator)[0]


@dataclass
class _Writing:
    plan: GraphPlan
    model: onnx.ModelProto
    data: ExternalData
    keep_fp32: set
    matmuls: dict
    inits: list = field(default_factory=list)
    replaced: dict = field(default_factory=dict)  # MatMul node name -> its codec's nodes


def quantize_graphs(
    plans: list[GraphPlan], out_dir: Path, on_tensor: Callable[[], None] | None = None, calibrator=None
) -> list[tuple[str, str]]:
    """Write every plan's graph (+ .data) into out_dir from their one source, reading each initializer once (from the
    fp32 bundle, or from the checkpoint) and handing it to every plan: copied, cast to fp16, or encoded by its codec
    (codecs.py); a calibrated codec packs the codes `calibrator` (calibrate.Calibrator) made for that weight, which
    runs the calibrated pass layer by layer as the weights come. Memory: one fp32 tensor and its encodings (+ the
    calibrated pass's one layer). Returns (graph, data) names per plan; `on_tensor()` after each initializer."""
    source = plans[0].source
    if any(p.source is not source for p in plans):
        raise ValueError("quantize_graphs: every plan must rewrite the same source graph")
    writing = []
    for plan in plans:
        model = onnx.ModelProto()
        model.CopyFrom(source.model)  # structure only: the weights are external (or still unread)
        keep = set()
        if plan.to_fp16:
            model, keep = convert_graph_fp16(model)
        writing.append(
            _Writing(
                plan,
                model,
                ExternalData(Path(out_dir) / names.external_data_name(plan.dst_name)),
                keep,
                _weight_matmuls(model),
            )
        )
    for t in source.model.graph.initializer:
        if on_tensor is not None:
            on_tensor()
        arr = source.read(t)  # fp32 [K,N] for a weight MatMul
        for w in writing:
            codec = w.plan.codecs.get(t.name)
            if codec is None:
                a = arr
                if w.plan.to_fp16 and a.dtype == np.float32 and t.name not in w.keep_fp32:
                    a = np.clip(a, -65504, 65504).astype(np.float16)  # the fp16 range (masks stay finite)
                w.inits.append(
                    w.data.add(t.name, a)
                    if a.nbytes >= 1024
                    else numpy_helper.from_array(np.ascontiguousarray(a), t.name)
                )
                continue
            if getattr(codec, "calibrated", False):
                if calibrator is None:
                    raise ValueError(f"{t.name}: a calibrated codec needs the calibrated pass (calibrator)")
                tensors = codec.pack(t.name, *calibrator.take(t.name))
            else:
                tensors = codec.encode(t.name, arr)
            w.inits += [w.data.add(name, x) for name, x in tensors]
            mm = w.matmuls[t.name]
            k, n = t.dims
            w.replaced[mm.name] = codec.nodes(mm.input[0], mm.output[0], mm.name, tensors, k, n)
            del tensors
        del arr
    out = []
    for w in writing:
        w.data.close()
        _rewrite(w.model, w.inits, w.replaced)
        save(w.model, Path(out_dir) / w.plan.dst_name)
        out.append((w.plan.dst_name, names.external_data_name(w.plan.dst_name)))
    return out


def _rewrite(model: onnx.ModelProto, inits: list, replaced: dict) -> None:
    """`model` in place: its weight MatMuls replaced by their codecs' nodes, its initializers by `inits`."""
    nodes = [m for n in model.graph.node for m in (replaced.get(n.name, [n]) if n.op_type == "MatMul" else [n])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    if replaced and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def encode_cut(plan: GraphPlan, cut: onnx.ModelProto) -> onnx.ModelProto:
    """A cut of the plan's fp32 source (subgraph.DecoderGraph.cut: one layer, or the head) as the graph `plan`
    writes would have it, its weights read, encoded and held inline: how prefill_gate runs a graph before (and
    instead of) writing it. Memory: that cut's encoded weights (one layer). Plans whose encodings need the whole
    pass (fp16 casts, calibrated codes) are not cut this way."""
    if plan.to_fp16 or any(getattr(c, "calibrated", False) for c in plan.codecs.values()):
        raise ValueError(f"encode_cut: {plan.dst_name} needs the whole-graph pass (fp16 or calibrated codecs)")
    matmuls = _weight_matmuls(cut)
    inits: list[TensorProto] = []
    replaced: dict[str, list[onnx.NodeProto]] = {}
    for t in cut.graph.initializer:
        arr = plan.source.read(t)
        codec = plan.codecs.get(t.name)
        if codec is None:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), t.name))
            continue
        tensors = codec.encode(t.name, arr)
        del arr
        inits += [numpy_helper.from_array(x, name) for name, x in tensors]
        mm = matmuls[t.name]
        k, n = t.dims
        replaced[mm.name] = codec.nodes(mm.input[0], mm.output[0], mm.name, tensors, k, n)
    out = onnx.ModelProto()
    out.CopyFrom(cut)  # structure and external references only: small
    _rewrite(out, inits, replaced)
    return out


# --- fp16 (GPU providers) ---------------------------------------------------------------------------------
# ops an fp32 island extends through (RoPE angle and RMSNorm arithmetic); never a MatMul: weights go fp16
_ISLAND_OPS = frozenset({"Unsqueeze", "Concat", "Mul", "Cos", "Sin", "Pow", "ReduceMean", "Add", "Sqrt", "Div"})


def convert_graph_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """Retype a graph to fp16 (I/O, KV cache, weights), keeping two fp32 islands where fp16 breaks the math.

    - RoPE angles: positions (int) x inv_freq in fp16 carry ~1 rad error at position 2000 (ulp 1-2), so the
      Cast(int->float) chain up to Cos/Sin stays fp32;
    - RMSNorm: x^2 overflows fp16 above |x| = 256 (Mistral's residual stream has such outliers), so the
      Pow/ReduceMean/Sqrt/Div/Mul pattern runs on an fp32 copy of x, as transformers' MistralRMSNorm does.
    A Cast to fp16 is inserted wherever an fp32-island tensor feeds the rest. Returns (model, names of
    initializers that stay fp32). Hand-written because onnxconverter-common's converter would keep both
    patterns in fp16 (its block list is per op type, and Mul/Div/Pow also appear in fp16-safe places).
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    float_inits = {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    int_inputs = {vi.name for vi in g.input if vi.type.tensor_type.elem_type == TensorProto.INT64}
    for vi in (*g.input, *g.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    del g.value_info[:]
    rms_inputs = {n.input[0] for n in g.node if n.op_type == "Pow"}
    island: set[str] = set()  # tensors computed in fp32
    keep: set[str] = set()
    casts: dict[str, str] = {}  # (tensor -> its converted copy), each Cast made once
    nodes: list[onnx.NodeProto] = []

    def cast(x: str, to: int, suffix: str) -> str:
        if x + suffix not in casts:
            casts[x + suffix] = x + suffix
            nodes.append(helper.make_node("Cast", [x], [x + suffix], name="n_" + x + suffix, to=to))
        return casts[x + suffix]

    for n in g.node:
        if n.op_type in ("Pow", "Div") and n.input[0] in rms_inputs:  # RMSNorm reads an fp32 copy of x
            n.input[0] = cast(n.input[0], TensorProto.FLOAT, "_f32")
            island.add(n.input[0])
        to_float = n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)
        seed = to_float and n.input[0] in int_inputs  # positions -> RoPE angles
        stays = (
            n.op_type in _ISLAND_OPS
            and any(i in island for i in n.input)
            and all(i in island or i in inits for i in n.input if i)
        )
        if seed or stays:
            island.update(n.output)
            keep.update(i for i in n.input if i in float_inits)
        else:
            for j, i in enumerate(n.input):
                if i in island:  # leaving the island: back to fp16
                    n.input[j] = cast(i, TensorProto.FLOAT16, "_f16")
            if to_float:
                next(a for a in n.attribute if a.name == "to").i = TensorProto.FLOAT16
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return model, keep


# --- embedding table --------------------------------------------------------------------------------------
def _npy_reader(path: Path):
    """(file handle positioned at the data, shape, dtype) of a C-order .npy file."""
    f = open(path, "rb")
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise BundleError(f"{path.name} is Fortran-ordered; re-export the bundle")
    return f, shape, dtype


def _npy_writer(path: Path, shape: tuple, dtype):
    f = open(path, "wb")
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    )
    return f


def quantize_embeddings(src: Path, out_dir: Path, precision: EmbeddingPrecision) -> tuple[str, tuple[str, ...]]:
    """[V,H] fp32 table file -> fp16 table, or int8 table + [V] fp32 per-row scales (symmetric), in row chunks."""
    fin, (v, h), dtype = _npy_reader(src)
    if dtype != np.float32:
        raise BundleError(f"{src.name} is {dtype}, expected float32; quantize from an fp32 bundle")
    with fin:
        return quantize_table(
            lambda r0, rows: np.frombuffer(fin.read(rows * h * 4), np.float32).reshape(rows, h),
            v,
            h,
            out_dir,
            precision,
        )


def quantize_table(
    rows_at: Callable[[int, int], np.ndarray], v: int, h: int, out_dir: Path, precision: EmbeddingPrecision
) -> tuple[str, tuple[str, ...]]:
    """The token table, read `rows_at(first, count)` ([count,H] fp32) in order, written at `precision` (fp16, or int8
    + per-row scales); from an fp32 bundle's file or straight from the checkpoint. Returns (table, (scales,))."""
    table_name = names.variant_file(names.EMBEDDINGS, precision.value)
    out_dtype = np.float16 if precision == EmbeddingPrecision.FP16 else np.int8
    scales = np.empty(v, np.float32) if precision == EmbeddingPrecision.INT8 else None
    with _npy_writer(Path(out_dir) / table_name, (v, h), out_dtype) as fout:
        for r0 in range(0, v, CHUNK_ROWS):
            rows = min(CHUNK_ROWS, v - r0)
            chunk = rows_at(r0, rows)  # [r,H]
            if scales is None:
                fout.write(chunk.astype(np.float16).tobytes())
                continue
            s = np.abs(chunk).max(axis=1) / 127.0  # [r]
            s[s == 0] = 1.0
            scales[r0 : r0 + rows] = s
            fout.write(np.clip(np.rint(chunk / s[:, None]), -127, 127).astype(np.int8).tobytes())
    if scales is None:
        return table_name, ()
    scales_name = names.embedding_scales_file(precision.value)
    np.save(Path(out_dir) / scales_name, scales)
    return table_name, (scales_name,)


def embedding_variant(precision: EmbeddingPrecision, efile: str, edata: tuple[str, ...]) -> GraphVariant:
    return GraphVariant(
        names.ROLE_EMBEDDINGS,
        Precision(precision.value),
        Flavor.STANDARD,
        efile,
        edata,
        {"scales": "per_row_symmetric"} if edata else {},
    )


# --- the bundle -------------------------------------------------------------------------------------------
@dataclass
class QuantResult:
    manifest: Manifest
    seconds: float
    plans: list[GraphPlan] = field(default_factory=list)


# The default int8 tower is kept only when its image features stay this close to the fp32 tower's on the probe
# images (min over images of the cosine of the flattened [N,H] features). Measured here on random weights of the
# full CLIP-L/336 + projector: 0.9997-0.9998 with 8-bit codes, 0.99881 with today's 7-bit ones (codecs.py: exact on
# CPUs without VNNI), so that random tower now keeps fp32; a real checkpoint that falls below keeps its fp32 tower
# (2-3x slower to encode) rather than ship features nobody measured.
VISION_INT8_MIN_COSINE = 0.999


def vision_feature_cosine(fp32_graph: Path, int8_graph: Path, pre, seeds=(0, 1, 2)) -> float:
    """min over the quality report's probe images of cosine(fp32 features, int8 features)."""
    from ..runtime.image import preprocess
    from ..runtime.sessions import SessionFactory
    from ..runtime.vision import VisionEncoder
    from .quality import probe_image

    make = SessionFactory()
    ref, got = VisionEncoder(make.create(fp32_graph)), VisionEncoder(make.create(int8_graph))
    cos = []
    for seed in seeds:
        pixels = preprocess(probe_image(seed), pre)
        a, b = (e.encode(pixels).reshape(-1).astype(np.float64) for e in (ref, got))
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return min(cos)


def write_vision(
    src_graph: Path, vis32: GraphVariant, out_dir: Path, cfg: QuantConfig, gated: bool, pre, log: Log
) -> GraphVariant | None:
    """The vision tower at `cfg.vision` (int8 / fp16) written next to its fp32 graph `src_graph`, streamed one weight
    at a time like the decoder (bounded memory: CLIP-L is 1.2 GB at fp32 whatever the LLM). int8 is the QGEMM codec
    (int8 per-column weights, activations quantized per call: DynamicQuantizeMatMul, the op onnxruntime's own dynamic
    quantizer ends up with after fusion; MatMulNBits is slow at the encoder's 577 rows). Measured on CLIP ViT-L/336
    (random weights, 2 threads): 0.72 s vs 2.15 s fp32. A `gated` (default) int8 tower is kept only when its features
    pass VISION_INT8_MIN_COSINE against the fp32 one; returns None (its files removed) when it does not."""
    precision, kernel = (Precision.INT8, Kernel.QGEMM) if cfg.vision == Precision.INT8 else (cfg.vision, Kernel.NBITS)
    plan = plan_graph(
        GraphSource.from_file(src_graph),
        names.variant_file(names.VISION_GRAPH, precision.value),
        precision,
        cfg,
        None,
        kernel=kernel,
    )
    (g,) = write_plans([plan], out_dir, cfg, {src_graph.name: vis32}, log)
    if precision != Precision.INT8:
        return g
    cos = vision_feature_cosine(src_graph, Path(out_dir) / g.file, pre)
    if gated and cos < VISION_INT8_MIN_COSINE:
        log(
            f"vision int8 rejected: image-feature cosine {cos:.5f} < {VISION_INT8_MIN_COSINE} against the fp32 tower on "
            f"the probe images; the bundle keeps the fp32 tower (--vision int8 forces it)"
        )
        for f in (g.file, *g.data_files):
            (Path(out_dir) / f).unlink()
        return None
    # contrib ops (TensorRT's parser has none): CONTRIB keeps build-engines on the fp32/fp16 tower
    return replace(g, details={**g.details, "feature_cosine_min": round(cos, 6)})


def _copy_variant(src_dir: Path, g: GraphVariant, tmp: Path) -> None:
    for f in (g.file, *g.data_files):
        shutil.copyfile(src_dir / f, tmp / f)  # sendfile: bytes never pass through our memory


def _variant(
    plan: GraphPlan, gfile: str, dfile: str, cfg: QuantConfig, source: GraphVariant, calibrator=None
) -> GraphVariant:
    """The manifest entry of a graph `quantize_graph` wrote from `source` (an fp32 variant)."""
    details: dict = {"source_file": plan.source.name}
    kernels = {c.kernel for c in plan.codecs.values()}
    if kernels == {Kernel.QGEMM}:
        precision, kernel = Precision.INT8, Kernel.QGEMM
        details.update(
            op="DynamicQuantizeMatMul",
            weights="int8 per-column",
            max_code=QGEMM_MAX_CODE,  # 7-bit codes: exact on CPUs without VNNI (runtime/kernels/policy.py)
            activations="uint8 dynamic per-tensor",
        )
        smooth = [c for c in plan.codecs.values() if isinstance(c, QGemm) and c.act_absmax is not None]
        if smooth:  # SmoothQuant on the weights the calibrated pass saw (prefill_gate.smoothed)
            details["smoothing"] = {"alpha": smooth[0].alpha, "weights": len(smooth), "statistics": "calibrated pass"}
    elif kernels:
        precision = cfg.precision if source.role == names.ROLE_DECODER else cfg.vision
        kernel = Kernel.NBITS
        details.update(cfg.details(precision))
        if source.role == names.ROLE_DECODER:
            details["lm_head"] = cfg.lm_head.value
        if any(getattr(c, "calibrated", False) for c in plan.codecs.values()) and calibrator is not None:
            details["calibration"] = calibrator.record()
        else:
            details.update(method=QuantMethod.RTN.value, scales="absmax")
            details.pop("method_detail", None)
    else:  # fp16
        precision = cfg.precision if source.role == names.ROLE_DECODER else cfg.vision
        kernel = Kernel.FLOAT
    # contrib ops make the graph contrib-flavored; `attention` keeps what the source used, since the runtime
    # picks its KV-cache strategy (share-buffer GroupQueryAttention or plain Concat) from it
    return GraphVariant(
        source.role,
        precision,
        Flavor.CONTRIB if kernels else source.flavor,
        gfile,
        (dfile,),
        details,
        attention=source.attention,
        kernel=kernel,
    )


def decoder_plans(
    cfg: QuantConfig, source: GraphSource, dec32: GraphVariant, where: str
) -> tuple[QuantConfig, list[GraphPlan]]:
    """The config with its defaults resolved for this fp32 decoder (block size, prefill) and the decoder graphs to
    write from it: the `cfg.precision` decoder and, with Prefill.INT8, the int8 QGEMM graph for many-row calls.
    Every check (block sizes, shapes) happens here, before a byte is written. Shared by `quantize` and `export`."""
    if cfg.block_size is None:
        cfg = replace(cfg, block_size=auto_block_size([source.model]))
    if cfg.prefill is None:
        cfg = replace(cfg, prefill=cfg.default_prefill(dec32))
    elif cfg.prefill == Prefill.INT8 and not (dec32.attention and dec32.attention.in_place):
        raise UsageError(
            f"--prefill int8 needs the contrib (GroupQueryAttention) fp32 decoder, which {where} lacks; "
            f"re-export it (the default) or use --prefill decoder"
        )
    qgemm_decoder = cfg.prefill == Prefill.INT8 and cfg.precision == Precision.INT8  # int8-only: one QGEMM graph
    plans = []
    if not qgemm_decoder:
        plans.append(
            plan_graph(
                source,
                names.variant_file(names.DECODER_GRAPH, cfg.precision.value),
                cfg.precision,
                cfg,
                cfg.lm_head if cfg.precision in _BITS else None,
            )
        )
    if cfg.prefill == Prefill.INT8:  # the multi-row graph: same source graph, every weight int8 per column
        plans.append(
            plan_graph(
                source,
                names.kernel_variant_file(names.DECODER_GRAPH, "int8", Kernel.QGEMM.value),
                Precision.INT8,
                cfg,
                None,
                kernel=Kernel.QGEMM,
            )
        )
    return cfg, plans


def write_plans(
    plans: list[GraphPlan], out_dir: Path, cfg: QuantConfig, sources: dict[str, GraphVariant], log: Log, calibrator=None
) -> list[GraphVariant]:
    """Write the planned graphs, those of one source in one pass over its weights; their manifest entries
    (`sources`: fp32 variant by file name). `calibrator`: the calibrated pass for plans with calibrated codecs."""
    graphs = []
    groups: dict[int, list[GraphPlan]] = {}
    for plan in plans:
        groups.setdefault(id(plan.source), []).append(plan)
    for group in groups.values():
        what = " + ".join(p.dst_name for p in group)
        log(f"writing {what} ({sum(p.quantized_params for p in group) / 1e6:.1f}M params packed) ...")
        with task(log, what, total=group[0].tensors, unit="tensors") as t:
            written = quantize_graphs(group, out_dir, on_tensor=t.advance, calibrator=calibrator)
        graphs += [_variant(p, g, d, cfg, sources[p.source.name], calibrator) for p, (g, d) in zip(group, written)]
    return graphs


def _gate_prefill(
    graphs: list[GraphVariant],
    deferred: GraphPlan | None,
    forced: bool,
    write: Callable[[GraphPlan], GraphVariant],
    tmp: Path,
    src: Path,
    m: Manifest,
    dec32: GraphVariant,
    vis32: GraphVariant,
    emb32: GraphVariant,
    threads: int | None,
    log: Log,
) -> list[GraphVariant]:
    """prefill_gate.gate_prefill with the source bundle's fp32 graphs as the reference."""
    from ..runtime.bundle import _load_table
    from ..runtime.tokenizer import TextTokenizer
    from .layerstream import GraphStack
    from .prefill_gate import gate_prefill, probe_groups

    def groups():
        table, _ = _load_table(src, m, emb32)
        return probe_groups(
            TextTokenizer.from_file(src / names.TOKENIZER, m.tokens),
            lambda ids: np.asarray(table[np.asarray(ids, np.int64)], np.float32),
            src / vis32.file,
            m.preprocess,
            threads,
        )

    return gate_prefill(
        graphs, deferred, forced, write, tmp, GraphStack(src / dec32.file, threads), groups, threads, log
    )


def quantize_bundle(
    src: Path,
    out: Path,
    cfg: QuantConfig,
    *,
    quality: bool = True,
    log: Log = print,
    probe_kw: dict | None = None,
    keep_source: bool = False,
) -> QuantResult:
    """Read the fp32 bundle `src`, write a bundle at `out` (atomically) carrying the cfg's variants, listed first
    (the defaults); with `keep_source` the source's variants follow (`ask --precision fp32` still works)."""
    from ..runtime.bundle import check_files

    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise UsageError("quantize writes a new bundle: OUT must differ from BUNDLE")
    m = Manifest.read(src)
    check_files(src, m, hashes=False)
    try:
        vis32 = m.pick(names.ROLE_VISION, Precision.FP32)
        # int4/int8 from the contrib (GroupQueryAttention) fp32 graph when there is one: the runtime's fast path;
        # fp16 from the standard graph (GPU providers and TensorRT run standard ops)
        dec32 = m.pick(
            names.ROLE_DECODER, Precision.FP32, Flavor.CONTRIB if cfg.precision in _BITS else Flavor.STANDARD
        )
        emb32 = m.pick(names.ROLE_EMBEDDINGS, Precision.FP32)
    except BundleError:
        raise BundleError(
            f"{src} has no fp32 graphs to quantize from; quantize the bundle `skin-offline export` wrote"
        ) from None
    vision_gated = cfg.vision_defaulted  # a default int8 tower must earn its place (cosine gate below)
    cfg = replace(cfg, vision=cfg.resolved_vision())
    dec_source = GraphSource.from_file(src / dec32.file)
    prefill_forced = cfg.prefill == Prefill.INT8  # asked for by name: kept whatever prefill_gate measures
    cfg, plans = decoder_plans(cfg, dec_source, dec32, str(src))
    from .prefill_gate import defer_prefill, smoothed

    first, deferred = defer_prefill(plans)

    if Precision.FP16 in (cfg.precision, cfg.vision):
        # measured here (2 cores, decode tok/s, interleaved medians): hidden-512 model fp16 18.9 vs fp32 20.7; tiny 111 vs 221
        log(
            "note: fp16 graphs are for GPU providers; the CPU runtime refuses them (onnxruntime's CPU provider runs "
            "fp16 through inserted casts, slower than fp32); use int8/int4 for a smaller CPU bundle"
        )
    with atomic_folder(out) as tmp:
        shutil.copyfile(src / names.TOKENIZER, tmp / names.TOKENIZER)
        calibrator = None
        if cfg.calibrated:  # the calibrated pass over the fp32 graph's own weights (calibrate.BundleLayers)
            from ..runtime.bundle import _load_table
            from ..runtime.tokenizer import TextTokenizer
            from .calibrate import BundleLayers
            from .calibration import build_calibrator

            layers = BundleLayers(m.model, dec_source)
            table, _ = _load_table(src, m, emb32)
            calibrator = build_calibrator(
                cfg,
                layers,
                layers.weights,
                lambda ids: np.asarray(table[np.asarray(ids, np.int64)], np.float32),
                TextTokenizer.from_file(src / names.TOKENIZER, m.tokens),
                src / vis32.file,
                m.preprocess,
                (probe_kw or {}).get("threads"),
                log,
            )
        graphs = write_plans(first, tmp, cfg, {dec32.file: dec32}, log, calibrator)
        if calibrator is not None:
            deferred = smoothed(deferred, calibrator.act_absmax)
        del calibrator
        graphs = _gate_prefill(
            graphs,
            deferred,
            prefill_forced,
            lambda p: write_plans([p], tmp, cfg, {dec32.file: dec32}, log)[0],
            tmp,
            src,
            m,
            dec32,
            vis32,
            emb32,
            (probe_kw or {}).get("threads"),
            log,
        )
        # the fp32 vision graph stays next to an fp16 one (the CPU provider refuses fp16) and as the default; an int8
        # one replaces it (runs everywhere onnxruntime does; --keep-source carries fp32 too) unless it fails the gate
        vis = (
            write_vision(src / vis32.file, vis32, tmp, cfg, vision_gated, m.preprocess, log)
            if cfg.vision != Precision.FP32
            else None
        )
        if vis is not None:
            graphs.append(vis)
        if vis is None or vis.precision != Precision.INT8 or keep_source:
            _copy_variant(src, vis32, tmp)
            graphs.append(vis32)  # after a quantized vision variant, which is then the default
        if keep_source:  # the source's variants ride along after the new ones (emb32 is copied below if fp32)
            for g in m.graphs:
                if g != vis32 and not (g == emb32 and cfg.embeddings == EmbeddingPrecision.FP32):
                    _copy_variant(src, g, tmp)
        log(f"writing {cfg.embeddings.value} embedding table ...")
        if cfg.embeddings == EmbeddingPrecision.FP32:
            _copy_variant(src, emb32, tmp)
            graphs.append(emb32)
        else:
            efile, edata = quantize_embeddings(src / emb32.file, tmp, cfg.embeddings)
            graphs.append(embedding_variant(cfg.embeddings, efile, edata))
        # role order in the manifest: vision variants, decoder, embeddings (first of a role = default)
        order = {names.ROLE_VISION: 0, names.ROLE_DECODER: 1, names.ROLE_EMBEDDINGS: 2}
        if keep_source:
            graphs += [g for g in m.graphs if g not in graphs]
        graphs.sort(key=lambda g: order.get(g.role, 3))  # stable: new variants stay ahead of the source's
        files = folder_entries(tmp, log)
        manifest = Manifest(
            **{
                **m.__dict__,
                "graphs": tuple(graphs),
                "files": files,
                "quality": {},
                "source": {
                    **m.source,
                    "quantized_from": {
                        "bundle": str(src.resolve()),
                        "files": {k: v.sha256 for k, v in m.files.items()},
                    },
                },
            }
        )
        manifest.write(tmp)
        if quality:  # against the source's fp32 graphs, cut per layer: bounded memory at any size (quality.py)
            from .quality import quality_report

            report = quality_report(src, tmp, **(probe_kw or {}), log=log)
            manifest = Manifest(**{**manifest.__dict__, "quality": report})
            manifest.write(tmp)
    dt = time.perf_counter() - t0
    size = sum(e.size for e in manifest.files.values())
    log(f"bundle written to {out} ({size / 1e6:.1f} MB) in {dt:.1f}s")
    return QuantResult(manifest, dt, plans)
