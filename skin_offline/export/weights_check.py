"""Each weight a graph stores, checked against the checkpoint's tensor: exactly, whatever the codec.

fp32 / fp16: the stored array equals the checkpoint's (transposed to [in,out] for MatMuls, cast for fp16).
Quantized MatMul weights (MatMulNBits int4/int8, int8 QGEMM columns): the stored tensors equal, byte for byte, what
the weight's codec (codecs.py, the one the export used) makes of the checkpoint's tensor; a wrong, stale or mutated
weight is named with how many of its values differ. That the codec's format means what onnxruntime's kernels read
is checked apart: `dequantize` decodes the stored bytes here in NumPy from the formats' definitions, independently
of the packers, and verify.py runs the graph against transformers on exactly those weights. The int8 embedding
rows are checked from their definition (`round(w / s)` per row, clipped; a tie may round either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto

from .. import names
from .calibrate import calibrated_weight

_ROWS = 1024  # output rows per chunk: bounded temporaries at 7B widths
TIE = 1e-3  # |w/s - (k + 1/2)| below this may round either way (the packer may multiply by 1/s)
# a calibrated weight's error (Frobenius) may be at most this x round-to-nearest's on the same scales
CALIBRATED_ERROR_RATIO = 6.0


@dataclass
class WeightCheck:
    name: str  # the checkpoint's canonical name
    stored_as: str  # "fp32", "fp16", "int4 block 128", "int8 per-column", ...
    values: int
    mismatched: int = 0
    bad_scales: int = 0
    missing: bool = False
    error_ratio: float | None = None  # calibrated weights: decoded error / round-to-nearest's on the same scales

    @property
    def ok(self) -> bool:
        calibrated_ok = self.error_ratio is None or self.error_ratio <= CALIBRATED_ERROR_RATIO
        return not self.missing and self.mismatched == 0 and self.bad_scales == 0 and calibrated_ok

    def problem(self) -> str:
        if self.missing:
            return f"{self.name} is not in the graph"
        parts = []
        if self.mismatched:
            parts.append(f"{self.mismatched} of {self.values} values differ from the checkpoint's")
        if self.bad_scales:
            parts.append(f"{self.bad_scales} scales are not what its quantization allows")
        if self.error_ratio is not None and self.error_ratio > CALIBRATED_ERROR_RATIO:
            parts.append(
                f"its error is {self.error_ratio:.2f}x rounding to nearest's (at most "
                f"{CALIBRATED_ERROR_RATIO}x for a calibrated weight of this checkpoint)"
            )
        return f"{self.name} ({self.stored_as}): " + ", ".join(parts)


class StoredWeights:
    """Read a graph's stored initializers (seek/read from its external data) by checkpoint name."""

    def __init__(
        self, folder: Path, inits: dict[str, TensorProto], nbits_search: bool = False, calibrated: str | None = None
    ):
        """`nbits_search`: the MatMulNBits weights were packed with the old --scale-search (manifest details);
        `calibrated`: the decoder's layer weights come from the calibrated pass, with scales "absmax" or
        "activation-search" (manifest details["scales"])."""
        self.folder, self.inits, self.nbits_search = Path(folder), inits, nbits_search
        self.calibrated = calibrated

    def read(self, name: str) -> np.ndarray:
        from .quantize import read_tensor

        return read_tensor(self.inits[name], self.folder)

    def kind(self, name: str) -> str | None:
        if name in self.inits:
            return "float"
        for bits in (4, 8):
            if name + names.Q_WEIGHT_SUFFIX.format(bits=bits) in self.inits:
                return f"nbits{bits}"
        if name + names.QGEMM_WEIGHT_SUFFIX in self.inits:
            return "qgemm"
        return None

    def check(self, name: str, w: np.ndarray) -> WeightCheck:
        """`w`: the checkpoint's tensor, fp32, as the checkpoint stores it ([out,in] for linear weights)."""
        from .codecs import NBits

        kind = self.kind(name)
        if kind is None:
            return WeightCheck(name, "-", int(w.size), missing=True)
        if kind == "float":
            stored = self.read(name)
            want = w.T if stored.ndim == 2 else w
            want = want.astype(stored.dtype)
            return WeightCheck(
                name,
                str(stored.dtype).replace("float", "fp"),
                int(w.size),
                mismatched=int((stored != want).sum()) if stored.shape == want.shape else int(w.size),
            )
        if kind == "qgemm":
            return self._check_qgemm(name, w)
        elif self.calibrated and calibrated_weight(name):
            return self._check_calibrated(name, w, int(kind[-1]))
        else:
            bits = int(kind[-1])
            packed = self.inits[name + names.Q_WEIGHT_SUFFIX.format(bits=bits)]
            bs = int(packed.dims[2]) * 8 // bits
            symmetric = name + names.Q_ZERO_POINTS_SUFFIX not in self.inits
            codec = NBits(bits, bs, symmetric, scale_search=self.nbits_search)
            stored_as = f"int{bits} block {bs}" + ("" if symmetric else " asym")
        res = WeightCheck(name, stored_as, int(w.size))
        # [K,N] as the graph's MatMul
        return self._compare(res, codec.encode(name, np.ascontiguousarray(w.T, np.float32)), kind == "nbits4")

    def _compare(self, res: WeightCheck, tensors, int4: bool) -> WeightCheck:
        """The stored tensors against `tensors` (name, expected array), counted into `res`."""
        for tname, want in tensors:
            if tname not in self.inits:
                res.missing = True
                continue
            got = self.read(tname)
            if got.shape != want.shape or got.dtype != want.dtype:
                res.mismatched = res.values
            elif not np.array_equal(got, want):
                if tname.endswith(names.Q_SCALES_SUFFIX):
                    res.bad_scales += int((got != want).sum())
                else:  # count values, not bytes (two int4 codes share a byte)
                    g, x = (_unpack(a.reshape(a.shape[0], -1), 4) if int4 else a for a in (got, want))
                    res.mismatched += int((g != x).sum())
        return res

    def _check_qgemm(self, name: str, w: np.ndarray) -> WeightCheck:
        """An int8 per-column weight: its codes and scales re-encoded from the checkpoint's tensor, bit for bit; a
        smoothed one (codecs.smooth_factors) with its stored divisors s, which must be finite and positive (the graph
        then computes x/s @ diag(s) W = x W for any such s, so the codes are what ties it to the checkpoint)."""
        from .codecs import qgemm_tensors

        sname = name + names.QGEMM_SMOOTH_SUFFIX
        smooth = self.read(sname) if sname in self.inits else None
        res = WeightCheck(name, "int8 per-column" + (" smoothed" if smooth is not None else ""), int(w.size))
        wt = np.ascontiguousarray(w.T, np.float32)  # [K,N] as the graph's MatMul
        if smooth is not None and (
            smooth.shape != (wt.shape[0],) or not np.all(np.isfinite(smooth)) or not np.all(smooth > 0)
        ):
            res.mismatched = res.values
            return res
        return self._compare(res, qgemm_tensors(name, wt, smooth), int4=False)

    def _check_calibrated(self, name: str, w: np.ndarray, bits: int) -> WeightCheck:
        """A calibrated weight (export/calibrate.py): its codes depend on the calibration activations, so they are
        checked by what the pass guarantees, from the checkpoint's tensor alone: every block's scale is its absmax
        scale (times a factor in [min(SEARCH_FACTORS), 1] with the activation search), and the decoded weight's error
        is at most CALIBRATED_ERROR_RATIO x that of rounding to nearest on the same scales (GPTQ moves rounding error
        between columns; it does not make it much larger, measured: README "int4 quality"). A wrong, stale or
        transposed tensor fails both by far; a few altered codes may pass (the file hashes guard those)."""
        from .gptq import SEARCH_FACTORS, Grid, absmax_scales, dequantize, rtn_codes

        packed = self.inits[name + names.Q_WEIGHT_SUFFIX.format(bits=bits)]
        bs = int(packed.dims[2]) * 8 // bits
        grid = Grid(bits, bs)
        res = WeightCheck(name, f"int{bits} block {bs} calibrated", int(w.size))
        w = np.ascontiguousarray(w, np.float32)  # [N,K]
        if w.shape[1] % bs or int(packed.dims[0]) != w.shape[0]:
            res.mismatched = res.values
            return res
        got = self.read(name + names.Q_SCALES_SUFFIX).reshape(w.shape[0], -1)
        base = absmax_scales(w, grid)
        ratio = np.divide(got, base, out=np.ones_like(got), where=base != 0)
        lo = min(SEARCH_FACTORS) if self.calibrated == "activation-search" else 1.0
        res.bad_scales = int(((ratio < lo - 1e-6) | (ratio > 1 + 1e-6)).sum())  # an all-zero block: any scale
        if res.bad_scales:
            return res
        dq = self.dequantize(name, w)
        rtn = dequantize(rtn_codes(w, got, grid), got, grid)
        err, ref = float(np.linalg.norm(dq - w)), float(np.linalg.norm(rtn - w))
        res.error_ratio = err / max(ref, 1e-30)
        return res

    def dequantize(self, name: str, like: np.ndarray) -> np.ndarray:
        """The weight the graph computes with, as [out,in] fp32 (checkpoint layout)."""
        kind = self.kind(name)
        if kind == "float":
            stored = self.read(name).astype(np.float32)
            return stored.T if stored.ndim == 2 else stored
        if kind == "qgemm":  # [N,K] = (codes x column scales)^T, over the smoothing divisors if any
            q = self.read(name + names.QGEMM_WEIGHT_SUFFIX)
            w = q.T.astype(np.float32) * self.read(name + names.Q_SCALES_SUFFIX)[:, None]
            sname = name + names.QGEMM_SMOOTH_SUFFIX
            return w / self.read(sname)[None, :] if sname in self.inits else w
        bits = int(kind[-1])
        packed = self.read(name + names.Q_WEIGHT_SUFFIX.format(bits=bits))
        n, kb, nbytes = packed.shape
        bs = nbytes * 8 // bits
        s = self.read(name + names.Q_SCALES_SUFFIX).reshape(n, kb, 1)
        zname = name + names.Q_ZERO_POINTS_SUFFIX
        zp = (
            _unpack(self.read(zname).reshape(n, -1), bits)[:, :kb, None].astype(np.float32)
            if zname in self.inits
            else np.float32(1 << (bits - 1))
        )
        codes = _unpack(packed.reshape(n * kb, nbytes), bits).reshape(n, kb, bs).astype(np.float32)
        return ((codes - zp) * s).reshape(n, kb * bs)[:, : like.shape[1]]


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """[..., m] uint8 -> [..., m * 8 / bits] codes (4 bits: low nibble first)."""
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def _check_rows(
    name: str,
    stored_as: str,
    w: np.ndarray,
    codes: np.ndarray,
    scales: np.ndarray,
    qmin: int,
    qmax: int,
    zero: int,
    levels_half: int,
    zp: np.ndarray | None,
    block: int | None = None,
    search: bool = False,
) -> WeightCheck:
    """Codes [N, blocks, bs] (or [N, K] with one scale per row) against round(w / s) + zero point. w [N, K]."""
    n = w.shape[0]
    res = WeightCheck(name, stored_as, int(w.size))
    if codes.shape[0] != n:
        res.mismatched = res.values
        return res
    for r in range(0, n, _ROWS):
        x = np.ascontiguousarray(w[r : r + _ROWS], np.float32)
        x = x.reshape(x.shape[0], -1, block) if block else x.reshape(x.shape[0], 1, -1)  # [rows, blocks, bs]
        c = codes[r : r + _ROWS].reshape(x.shape).astype(np.int32)
        s = scales[r : r + _ROWS].reshape(x.shape[0], x.shape[1], 1).astype(np.float32)
        z = zero if zp is None else zp[r : r + _ROWS].reshape(x.shape[0], x.shape[1], 1).astype(np.int32)
        safe = np.where(s == 0, np.float32(1), s)
        ratio = x / safe
        want = np.clip(np.rint(ratio) + z, qmin, qmax).astype(np.int32)
        want = np.where(s == 0, np.broadcast_to(np.asarray(z, np.int32), want.shape), want)
        diff = np.abs(c - want)
        tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < TIE
        res.mismatched += int(((diff > 1) | ((diff == 1) & ~tie)).sum())
        # scales: absmax / half range (symmetric; the search may shrink it to 0.6x), (max - min) / levels (asymmetric)
        if zp is None:
            bound = np.abs(x).max(-1, keepdims=True) / levels_half
            lo = 0.55 * bound if search else bound * (1 - 1e-5)
        else:
            bound = (np.maximum(x.max(-1, keepdims=True), 0) - np.minimum(x.min(-1, keepdims=True), 0)) / (qmax - qmin)
            lo = bound * (1 - 1e-5)
        a = np.abs(s)
        bad = (a > bound * (1 + 1e-5) + 1e-30) | (a < lo - 1e-30)
        res.bad_scales += int((bad & (bound > 0)).sum())  # an all-zero block may carry any scale (its codes are 0)
    return res


def check_embeddings(table: np.ndarray, scales: np.ndarray | None, w: np.ndarray, name: str) -> WeightCheck:
    """The bundle's token table (fp32 / fp16, or int8 rows + [V] scales) against the checkpoint's [V,H]."""
    if scales is None:
        want = w.astype(table.dtype)
        bad = int((np.asarray(table) != want).sum()) if table.shape == w.shape else int(w.size)
        return WeightCheck(name, str(table.dtype).replace("float", "fp"), int(w.size), mismatched=bad)
    return _check_rows(name, "int8 per-row", w, np.asarray(table), scales[:, None], -127, 127, 0, 127, None)
