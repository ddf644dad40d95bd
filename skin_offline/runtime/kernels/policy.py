"""Which decoder graph runs a call: the one place the runtime chooses kernels, by the rows of the call.

A decoder call multiplies [rows, K] activations by every weight (rows = batch x new tokens). onnxruntime's
MatMulNBits (int4) is the fastest kernel for one row but its cost grows linearly with rows; its int8 GEMM
(DynamicQuantizeMatMul, MLAS u8s8: AMX / AVX-512 VNNI / AVX2) costs more for one row and grows slowly. A bundle
that carries both graphs (Prefill.INT8) runs calls of at least `gemm_min_rows` rows through the int8 graph:
prefill chunks, batched decode steps, teacher forcing; single-row decode through int4.

The crossover is a property of the CPU: measured with benchmarks/kernels.py (one 4096x14336 weight, 2 threads)
it is 4 rows on an Intel Xeon with AMX (0.88x and 1.09x int4's time at 4 rows in two runs, 0.52x from 5 rows,
0.15x at 600) and near 16 on the AMD EPYC (AVX-512 VNNI, no AMX) of this project's machines (a wash from 8 to 16,
clear from 24); see benchmarks/README.md. SKIN_OFFLINE_GEMM_MIN_ROWS overrides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GEMM_MIN_ROWS_ENV = "SKIN_OFFLINE_GEMM_MIN_ROWS"
AMX_GEMM_MIN_ROWS = 4
DEFAULT_GEMM_MIN_ROWS = 16


def cpu_flags() -> set[str]:
    """The kernel-relevant CPU features of this machine (x86 /proc/cpuinfo flags; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 / ARM
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The largest int8 weight code onnxruntime's u8s8 GEMM (DynamicQuantizeMatMul) computes exactly on every x86 CPU:
# without VNNI its int16 pair sums saturate above 255 x 64 x 2 (export/codecs.py says why and what was measured).
EXACT_MAX_CODE = 63


def int8_gemm_saturates(flags: set[str] | None = None) -> bool:
    """Whether this CPU's u8s8 kernel sums pairs of products in a saturating int16: x86 without VNNI (AVX2 only)."""
    flags = cpu_flags() if flags is None else flags
    x86 = "sse2" in flags
    return x86 and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def overflows_here(details: dict, flags: set[str] | None = None) -> bool:
    """Whether an int8 QGEMM graph (its manifest details) has weight codes this CPU's kernel cannot sum exactly:
    graphs exported before 7-bit codes record no `max_code` and use the full [-127, 127]."""
    return int(details.get("max_code", 127)) > EXACT_MAX_CODE and int8_gemm_saturates(flags)


def default_gemm_min_rows(flags: set[str] | None = None) -> int:
    env = os.environ.get(GEMM_MIN_ROWS_ENV)
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            from ...errors import UsageError

            raise UsageError(
                f"{GEMM_MIN_ROWS_ENV}={env!r} is not an integer; set it to a row count such as 8"
            ) from None
    flags = cpu_flags() if flags is None else flags
    return AMX_GEMM_MIN_ROWS if "amx_int8" in flags else DEFAULT_GEMM_MIN_ROWS


@dataclass(frozen=True)
class KernelPolicy:
    gemm_min_rows: int  # calls with at least this many rows run the multi-row (int8 GEMM) graph

    @classmethod
    def for_this_machine(cls) -> "KernelPolicy":
        return cls(default_gemm_min_rows())

    def multi_row(self, rows: int) -> bool:
        """rows = batch x new tokens of one decoder call."""
        return rows >= self.gemm_min_rows
