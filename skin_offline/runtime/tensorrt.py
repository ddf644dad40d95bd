"""TensorRT engines stored in a bundle: optimization profiles, the manifest record, the hardware check.

Engines are built and run through onnxruntime's TensorRT execution provider with its engine cache pointed
into the bundle (`engines/<role>/`), not through the `tensorrt` Python API: no extra dependency beyond
onnxruntime-gpu + TensorRT's libraries, the same session code as CPU/CUDA (feeds, IO names, the decoder
loop), and nodes TensorRT rejects fall back to CUDA inside one session instead of failing. The profiles are
passed as `trt_profile_min/opt/max_shapes`; onnxruntime compares them with the cached `.profile` file and
would rebuild on a mismatch, so load passes exactly the recorded strings.

A serialized engine only runs on the GPU architecture and TensorRT version that built it, and onnxruntime
would silently spend minutes rebuilding into the bundle. `check_compatible` refuses that with a clear message.

Record under the manifest's raw key "tensorrt" (the typed Manifest keeps known keys only, so it is read
from manifest.json here); engine files are listed in the manifest's `files` like any other bundle file.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import names
from ..errors import DeviceError
from ..manifest import ModelDims

MANIFEST_KEY = "tensorrt"
ENGINE_DIR = "engines"
PREFILL_OPT_TEXT = 32  # typical question length (tokens) the prefill profile is tuned for
DECODE_OPT_NEW = 128  # typical answer length the decode profile is tuned for


# --- optimization profiles -----------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """min/opt/max shape per dynamic input (one TensorRT optimization profile)."""

    shapes: dict  # input name -> (min, opt, max), each a tuple of ints


def decoder_profiles(dims: ModelDims, max_context: int, max_batch: int = 1) -> list[Profile]:
    """Prefill (S >= 1 new tokens after P >= 0 cached, for prompts and follow-up turns) and decode (S = 1).

    inputs_embeds [B,S,H], attention_mask [B,P+S], position_ids [B,S], past k/v [B,kvH,P,D].
    """
    if max_context < 2:
        raise DeviceError(f"--max-context {max_context} is too small; use at least the prompt length (~600)")
    H, kvH, D, B = dims.hidden_size, dims.num_kv_heads, dims.head_dim, max_batch
    prompt = min(dims.image_tokens + PREFILL_OPT_TEXT, max_context - 1)
    past_opt = min(prompt + DECODE_OPT_NEW // 2, max_context - 1)

    def shapes(s: tuple[int, int, int], total: tuple[int, int, int], past: tuple[int, int, int]) -> Profile:
        # each argument: (min, opt, max)
        d = {
            names.INPUTS_EMBEDS: tuple((b, x, H) for b, x in zip((1, 1, B), s)),
            names.ATTENTION_MASK: tuple((b, x) for b, x in zip((1, 1, B), total)),
            names.POSITION_IDS: tuple((b, x) for b, x in zip((1, 1, B), s)),
        }
        for i in range(dims.num_layers):
            for n in (names.past_key(i), names.past_value(i)):
                d[n] = tuple((b, kvH, x, D) for b, x in zip((1, 1, B), past))
        return Profile(d)

    prefill = shapes(s=(1, prompt, max_context), total=(1, prompt, max_context), past=(0, 0, max_context - 1))
    decode = shapes(s=(1, 1, 1), total=(2, past_opt + 1, max_context), past=(1, past_opt, max_context - 1))
    return [prefill, decode]


def vision_profiles(image_size: int, max_batch: int = 1) -> list[Profile]:
    s = image_size
    return [Profile({names.PIXEL_VALUES: ((1, 3, s, s), (1, 3, s, s), (max_batch, 3, s, s))})]


def profile_options(profiles: list[Profile]) -> dict[str, str]:
    """onnxruntime's format: "name:1x2x3,name2:..."; a name repeated k times defines it in k profiles."""
    out = {}
    for key, idx in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1), ("trt_profile_max_shapes", 2)):
        out[key] = ",".join(f"{n}:{'x'.join(map(str, shp[idx]))}" for p in profiles for n, shp in p.shapes.items())
    return out


def provider_options(
    cache_dir: Path,
    profiles: list[Profile],
    *,
    fp16: bool,
    int8: bool = False,
    workspace_gb: float = 4.0,
    calibration_table: str | None = None,
) -> dict:
    """TensorrtExecutionProvider options for one graph whose engines live in `cache_dir`."""
    opts = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": str(bool(fp16)),
        "trt_int8_enable": str(bool(int8)),
        "trt_max_workspace_size": str(int(workspace_gb * (1 << 30))),
        **profile_options(profiles),
    }
    if int8 and calibration_table:
        opts["trt_int8_calibration_table_name"] = calibration_table
    return opts


# --- the hardware that builds / runs engines -----------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"
    memory_bytes: int = 0


