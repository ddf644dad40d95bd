"""How one weight MatMul is stored: the op that replaces `MatMul(x, W[K,N])` and the tensors it reads.

One mechanism for every path that writes quantized graphs: `quantize BUNDLE OUT` rewrites an fp32 graph
weight by weight through a codec, and a direct export streams each checkpoint weight through the same codec.

- `NBits`: onnxruntime's MatMulNBits (int4 / int8, block-wise scales along K): the fastest kernel for one row
  (decode), but its cost grows linearly with rows.
- `QGemm`: int8 weights with one scale per output column, run by com.microsoft DynamicQuantizeMatMul
  (activations quantized per call to uint8, per tensor; MLAS's u8s8 GEMM, AMX / AVX-512 VNNI / AVX2): nearly
  flat in rows on CPUs with AMX, so multi-row calls (prefill chunks, batched decode) run through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, helper

from .. import names
from ..manifest import Kernel
from ..runtime.kernels.policy import EXACT_MAX_CODE

MS_DOMAIN = "com.microsoft"

Tensors = list[tuple[str, np.ndarray]]  # initializer name -> array, in the order they are written


@dataclass(frozen=True)
class NBits:
    bits: int  # 4 or 8
    block_size: int
    symmetric: bool = True
    accuracy_level: int = 4  # 4 = int8 activations (VNNI); 0 = fp32
    scale_search: bool = False  # bundles written before issue 22: per-block least-squares scale (symmetric only)
    # codes and scales come from the calibrated pass (calibrate.Calibrator, handed to `pack`), not from `encode`
    calibrated: bool = False
    kernel = Kernel.NBITS

    def encode(self, name: str, w: np.ndarray) -> Tensors:
        """W [K,N] fp32 -> packed [N, K/bs, bs*bits/8] uint8, scales [N*K/bs] fp32 (+ zero points)."""
        if self.calibrated:
            raise ValueError(f"{name}: a calibrated codec packs the calibrated pass's codes (pack), it does not round")
        if self.scale_search:
            packed, scales = pack_nbits_search(w, self.bits, self.block_size)
            zp = None
        else:
            packed, scales, zp = pack_nbits(w, self.bits, self.block_size, self.symmetric)
        out = [(name + names.Q_WEIGHT_SUFFIX.format(bits=self.bits), packed), (name + names.Q_SCALES_SUFFIX, scales)]
        if not self.symmetric:
            out.append((name + names.Q_ZERO_POINTS_SUFFIX, zp))
        return out

    def pack(self, name: str, codes: np.ndarray, scales: np.ndarray) -> Tensors:
        """Symmetric codes [N,K] int8 in [-2^(bits-1), 2^(bits-1)-1] + scales [N, K/bs] -> the tensors `encode` writes."""
        return [
            (name + names.Q_WEIGHT_SUFFIX.format(bits=self.bits), pack_codes(codes, self.bits, self.block_size)),
            (name + names.Q_SCALES_SUFFIX, np.ascontiguousarray(scales, np.float32).reshape(-1)),
        ]

    def nbytes(self, k: int, n: int) -> list[int]:
        """Sizes of the tensors `encode` writes for a [K,N] weight, in order (export --dry-run)."""
        kb = k // self.block_size
        out = [n * kb * self.block_size * self.bits // 8, 4 * n * kb]
        if not self.symmetric:
            per_byte = 8 // self.bits
            out.append(n * ((kb + per_byte - 1) // per_byte))
        return out

    def nodes(self, x: str, out: str, node_name: str, tensors: Tensors, k: int, n: int) -> list[NodeProto]:
        attrs = dict(K=int(k), N=int(n), bits=self.bits, block_size=self.block_size)
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        return [
            helper.make_node(
                "MatMulNBits",
                [x, *(t for t, _ in tensors)],
                [out],
                name=f"{node_name}_Q{self.bits}",
                domain=MS_DOMAIN,
                **attrs,
            )
        ]


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Signed codes [N,K] -> MatMulNBits' B [N, K/bs, bs*bits/8] uint8: stored with the implied zero point
    2^(bits-1) added, two 4-bit codes per byte, low nibble first (the op's documented layout)."""
    n, k = codes.shape
    u = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).reshape(n, k // block_size, block_size)
    if bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    return np.ascontiguousarray(u)


# SmoothQuant (Xiao et al. 2023): DynamicQuantizeMatMul gives each call's activations one uint8 scale per tensor, and
# a trained LM's few huge channels (hundreds of times the rest) take that scale's whole range; dividing channel k of
# x by s_k and multiplying row k of W by it leaves x W unchanged and moves the range into the weights, which have
# one scale per column. s_k = max|x_k|^alpha / max_n|W_kn|^(1-alpha), from the calibration activations' max |x_k|.
# alpha measured on the real-weights proxy (benchmarks/prefill_smoothing.py, the prefill gate's probe turns: mean KL
# to fp32 0.167 unsmoothed, 0.055 at 0.5, 0.047 at 0.65, 0.070 at 0.8, 0.125 at 0.9; the int4 decode graph 0.097).
SMOOTH_ALPHA = 0.65


def smooth_factors(act_absmax: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """act_absmax [K], W [K,N] fp32 -> s [K] fp32 > 0 (see SMOOTH_ALPHA). A channel that never fired in calibration
    (or an all-zero row) keeps s_k = 1: a tiny s_k would blow that channel up should it fire at run time."""
    if act_absmax.shape != (w.shape[0],):
        raise ValueError(f"smoothing statistics of shape {act_absmax.shape} for a weight of {w.shape[0]} inputs")
    wmax = np.empty(w.shape[0], np.float32)
    for r in range(0, w.shape[0], 1024):
        wmax[r : r + 1024] = np.abs(w[r : r + 1024]).max(axis=1)
    a, b = act_absmax.astype(np.float64), wmax.astype(np.float64)
    s = np.ones(w.shape[0], np.float64)
    ok = (a > 0) & (b > 0) & np.isfinite(a)
    s[ok] = a[ok] ** alpha / b[ok] ** (1 - alpha)
    return s.astype(np.float32)


@dataclass(frozen=True)
class QGemm:
    """Symmetric int8 per output column (zero point 0), codes in [-QGEMM_MAX_CODE, QGEMM_MAX_CODE]; `smooth`ed (see
    smooth_factors) with `act_absmax`, the calibrated pass's max |x| per input channel. A plan marks the weights to
    smooth before the pass has run (the dry run counts their divisors); prefill_gate.smoothed hands them the statistics."""

    act_absmax: np.ndarray | None = field(default=None, compare=False, repr=False)  # [K] fp32
    alpha: float = SMOOTH_ALPHA
    smooth: bool = False  # set by act_absmax
    kernel = Kernel.QGEMM

    def __post_init__(self):
        if self.act_absmax is not None:
            object.__setattr__(self, "smooth", True)

    def encode(self, name: str, w: np.ndarray) -> Tensors:
        if self.smooth and self.act_absmax is None:
            raise ValueError(f"{name}: smoothing needs the calibrated pass's statistics (prefill_gate.smoothed)")
        s = None if self.act_absmax is None else smooth_factors(self.act_absmax, w, self.alpha)
        return qgemm_tensors(name, w, s)

    def nbytes(self, k: int, n: int) -> list[int]:
        return [k * n, 4 * n] + ([4 * k] if self.smooth else [])

    def nodes(self, x: str, out: str, node_name: str, tensors: Tensors, k: int, n: int) -> list[NodeProto]:
        # inputs: A, B (int8 [K,N]), b_scale [N]; no b_zero_point (symmetric) and no bias
        q, scales, *smooth = (t for t, _ in tensors)
        pre = []
        if smooth:  # x / s [.., K]: the activations' outlier channels scaled down before the per-tensor quantization
            pre = [helper.make_node("Div", [x, smooth[0]], [f"{node_name}_smoothed"], name=f"{node_name}_Smooth")]
            x = f"{node_name}_smoothed"
        return [
            *pre,
            helper.make_node(
                "DynamicQuantizeMatMul", [x, q, scales], [out], name=f"{node_name}_QGEMM", domain=MS_DOMAIN
            ),
        ]


def qgemm_tensors(name: str, w: np.ndarray, smooth: np.ndarray | None) -> Tensors:
    """W [K,N] fp32 (and smoothing factors s [K]) -> the QGEMM tensors: codes and column scales of diag(s) W, and s,
    which the graph divides the input by. Also how the weight check re-encodes a stored graph (s as stored)."""
    q, scales = pack_qgemm(w, smooth)
    out = [(name + names.QGEMM_WEIGHT_SUFFIX, q), (name + names.Q_SCALES_SUFFIX, scales)]
    if smooth is not None:
        out.append((name + names.QGEMM_SMOOTH_SUFFIX, smooth))
    return out


Codec = NBits | QGemm


# Why 7-bit codes in an int8 tensor: DynamicQuantizeMatMul multiplies uint8 activations by int8 weights (u8s8), and
# on x86 CPUs without VNNI (AVX2: most laptops and desktops before ~2021, and this project's 2-core CI machine)
# onnxruntime's kernel sums each pair of products in a saturating int16 (vpmaddubsw): 255 x 127 x 2 = 64770 clips
# at 32767. Measured here (AVX2, onnxruntime 1.32, K=512 with outlier channels): codes in [-127, 127] put the
# kernel 3.3% (relative norm) away from its own exact integer math; codes in [-63, 63] bring it to 4e-8 on any
# CPU (255 x 63 x 2 = 32130), at one bit of weight precision. onnxruntime's quantizer calls this reduce_range.
# uint8 weights (u8u8) would also be exact but leave the u8s8 kernels VNNI and AMX machines are fastest with.
QGEMM_MAX_CODE = EXACT_MAX_CODE  # runtime/kernels/policy.py: what a loading bundle is checked against


def pack_qgemm(w: np.ndarray, smooth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """W [K,N] fp32 (rows times smooth [K] if given) -> (int8 codes [K,N] in [-QGEMM_MAX_CODE, QGEMM_MAX_CODE],
    scales [N] fp32): per-column absmax / QGEMM_MAX_CODE, round to nearest."""

    def rows(r: int) -> np.ndarray:  # row chunks: no full-size float temporaries at 7B widths
        chunk = w[r : r + 1024]
        return chunk if smooth is None else chunk * smooth[r : r + 1024, None]

    amax = np.zeros(w.shape[1], np.float32)
    for r in range(0, w.shape[0], 1024):
        np.maximum(amax, np.abs(rows(r)).max(axis=0), out=amax)
    scales = (amax / np.float32(QGEMM_MAX_CODE)).astype(np.float32)  # [N]
    safe = np.where(scales == 0, np.float32(1), scales)
    q = np.empty(w.shape, np.int8)
    for r in range(0, w.shape[0], 1024):
        q[r : r + 1024] = np.clip(np.rint(rows(r) / safe), -QGEMM_MAX_CODE, QGEMM_MAX_CODE)
    return q, scales


def pack_nbits(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [K,N] fp32 -> packed [N, K/bs, bs*bits/8] uint8, scales [N*K/bs] fp32, zero points [N*ceil(K/bs*bits/8)] uint8
    (onnxruntime's own packer, the one its MatMulNBitsQuantizer calls)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w.shape
    kb = k // block_size
    per_byte = 8 // bits
    packed = np.zeros((n, kb, block_size * bits // 8), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zp = np.zeros((n, (kb + per_byte - 1) // per_byte), np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, np.ascontiguousarray(w, np.float32), scales, zp, block_size, n, k, symmetric)
    return packed, scales.reshape(-1), zp.reshape(-1)


SEARCH_FACTORS = tuple(np.round(np.linspace(1.0, 0.6, 17), 3))  # absmax first: ties keep onnxruntime's choice
_SEARCH_ROWS = 64  # output rows per chunk: ~4 MB of blocks at K=14336, cache-sized


def pack_nbits_search(
    w: np.ndarray, bits: int, block_size: int, factors=SEARCH_FACTORS
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric MatMulNBits packing with each block's scale picked among `factors` x onnxruntime's absmax scale
    (signed max / -2^(bits-1)) by least squared error. onnxruntime has no such option, hence NumPy here; with
    factors=(1.0,) this reproduces `quantize_matmul_4bits/8bits` bit for bit (tested).
    W [K,N] fp32 -> packed [N, K/bs, bs*bits/8] uint8, scales [N*K/bs] fp32."""
    k, n = w.shape
    kb, qmin, qmax = k // block_size, -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    packed = np.empty((n, kb, block_size * bits // 8), np.uint8)
    scales = np.empty((n, kb), np.float32)
    for r in range(0, n, _SEARCH_ROWS):
        x = np.ascontiguousarray(w[:, r : r + _SEARCH_ROWS].T).reshape(-1, kb, block_size)  # [rows, K/bs, bs]
        peak = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)  # signed max-abs [rows, K/bs, 1]
        base = peak / np.float32(qmin)
        best_d, best_err = base, None
        for f in factors:
            d = base * np.float32(f)
            safe = np.where(d == 0, np.float32(1), d)
            err = np.square(np.clip(np.round(x / safe), qmin, qmax) * d - x).sum(-1, keepdims=True)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best_d, best_err = np.where(better, d, best_d), np.where(better, err, best_err)
        safe = np.where(best_d == 0, np.float32(1), best_d)
        codes = (np.clip(np.round(x / safe), qmin, qmax) - qmin).astype(np.uint8)  # stored with the implied zero point
        if bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # two per byte, low nibble first
        packed[r : r + _SEARCH_ROWS] = codes
        scales[r : r + _SEARCH_ROWS] = best_d[..., 0]
    return packed, scales.reshape(-1)
