"""onnxruntime session creation: one place for threads, graph optimisation and providers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import BundleError

# onnxruntime >= 1.2x writes a device-ID file and a small database under
# $XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime/ when its library loads, unless this variable is
# set (checked with 1.32: any value but "0" disables it). Set here, before any `import onnxruntime` of
# ours; a user who sets it to "0" keeps the file, and one who imported onnxruntime earlier already has it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def default_threads() -> int:
    """Physical-ish cores: decode is bandwidth bound, so more threads than cores only adds contention."""
    return max(1, min(8, os.cpu_count() or 1))


class SessionFactory:
    def __init__(self, threads: int | None = None, providers: list[Any] | None = None, device: Any = None):
        from .devices import DeviceChoice, resolve

        self.threads = threads or default_threads()
        # `device` (auto|cpu|cuda|tensorrt or a DeviceChoice) -> providers via devices.py; explicit `providers` win
        self.device = device if isinstance(device, DeviceChoice) else resolve(device) if device is not None else None
        self.providers = providers or (list(self.device.providers) if self.device else ["CPUExecutionProvider"])

    def options(self) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
        # No CPU arena: it keeps the high-water mark of vision + prefill activations reserved, so peak RSS
        # grew with every request shape. Measured on the bench preset int4 (2 requests, 600-token prompts):
        # peak RSS 2.55 -> 2.29 GB (1.29x -> 1.15x the bundle's weights); decode, prefill and vision times
        # unchanged within noise (large buffers come from malloc's mmap, per-token ones are tiny).
        so.enable_cpu_mem_arena = False
        return so

    def create(self, path: Path, providers: list[Any] | None = None) -> Any:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(
                str(path), sess_options=self.options(), providers=providers or self.providers
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(
                f"cannot load graph {path.name}: {first}; run `skin-offline verify` or re-export"
            ) from None
        if self.device is not None:  # never a silent CPU fallback
            from .devices import check_session

            check_session(session, self.device, path.name)
        return session
