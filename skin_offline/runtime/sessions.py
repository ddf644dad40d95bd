"""onnxruntime session creation: one place for threads, graph optimisation and providers."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BundleError


def default_threads() -> int:
    """Physical-ish cores: decode is bandwidth bound, so more threads than cores only adds contention."""
    return max(1, min(8, os.cpu_count() or 1))


class SessionFactory:
    def __init__(self, threads: int | None = None, providers: list | None = None):
        self.threads = threads or default_threads()
        self.providers = providers or ["CPUExecutionProvider"]

    def options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
        return so

    def create(self, path: Path):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(path), sess_options=self.options(), providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"cannot load graph {path.name}: {first}; run `skin-offline verify` or re-export") from None