def gpu_info() -> GpuInfo | None:
    """GPU 0 via the CUDA driver library (desktop and Jetson alike), else nvidia-smi; None without a GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev, major, minor, mem = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t()
        buf = ctypes.create_string_buffer(256)
        if cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0:
            cuda.cuDeviceGetName(buf, 256, dev)
            cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
            total = getattr(cuda, "cuDeviceTotalMem_v2", None)
            if total is not None:
                total(ctypes.byref(mem), dev)
            return GpuInfo(buf.value.decode(errors="replace"), f"{major.value}.{minor.value}", int(mem.value))
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                .stdout.strip()
                .splitlines()
            )
            if out:
                name, cc, mem_mib = (x.strip() for x in out[0].split(","))
                return GpuInfo(name, cc, int(float(mem_mib)) << 20)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    return None


def decode_trt_version(v: int) -> str:
    """getInferLibVersion(): TensorRT >= 10 encodes major*10000+minor*100+patch, older major*1000+minor*100+patch."""
    if v >= 10000:
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def tensorrt_version() -> str | None:
    """The TensorRT library onnxruntime will load (libnvinfer), or None when it is absent."""
    for lib in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            return decode_trt_version(int(ctypes.CDLL(lib).getInferLibVersion()))
        except (OSError, AttributeError):
            continue
    return None


# --- the record in the manifest ------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRecord:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnxruntime_version: str
    fp16: bool
    int8: bool
    max_context: int
    max_batch: int
    workspace_gb: float
    graphs: dict = field(default_factory=dict)  # role -> {"file", "precision", "cache_dir", "profiles": [...]}

    @classmethod
    def from_dict(cls, d: dict) -> "EngineRecord":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def profiles(self, role: str) -> list[Profile]:
        return [
            Profile({n: tuple(tuple(s) for s in shp) for n, shp in p.items()}) for p in self.graphs[role]["profiles"]
        ]

    def options(self, folder: Path, role: str, calibration_table: str | None = None) -> dict:
        g = self.graphs[role]
        return provider_options(
            Path(folder) / g["cache_dir"],
            self.profiles(role),
            fp16=self.fp16,
            int8=self.int8,
            workspace_gb=self.workspace_gb,
            calibration_table=calibration_table,
        )


def read_record(folder: Path) -> EngineRecord | None:
    raw = json.loads((Path(folder) / names.MANIFEST).read_text())
    rec = raw.get(MANIFEST_KEY) if isinstance(raw, dict) else None
    return EngineRecord.from_dict(rec) if isinstance(rec, dict) else None


def check_compatible(record: EngineRecord | None, trt_version: str | None, gpu: GpuInfo | None, folder: Path) -> None:
    """Refuse engines built for another GPU architecture or TensorRT version (they cannot be deserialized)."""
    rebuild = f"rebuild them here with `skin-offline build-engines {folder}`"
    if record is None:
        raise DeviceError(
            f"bundle {folder} has no TensorRT engines; build them with `skin-offline build-engines {folder}` "
            f"(minutes, once per GPU) or use --device cuda"
        )
    if trt_version is None:
        raise DeviceError(
            "TensorRT's library (libnvinfer) was not found; install TensorRT 10 next to onnxruntime-gpu "
            "(JetPack ships it) or use --device cuda"
        )
    if gpu is None:
        raise DeviceError("no NVIDIA GPU found (libcuda / nvidia-smi); TensorRT engines need one, use --device cpu")
    if record.tensorrt_version != trt_version:
        raise DeviceError(
            f"the bundle's TensorRT engines were built with TensorRT {record.tensorrt_version}, this machine "
            f"has {trt_version}; {rebuild}"
        )
    # TensorRT ties an engine to the device model it was tuned on (kernels, SM count), not only the architecture
    if record.compute_capability != gpu.compute_capability or record.gpu_name != gpu.name:
        raise DeviceError(
            f"the bundle's TensorRT engines were built for {record.gpu_name} (compute capability "
            f"{record.compute_capability}), this GPU is {gpu.name} ({gpu.compute_capability}); {rebuild}"
        )


# --- runtime: which providers a bundle's sessions get ---------------------------------------------


def device_for_bundle(device: Any, folder: Path) -> Any:
    """Resolve --device for this bundle: TensorRT needs engines built here; `auto` skips incompatible ones."""
    from .devices import Device, parse_device, resolve

    record = read_record(folder)
    requested = parse_device(device)
    choice = resolve(requested, has_engines=record is not None)
    if choice.device is Device.TENSORRT:
        try:
            check_compatible(record, tensorrt_version(), gpu_info(), folder)
        except DeviceError:
            if requested is not Device.AUTO:
                raise
            choice = resolve(Device.AUTO, has_engines=False)  # engines for another GPU: CUDA is still the best
    return choice


def graph_providers(choice: Any, folder: Path, role: str, variant: Any) -> list[Any] | None:
    """Providers for one graph: the TensorRT options recorded for `role` (engine cache, profiles), else None."""
    from ..manifest import Flavor
    from .devices import TRT_EP, Device

    if choice is None or choice.device is not Device.TENSORRT:
        return None
    if variant.flavor is not Flavor.STANDARD:
        raise DeviceError(
            f"{variant.file} uses onnxruntime contrib ops, which TensorRT cannot run; "
            f"pick a standard-op precision (--precision fp32/fp16) or use --device cuda"
        )
    record = read_record(folder)
    g = record.graphs.get(role) if record else None
    if record is None or g is None or g.get("file") != variant.file:
        built = g.get("file") if g else "nothing"
        raise DeviceError(
            f"the bundle's TensorRT {role} engine was built from {built}, not {variant.file}; "
            f"run `skin-offline build-engines {folder}` for this precision"
        )
    return [(TRT_EP, record.options(folder, role)), *choice.providers[1:]]
