"""Calibrated weight quantization math: GPTQ's error compensation, block scales, and the Hessians they read.

One linear layer y = x W^T (W [N,K], checkpoint layout) quantized to MatMulNBits' symmetric block format (codes in
[qmin, qmax], one scale per block of `block_size` inputs of an output row). Round-to-nearest minimises each weight's
own error; what matters is the output's, E||x (W - Q)^T||^2 = sum_rows (w - q) H (w - q)^T with H = E[x^T x] over
calibration activations. Two ways to use H, both here:
- GPTQ (Frantar et al. 2022, arXiv 2210.17323): quantize one input column at a time and move its rounding error
  onto the columns not yet quantized, along H^-1 (the OBS update), so later roundings cancel earlier ones. Columns in
  order of decreasing H_kk ("act order"); each block's scale is fixed before the pass ("static groups"), so blocks
  stay contiguous in the stored format whatever the order;
- `block_scales` with `importance` = diag(H): each block's scale chosen among shrunk absmax scales by the
  activation-weighted error sum_k H_kk (w_k - q_k)^2 (the per-channel approximation of the output error; llama.cpp's
  imatrix uses the same weighting). Without `importance` it is the plain weight error: the old `--scale-search`,
  which can clip exactly the outlier weights a trained model needs (issue 22's table).
Hand-written (NumPy / torch) because onnxruntime's quantizers only round to nearest and the GPTQ/AWQ packages need
CUDA; the formulas follow the paper, not their code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# candidate scale factors x absmax: 1.0 first so ties keep onnxruntime's absmax scale
SEARCH_FACTORS = tuple(np.round(np.linspace(1.0, 0.6, 17), 3))
DAMP = 0.01  # GPTQ's dampening: 1% of the mean diagonal added to H (keeps H^-1 well conditioned)
LAZY = 128  # columns updated together (GPTQ's lazy batch: one GEMM per batch instead of one rank-1 per column)
_ROWS = 64  # output rows per chunk in the scale search: a few MB of blocks at K = 14336


@dataclass(frozen=True)
class Grid:
    bits: int
    block_size: int

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1


def absmax_scales(w: np.ndarray, grid: Grid) -> np.ndarray:
    """onnxruntime's symmetric scale per block: the block's signed max-|w| / qmin. w [N,K] -> [N, K/bs] fp32."""
    n, k = w.shape
    x = w.reshape(n, k // grid.block_size, grid.block_size)
    peak = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    return (peak / np.float32(grid.qmin)).astype(np.float32)


def block_scales(w: np.ndarray, grid: Grid, importance: np.ndarray | None = None, factors=SEARCH_FACTORS) -> np.ndarray:
    """Each block's scale among `factors` x its absmax scale, by least (importance-weighted) squared error.
    w [N,K] fp32, importance [K] >= 0 (diag of H) or None -> scales [N, K/bs] fp32."""
    n, k = w.shape
    kb, bs = k // grid.block_size, grid.block_size
    base_all = absmax_scales(w, grid)
    out = np.empty((n, kb), np.float32)
    imp = None if importance is None else np.asarray(importance, np.float32).reshape(1, kb, bs)
    for r in range(0, n, _ROWS):
        x = np.ascontiguousarray(w[r : r + _ROWS]).reshape(-1, kb, bs)  # [rows, K/bs, bs]
        base = base_all[r : r + _ROWS, :, None]
        best_d, best_err = base, None
        for f in factors:
            d = base * np.float32(f)
            safe = np.where(d == 0, np.float32(1), d)
            e = np.square(np.clip(np.round(x / safe), grid.qmin, grid.qmax) * d - x)
            err = (e if imp is None else e * imp).sum(-1, keepdims=True)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best_d, best_err = np.where(better, d, best_d), np.where(better, err, best_err)
        out[r : r + _ROWS] = best_d[..., 0]
    return out


def rtn_codes(w: np.ndarray, scales: np.ndarray, grid: Grid) -> np.ndarray:
    """Round to nearest on given scales: w [N,K], scales [N, K/bs] -> codes [N,K] int8 in [qmin, qmax]."""
    n, k = w.shape
    s = np.repeat(scales, grid.block_size, axis=1)
    safe = np.where(s == 0, np.float32(1), s)
    return np.clip(np.round(w / safe), grid.qmin, grid.qmax).astype(np.int8)


def dequantize(codes: np.ndarray, scales: np.ndarray, grid: Grid) -> np.ndarray:
    """codes [N,K] x scales [N, K/bs] -> [N,K] fp32 (what MatMulNBits computes with)."""
    return codes.astype(np.float32) * np.repeat(scales, grid.block_size, axis=1)


def gptq_codes(
    w: np.ndarray, h, scales: np.ndarray, grid: Grid, damp: float = DAMP, act_order: bool = True
) -> np.ndarray:
    """GPTQ with static block scales. w [N,K] fp32 (checkpoint layout), h [K,K] (torch or NumPy, E[x^T x] up to a
    factor), scales [N, K/bs] -> codes [N,K] int8 in [qmin, qmax]. fp32 throughout (H's Cholesky included, after
    dampening); deterministic for a given machine and thread count."""
    import torch

    W = torch.from_numpy(np.array(w, np.float32, copy=True))  # [N,K]
    H = torch.as_tensor(h, dtype=torch.float32).clone()
    n, k = W.shape
    diag = torch.diagonal(H)
    dead = diag <= 0  # inputs never active in calibration: plain rounding (no information to compensate with)
    diag[dead] = 1.0
    diag += damp * float(diag.mean())
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(k)
    # The pass walks W's columns, so they are held as contiguous rows (W^T [K,N], scales^T, codes^T). Why: with
    # [N,K] every column read, update and code write strides across N cache lines; transposed, the same arithmetic
    # (identical codes) ran 2.3x faster here (N=14336, K=4096, 2 threads).
    Wt = W[:, perm].T.contiguous()  # [K,N] in act order, updated in place
    del W
    H = H[perm][:, perm]
    St = torch.from_numpy(np.where(scales == 0, np.float32(1), scales)).T.contiguous()  # [K/bs, N]
    block_of = (perm // grid.block_size).tolist()  # permuted column -> its block (static: original order)
    U = _inverse_cholesky_upper(H)  # [K,K] upper: H^-1 = U^T U
    del H
    Qt = torch.empty((k, n), dtype=torch.int8)
    for i1 in range(0, k, LAZY):
        i2 = min(i1 + LAZY, k)
        W1, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2]  # [b,N], [b,b]
        E1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            w_col, s = W1[i], St[block_of[i1 + i]]  # [N] each
            q = torch.clamp(torch.round(w_col / s), grid.qmin, grid.qmax)
            Qt[i1 + i] = q.to(torch.int8)
            err = (w_col - q * s) / U1[i, i]
            W1[i:] -= U1[i, i:][:, None] * err[None, :]
            E1[i] = err
        Wt[i2:] -= U[i1:i2, i2:].T @ E1
    inv = torch.argsort(perm)
    return Qt[inv].T.contiguous().numpy()


def _inverse_cholesky_upper(h):
    """Upper U with H^-1 = U^T U, from one Cholesky and one triangular inverse (not GPTQ's three factorizations):
    with J the order reversal, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper."""
    import torch

    L = torch.linalg.cholesky(torch.flip(h, (0, 1)))
    eye = torch.eye(L.shape[0], dtype=L.dtype)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    return torch.flip(Linv, (0, 1))


class Hessian:
    """Running E[x^T x] of one layer input over calibration positions (fp32, [K,K]), or only its diagonal
    (`diag_only`: E[x_k^2], what the activation-weighted scale search reads: K values instead of K^2), and each
    channel's max |x_k| (`absmax` [K]: what smoothing the int8 prefill graph reads, codecs.smooth_factors)."""

    def __init__(self, k: int, diag_only: bool = False):
        import torch

        self.k, self.diag_only = k, diag_only
        self.h = torch.zeros((k,) if diag_only else (k, k), dtype=torch.float32)
        self.absmax = torch.zeros(k, dtype=torch.float32)
        self.n = 0

    def add(self, x) -> None:
        """x [..., K] (torch or NumPy): its rows' outer products (squares), accumulated."""
        import torch

        x = torch.as_tensor(x).reshape(-1, self.k).float()
        if x.shape[0] == 0:
            return
        self.h.mul_(self.n / (self.n + x.shape[0]))
        self.n += x.shape[0]
        torch.maximum(self.absmax, x.abs().amax(0), out=self.absmax)
        if self.diag_only:
            self.h.add_(x.square().sum(0), alpha=1.0 / self.n)
        else:
            self.h.addmm_(x.T, x, alpha=1.0 / self.n)

    def diag(self) -> np.ndarray:
        return (self.h if self.diag_only else self.h.diagonal()).numpy().copy()
