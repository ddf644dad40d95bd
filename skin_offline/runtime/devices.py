"""`--device auto|cpu|cuda|tensorrt` -> onnxruntime execution providers.

`auto` takes the best provider this onnxruntime build offers (TensorRT only when the bundle carries engines,
because building them takes minutes: `skin-offline build-engines`). An explicitly requested device that is
missing is a DeviceError naming what is missing and how to install it: never a silent CPU fallback. A session
that onnxruntime quietly moved to the CPU (CUDA libraries missing at run time) is refused too (`check_session`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..errors import DeviceError, UsageError

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"

GPU_INSTALL = (
    "pip uninstall -y onnxruntime && pip install 'skin-offline[gpu]' (onnxruntime-gpu); "
    "on Jetson install the onnxruntime-gpu wheel built for your JetPack"
)
TRT_INSTALL = "install TensorRT 10 (JetPack ships it; desktop: NVIDIA's tensorrt packages) next to onnxruntime-gpu"


class Device(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


PROVIDER = {Device.CPU: CPU_EP, Device.CUDA: CUDA_EP, Device.TENSORRT: TRT_EP}


@dataclass(frozen=True)
class DeviceChoice:
    """The resolved device and the onnxruntime providers list (in priority order) for a session."""

    device: Device
    providers: tuple = field(default=(CPU_EP,))  # names or (name, options) pairs

    @property
    def primary(self) -> str:
        p = self.providers[0]
        return p if isinstance(p, str) else p[0]


def parse_device(value: "Device | str | None") -> Device:
    if value is None:
        return Device.AUTO
    try:
        return Device(str(value.value if isinstance(value, Device) else value).lower())
    except ValueError:
        raise UsageError(f"unknown device {value!r}; use one of: {', '.join(d.value for d in Device)}") from None


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _missing(device: Device, available: list[str]) -> DeviceError:
    have = ", ".join(p.replace("ExecutionProvider", "") for p in available) or "none"
    how = GPU_INSTALL if device is Device.CUDA else f"{GPU_INSTALL}; then {TRT_INSTALL}"
    return DeviceError(
        f"device '{device.value}' needs onnxruntime's {PROVIDER[device]}, which this onnxruntime "
        f"lacks (it has: {have}); {how}"
    )


def resolve(
    device: "Device | str | None" = None,
    *,
    available: list[str] | None = None,
    has_engines: bool = False,
    cuda_options: dict | None = None,
    trt_options: dict | None = None,
) -> DeviceChoice:
    """Pick providers for `device`. `available` defaults to onnxruntime's list (tests pass their own)."""
    device = parse_device(device)
    available = available_providers() if available is None else list(available)
    if device is Device.AUTO:
        if TRT_EP in available and has_engines:
            device = Device.TENSORRT
        elif CUDA_EP in available:
            device = Device.CUDA
        else:
            device = Device.CPU
    if PROVIDER[device] not in available:
        raise _missing(device, available)
    cuda = (CUDA_EP, dict(cuda_options or {}))
    providers: tuple[Any, ...]
    if device is Device.CPU:
        providers = (CPU_EP,)
    elif device is Device.CUDA:
        providers = (cuda, CPU_EP)  # CPU only for the odd op CUDA lacks (shape arithmetic), as onnxruntime does
    else:
        # TensorRT runs what it supports; CUDA then CPU take any node it rejects (shape ops on int64)
        providers = ((TRT_EP, dict(trt_options or {})), *((cuda,) if CUDA_EP in available else ()), CPU_EP)
    return DeviceChoice(device, providers)


def check_session(session: Any, choice: DeviceChoice, graph: str) -> None:
    """Refuse a session onnxruntime built without the requested provider (e.g. CUDA libraries not found)."""
    got = session.get_providers()
    if choice.primary not in got:
        raise DeviceError(
            f"onnxruntime could not start {choice.primary} for {graph} (session runs on {', '.join(got)}); "
            f"check the CUDA/cuDNN{'/TensorRT' if choice.device is Device.TENSORRT else ''} libraries match "
            f"onnxruntime-gpu's requirements (LD_LIBRARY_PATH), or use --device cpu"
        )
