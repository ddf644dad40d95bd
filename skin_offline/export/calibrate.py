"""The calibrated int4 pass: the decoder's linear weights quantized layer by layer on calibration activations.

Runs inside the layer-streamed export (quantize.quantize_graphs asks `Calibrator.take(name)` for each weight as it
streams, in graph order, so one decoder layer's weights are in memory at a time, as everywhere else in export).
For layer i, the calibration sequences' hidden states arrive through layers 0..i-1 *as quantized* (GPTQ's sequential
rule: each layer corrects for the error already made before it), and inside the layer each linear sees inputs
computed through the weights quantized before it ("true sequential"), all in one forward:
    x -> norm1 -> H(q,k,v) -> quantize q,k,v -> attention -> H(o) -> quantize o -> h = x + o(...)
      -> norm2 -> H(gate,up) -> quantize gate,up -> a = silu(gate) * up -> H(down) -> quantize down -> h + down(a)
The layer's modules are transformers' MistralDecoderLayer (the same reference the verification runs), fed the
checkpoint's weights and, as each is quantized, its dequantized copy. Sequences come in groups sharing a prefix
(layerstream.Group: BOS, "[INST] ", one image's features), whose keys each suffix attends to.
Memory at 7B widths: one layer's fp32 weights (0.87 GB) + dequantized copies, the largest Hessian (14336^2 fp32,
0.82 GB) and its factor, the calibration activations (positions x 4096 x 4 B, three copies) and, per position
chunk, the MLP's inner activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .choices import QuantMethod  # noqa: F401  (re-exported: the method enum lives with the CLI's choices)
from .gptq import Grid, Hessian, absmax_scales, block_scales, dequantize, gptq_codes, rtn_codes
from .layerstream import KV, Group, release_memory

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_MLP_STORE_BYTES = 1 << 30  # keep the MLP's inner activations for the second use up to this size, else recompute
_CHUNK = 2048  # positions per MLP chunk


@dataclass(frozen=True)
class MethodSpec:
    """What the calibrated pass does per weight (the measured default: both on; see README "int4 quality")."""

    gptq: bool = True  # error compensation (otherwise round to nearest on the chosen scales)
    scale_search: bool = True  # each block's scale by activation-weighted error (otherwise absmax)
    act_order: bool = True
    damp: float = 0.01
    # GPTQ only for weights with at most this many inputs; wider ones (Mistral-7B's down_proj, 14336) are rounded to
    # nearest on activation-searched scales. Why: GPTQ's cost and memory grow with K^2 (Hessian, 0.82 GB at 14336) and
    # K^3 (its factorization, ~2 TFLOP per layer there): on 2 CPU cores that alone would take the 7B export past its
    # time and memory bounds. Every linear of the proxy (K <= 1536) and all of 7B's others (K = 4096) get GPTQ.
    gptq_max_inputs: int = 8192

    def uses_gptq(self, k: int) -> bool:
        return self.gptq and k <= self.gptq_max_inputs

    def describe(self) -> str:
        parts = [
            f"GPTQ (act order, static block scales) on weights with <= {self.gptq_max_inputs} inputs, "
            f"round to nearest above"
            if self.gptq
            else "round to nearest"
        ]
        parts.append(
            "block scales searched by activation-weighted error" if self.scale_search else "absmax block scales"
        )
        return ", ".join(parts)


@dataclass
class LayerResult:
    codes: dict[str, np.ndarray] = field(default_factory=dict)  # canonical weight name -> [N,K] int8
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # -> [N, K/bs] fp32


class Calibrator:
    """Layer-by-layer calibrated quantization of one decoder's linears, on demand in layer order.

    `weights_of(i)`: layer i's tensors as MistralDecoderLayer names them (layerstream.LAYER_WEIGHTS), fp32 [out,in]
    torch; `stack`: a layerstream.CheckpointStack-like object (`cfg`, `rotary`, `num_layers`) for building layers;
    `groups`: the calibration sequences as embeddings."""

    def __init__(
        self,
        stack,
        weights_of: Callable[[int], dict],
        groups: list[Group],
        grid: Grid,
        spec: MethodSpec = MethodSpec(),
        on_layer: Callable[[int], None] | None = None,
        source: dict | None = None,
    ):
        self.stack, self.weights_of, self.grid, self.spec = stack, weights_of, grid, spec
        self.source = source or {}
        self.on_layer = on_layer
        self.hidden = [
            (g.prefix[None].astype(np.float32), [s[None].astype(np.float32) for s in g.suffixes]) for g in groups
        ]
        self.positions = sum(g.prefix.shape[0] + sum(s.shape[0] for s in g.suffixes) for g in groups)
        self.sequences = sum(len(g.suffixes) for g in groups)
        self.done = -1
        self.result: dict[int, LayerResult] = {}
        # graph weight name -> its input's max |x| per channel [K] over the calibration positions (as they arrive
        # through the quantized layers before it): what smooths the int8 prefill graph (codecs.smooth_factors)
        self.act_absmax: dict[str, np.ndarray] = {}

    # --- what the streaming writer calls ---
    def record(self) -> dict:
        """The manifest's account of the pass (method and calibration source; never file names)."""
        return {"method": self.spec.describe(), **self.source, "sequences": self.sequences, "positions": self.positions}

    def take(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(codes [N,K] int8, scales [N, K/bs] fp32) of checkpoint weight `name` ("layers.3.mlp.up_proj.weight");
        runs the layers up to its own first. Each weight is handed out once (then forgotten)."""
        i, lin = _split(name)
        while self.done < i:
            self._run_layer(self.done + 1)
        r = self.result[i]
        out = r.codes.pop(lin), r.scales.pop(lin)
        if not r.codes:
            del self.result[i]
        return out

    # --- one layer ---
    def _quantize(self, w, h: Hessian) -> tuple[np.ndarray, np.ndarray, "np.ndarray"]:
        """w [N,K] torch fp32 -> (codes, scales, dequantized [N,K] fp32)."""
        wn = w.numpy()
        scales = block_scales(wn, self.grid, h.diag()) if self.spec.scale_search else absmax_scales(wn, self.grid)
        if self.spec.uses_gptq(wn.shape[1]):
            codes = gptq_codes(wn, h.h, scales, self.grid, self.spec.damp, self.spec.act_order)
        else:
            codes = rtn_codes(wn, scales, self.grid)
        return codes, scales, dequantize(codes, scales, self.grid)

    def _hessian(self, k: int) -> Hessian:
        """The statistics of an input of width k that its weights' method reads: the full Hessian for GPTQ, else
        its diagonal (the scale search; plain rounding reads neither but the diagonal costs nothing)."""
        return Hessian(k, diag_only=not self.spec.uses_gptq(k))

    def _run_layer(self, i: int) -> None:
        import torch
        from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

        weights = self.weights_of(i)
        with torch.device("meta"):
            layer = MistralDecoderLayer(self.stack.cfg, 0)
        layer.load_state_dict(weights, assign=True)
        layer.eval()
        res = LayerResult()
        mods = {lin: layer.get_submodule(lin) for lin in LINEARS}

        def quantize(lins: tuple[str, ...], h: Hessian) -> None:
            for lin in lins:
                self.act_absmax[f"layers.{i}.{lin}.weight"] = h.absmax.numpy().copy()
                codes, scales, dq = self._quantize(mods[lin].weight.data, h)
                res.codes[lin], res.scales[lin] = codes, scales
                mods[lin].weight = torch.nn.Parameter(torch.from_numpy(dq), requires_grad=False)
                weights.pop(lin + ".weight", None)  # the checkpoint's copy goes as its dequantized one comes
            del h

        with torch.no_grad():
            seqs = [(hp, hs) for hp, hs in self.hidden]
            # q, k, v read norm1(x)
            h_qkv = self._hessian(self.stack.cfg.hidden_size)
            for hp, hs in seqs:
                for x in (hp, *hs):
                    h_qkv.add(layer.input_layernorm(torch.from_numpy(x)))
            quantize(LINEARS[:3], h_qkv)
            # o reads the attention's output, computed through the quantized q, k, v (prefix first: its keys)
            h_o = self._hessian(mods["self_attn.o_proj"].weight.shape[1])
            z = []
            for hp, hs in seqs:
                zp, past = self._attention(layer, hp, None)
                zs = [self._attention(layer, x, past)[0] for x in hs]
                for t in (zp, *zs):
                    h_o.add(t)
                z.append((zp, zs))
            quantize(LINEARS[3:4], h_o)
            # gate, up read norm2(x + o(z)); down reads silu(gate) * up
            o = mods["self_attn.o_proj"]
            resid = [
                (torch.from_numpy(hp) + o(zp), [torch.from_numpy(x) + o(t) for x, t in zip(hs, zs)])
                for (hp, hs), (zp, zs) in zip(seqs, z)
            ]
            del z
            flat = [t for rp, rs in resid for t in (rp, *rs)]  # [1,S,H] each, sequence order
            normed = [layer.post_attention_layernorm(t) for t in flat]
            h_gu = self._hessian(self.stack.cfg.hidden_size)
            for t in normed:
                h_gu.add(t)
            quantize(LINEARS[4:6], h_gu)
            mlp = layer.mlp
            store = self.positions * self.stack.cfg.intermediate_size * 4 <= _MLP_STORE_BYTES
            h_down = self._hessian(self.stack.cfg.intermediate_size)
            inner = []
            for t in normed:
                for c in range(0, t.shape[1], _CHUNK):
                    x = t[:, c : c + _CHUNK]
                    a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
                    h_down.add(a)
                    if store:
                        inner.append(a)
            quantize(LINEARS[6:], h_down)
            outs = []
            k = 0
            for r, t in zip(flat, normed):
                parts = []
                for c in range(0, t.shape[1], _CHUNK):
                    if store:
                        a = inner[k]
                        k += 1
                    else:
                        x = t[:, c : c + _CHUNK]
                        a = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
                    parts.append(r[:, c : c + _CHUNK] + mlp.down_proj(a))
                outs.append(torch.cat(parts, 1).numpy())
            del inner, normed, flat, resid
            it = iter(outs)
            self.hidden = [(next(it), [next(it) for _ in hs]) for _, hs in seqs]
        self.result[i] = res
        self.done = i
        mods.clear()  # (not `del`: the quantize closure above holds them)
        weights.clear()
        del layer
        release_memory()
        if self.on_layer is not None:
            self.on_layer(i)

    def _attention(self, layer, x: np.ndarray, past: KV | None):
        """Layer's attention on [1,S,H] hidden states after `past` -> (o_proj's input [1,S,heads*D] torch, (keys,
        values) incl. past): the o_proj input is captured by a hook (transformers computes o(z) too; unused)."""
        import torch

        from .layerstream import _PresentKV

        xt = torch.from_numpy(x)
        s = xt.shape[1]
        p = 0 if past is None else past[0].shape[2]
        pos = torch.arange(p, p + s)[None]
        j = torch.arange(p + s)[None, :]
        q = torch.arange(s)[:, None] + p
        mask = torch.where(j <= q, 0.0, torch.finfo(torch.float32).min)[None, None]
        cache = _PresentKV(None if past is None else past)
        seen = []
        hook = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            layer.self_attn(
                hidden_states=layer.input_layernorm(xt),
                position_embeddings=self.stack.rotary(xt, pos),
                attention_mask=mask,
                cache=cache,
            )
        finally:
            hook.remove()
        return seen[0], cache.present


def calibrated_weight(name: str) -> bool:
    """Whether the calibrated pass quantizes graph initializer `name` (a decoder layer's linear weight)."""
    return _split(name) is not None


def _split(name: str) -> tuple[int, str] | None:
    """ "layers.3.mlp.up_proj.weight" -> (3, "mlp.up_proj"); None for weights the pass does not quantize."""
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "layers" or parts[-1] != "weight":
        return None
    lin = ".".join(parts[2:-1])
    return (int(parts[1]), lin) if lin in LINEARS else None


class BundleLayers:
    """What the calibrated pass needs of an fp32 bundle's decoder graph (`quantize BUNDLE OUT`): transformers' layer
    config from the manifest's dims and each layer's weights read from the graph's initializers (MatMul weights are
    stored [in,out]: transposed back to the checkpoint's [out,in])."""

    def __init__(self, dims, source):
        from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

        from .layerstream import layer_config

        d = dims
        cfg = layer_config(
            d.vocab_size,
            d.hidden_size,
            d.intermediate_size,
            d.num_heads,
            d.num_kv_heads,
            d.head_dim,
            d.rope_theta,
            d.rms_norm_eps,
        )
        self.cfg, self.rotary, self.num_layers = cfg, MistralRotaryEmbedding(cfg), dims.num_layers
        self.source = source
        self.inits = {t.name: t for t in source.model.graph.initializer}

    def weights(self, i: int) -> dict:
        import torch

        from .layerstream import LAYER_WEIGHTS

        out = {}
        for k in LAYER_WEIGHTS:
            a = self.source.read(self.inits[f"layers.{i}.{k}"])
            out[k] = torch.from_numpy(np.ascontiguousarray(a.T if a.ndim == 2 else a, np.float32))
        return out


# --- what the pass costs (export --dry-run) -------------------------------------------------------------------
@dataclass(frozen=True)
class PassCost:
    flops: float  # the whole pass, all layers
    peak_bytes: int  # on top of the process: one layer's working set

    def seconds(self, gflops: float) -> float:
        """At `gflops` (measure_gflops: one large GEMM) scaled by the pass's measured PASS_EFFICIENCY."""
        return self.flops / (gflops * 1e9 * PASS_EFFICIENCY)


# The pass's rate against measure_gflops': one 7B-width layer over 6,196 positions (4.9 TFLOP by pass_cost) took
# 130 s on 2 AVX2 cores where measure_gflops read 98 GFLOPS (50 s). Why below 1: its linears run ~40 GFLOPS on
# per-sequence shapes, and GPTQ's column pass, the scale search (NumPy) and attention are not GEMM-bound. Without
# it the dry run predicted 26.8 min for the 7B pass that ran at ~69 min (before GPTQ's transposed pass).
PASS_EFFICIENCY = 0.4


def pass_cost(
    hidden: int,
    mlp: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    layers: int,
    positions: int,
    spec: MethodSpec,
    store_mlp: bool | None = None,
) -> PassCost:
    """FLOPs and peak working memory of the calibrated pass at these widths over `positions` calibration positions
    (attention scores ignored: sequences of a few hundred positions). Per layer: one forward through the layer's
    linears, the Hessians (X^T X: K^2 per position per distinct input), and per weight GPTQ's factorization
    (~2/3 K^3: one Cholesky, one triangular inverse) and column updates (N K^2)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (mlp, hidden), (mlp, hidden), (hidden, mlp)]
    forward = 2 * sum(n * k for n, k in shapes)
    inputs = [hidden, q, hidden, mlp]  # distinct inputs: norm1(x), attention out, norm2(h), silu(gate) * up
    hess = 2 * sum(k * k for k in inputs if spec.uses_gptq(k))
    gptq = sum(2 * n * k * k + (2 / 3) * k**3 for n, k in shapes if spec.uses_gptq(k))
    search = sum(n * k for n, k in shapes) * 6 * 17 if spec.scale_search else 0.0  # 17 candidate scales
    flops = layers * (positions * (forward + hess) + gptq + search)
    kmax = max([k for k in inputs if spec.uses_gptq(k)], default=0)
    if store_mlp is None:
        store_mlp = positions * mlp * 4 <= _MLP_STORE_BYTES
    weights = 4 * sum(n * k for n, k in shapes)
    acts = 4 * positions * (3 * hidden + q) + (4 * positions * mlp if store_mlp else 4 * _CHUNK * mlp * 3)
    factor = 4 * kmax * kmax * 4  # H, its flipped copy, the factor, its inverse
    return PassCost(flops, 2 * weights + acts + factor)


def measure_gflops(seconds: float = 0.3) -> float:
    """This machine's fp32 GEMM rate now (torch, its current threads), for the dry run's time estimate."""
    import time

    import torch

    a, b = torch.randn(1024, 2048), torch.randn(2048, 2048)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024 * 2048 * 2048 * n / (time.perf_counter() - t0) / 1e9
