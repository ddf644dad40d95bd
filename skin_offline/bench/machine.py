"""What the benchmark ran on: CPU, cores, memory, a memory-bandwidth probe, GPU / Jetson board.

Decode is memory-bandwidth bound, so the bandwidth figure is the yardstick for every decode number. A
single NumPy reduction is compute bound on one core and under-reads the memory system; the probe runs
STREAM-style kernels (copy, add, and a read-only OR-reduction over uint64) on one array set per thread,
all threads released together, and keeps the best rate over repeats (STREAM's convention: bytes counted
are the bytes the kernel must move, read + write). Buffers are far larger than any CPU cache.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Jetson boards: LPDDR5 peak bandwidth (NVIDIA's module data sheets), matched on the board model string; every
# word of a key must appear ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super" is a Nano Super)
JETSON_BANDWIDTH_GBS = (
    (("agx", "orin"), 204.8),
    (("orin", "nano", "super"), 102.0),  # the "Super" mode of JetPack 6.1+
    (("orin", "nx"), 102.4),
    (("orin", "nano"), 68.0),
)


@dataclass(frozen=True)
class Bandwidth:
    gb_per_s: float  # best kernel, best thread count: the number the roofline uses
    kernels: dict = field(default_factory=dict)  # "copy@2" -> GB/s
    buffer_mb: int = 0


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    logical_cores: int
    physical_cores: int | None
    memory_bytes: int
    python: str
    onnxruntime: str
    providers: list
    gpu: dict | None = None  # name, compute capability, memory (CUDA driver) when an NVIDIA GPU is present
    jetson: dict | None = None  # board model, L4T release, power mode, board bandwidth
    bandwidth: Bandwidth | None = None
    # the int8 / int4 kernel features onnxruntime's MLAS dispatches on (x86 AMX, AVX-512 VNNI, AVX-VNNI, AVX2;
    # ARM dot-product / i8mm / SVE): results from another machine are read against these
    cpu_features: list = field(default_factory=list)
    gemm_min_rows: int | None = None  # the kernel rule's crossover on this machine (runtime/kernels/policy.py)

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


KERNEL_FEATURES = (
    "amx_int8",
    "amx_bf16",
    "amx_tile",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512bw",
    "avx512f",
    "avx2",
    "fma",
    "asimddp",
    "i8mm",
    "sve",
    "sve2",
    "bf16",
)


def cpu_features(flags: set[str] | None = None) -> list[str]:
    """The subset of this CPU's flags that decides which int8 / int4 kernels run (in KERNEL_FEATURES order)."""
    from ..runtime.kernels.policy import cpu_flags

    flags = cpu_flags() if flags is None else flags
    return [f for f in KERNEL_FEATURES if f in flags]


def _read(path: str) -> str | None:
    try:
        return Path(path).read_bytes().decode(errors="replace").strip("\x00 \n")
    except OSError:
        return None


def board_bandwidth(model: str) -> float | None:
    words = set(model.lower().replace("-", " ").split())
    for key, gbs in JETSON_BANDWIDTH_GBS:
        if words.issuperset(key):
            return gbs
    return None


def jetson_info() -> dict | None:
    """Board model (/proc/device-tree/model), L4T release (/etc/nv_tegra_release), nvpmodel power mode."""
    model = _read("/proc/device-tree/model")
    release = _read("/etc/nv_tegra_release")
    if not release and not (model and ("jetson" in model.lower() or "orin" in model.lower())):
        return None
    info = {
        "model": model,
        "l4t_release": release.splitlines()[0] if release else None,
        "board_bandwidth_gb_per_s": board_bandwidth(model or ""),
    }
    mode = _nvpmodel_query() or _read("/var/lib/nvpmodel/status")  # "NV Power Mode: MAXN" / "pmode:0000 ..."
    if mode:
        info["power_mode"] = mode
    return info


def _nvpmodel_query() -> str | None:
    import shutil
    import subprocess

    if not shutil.which("nvpmodel"):
        return None
    try:
        out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((line.strip() for line in out.splitlines() if "power mode" in line.lower()), None)


def gpu_summary() -> dict | None:
    from ..runtime.tensorrt import gpu_info

    g = gpu_info()
    return asdict(g) if g else None


def _kernels():
    # name -> (fn(a, b, out), bytes moved per byte of one buffer)
    return {
        "copy": (lambda a, b, c: np.copyto(c, a), 2),
        "add": (lambda a, b, c: np.add(a, b, out=c), 3),
        "read": (lambda a, b, c: np.bitwise_or.reduce(a.view(np.uint64)), 1),
    }


def probe_bandwidth(threads: int | None = None, buffer_mb: int = 128, repeats: int = 4) -> Bandwidth:
    """Best GB/s over kernels x {1, threads} threads; NumPy's loops release the GIL, so threads run in parallel."""
    threads = threads or os.cpu_count() or 1
    n = (buffer_mb << 20) // 4
    results = {}
    for t in sorted({1, threads}):
        bufs = [(np.ones(n, np.float32), np.ones(n, np.float32), np.empty(n, np.float32)) for _ in range(t)]
        for name, (fn, k) in _kernels().items():
            best = 0.0
            for _ in range(repeats):
                start = threading.Barrier(t + 1)

                def work(b, fn=fn, start=start):
                    start.wait()
                    fn(*b)

                ts = [threading.Thread(target=work, args=(b,)) for b in bufs]
                for th in ts:
                    th.start()
                start.wait()
                t0 = time.perf_counter()
                for th in ts:
                    th.join()
                best = max(best, t * k * n * 4 / (time.perf_counter() - t0) / 1e9)
            results[f"{name}@{t}"] = round(best, 2)
        del bufs
    return Bandwidth(max(results.values()), results, buffer_mb)


def machine_info(bandwidth: bool = True, threads: int | None = None) -> MachineInfo:
    import onnxruntime as ort

    from ..runtime.kernels.policy import default_gemm_min_rows

    try:
        import psutil

        mem, phys = psutil.virtual_memory().total, psutil.cpu_count(logical=False)
    except ImportError:  # psutil is in the bench extra; without it read the page count
        mem, phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
    return MachineInfo(
        cpu_model=cpu_model(),
        logical_cores=os.cpu_count() or 1,
        physical_cores=phys,
        memory_bytes=int(mem),
        python=platform.python_version(),
        onnxruntime=ort.__version__,
        providers=list(ort.get_available_providers()),
        gpu=gpu_summary(),
        jetson=jetson_info(),
        bandwidth=probe_bandwidth(threads) if bandwidth else None,
        cpu_features=cpu_features(),
        gemm_min_rows=default_gemm_min_rows(),
    )
