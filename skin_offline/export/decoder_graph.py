"""The KV-cached Mistral decoder as a standard-op ONNX graph, weights streamed one tensor at a time.

inputs_embeds [B,S,H] + attention_mask [B,P+S] + position_ids [B,S] + past k/v [B,kvH,P,D] per layer
-> logits [B,k,V] for the last k positions + present k/v [B,kvH,P+S,D].

Same math as transformers' MistralModel (eager): RMSNorm, RoPE (rotate_half, theta from config), GQA
via a grouped 5-D matmul (no repeated K/V copies), causal + padding mask, SiLU-gated MLP. onnxruntime
fuses the RMSNorm pattern into SimplifiedLayerNormalization at load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto

from .. import names
from .checkpoint import TextSpec
from .onnx_writer import ExternalData, GraphBuilder, save

OPSET = 17
F32 = TensorProto.FLOAT
I64 = TensorProto.INT64

# name (canonical, see checkpoint.py) -> fp32 numpy array
TensorFn = Callable[[str], np.ndarray]


def _rms_norm(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    # [B,S,H] -> [B,S,H]; the Pow/ReduceMean/Add/Sqrt/Div/Mul pattern onnxruntime fuses
    var = g.op("ReduceMean", g.op("Pow", x, g.c(2.0, np.float32)), axes=[-1], keepdims=1)
    normed = g.op("Div", x, g.op("Sqrt", g.op("Add", var, g.c(eps, np.float32))))
    return g.op("Mul", normed, weight)


def _rotate(g: GraphBuilder, x: str, cos: str, sin: str, half: str) -> str:
    # x [B,h,S,D]: x*cos + rotate_half(x)*sin, rotate_half = cat(-x2, x1)
    x1, x2 = g.op("Split", x, half, axis=-1, n_out=2)
    rot = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rot, sin))


def _linear(g: GraphBuilder, x: str, name: str, tensor: TensorFn) -> str:
    # weights stored transposed [in, out] so MatMul(x, W) needs no Transpose (and MatMulNBits can pack it)
    return g.op("MatMul", x, g.w(name, tensor(name).T), hint=name.replace(".", "_"))


def build_decoder(
    spec: TextSpec, tensor: TensorFn, out_dir: Path, progress: Callable[[int], None] | None = None
) -> tuple[str, str]:
    """Write decoder.onnx + decoder.onnx.data into out_dir. Returns the two file names."""
    graph_file = names.DECODER_GRAPH
    data_file = names.external_data_name(graph_file)
    data = ExternalData(Path(out_dir) / data_file)
    model = decoder_model(spec, tensor, data, progress)
    data.close()
    save(model, Path(out_dir) / graph_file)
    return graph_file, data_file


def decoder_model(spec: TextSpec, tensor: TensorFn, data, progress: Callable[[int], None] | None = None):
    """The standard-op decoder graph, its weights sent to `data` (onnx_writer.ExternalData, or LazyData to build
    the structure first and stream the weights later, through quantize_graph)."""
    g = GraphBuilder(data)
    H, D, nH, kvH = spec.hidden, spec.head_dim, spec.heads, spec.kv_heads
    rep = nH // kvH

    x = g.input(names.INPUTS_EMBEDS, F32, ["batch", "seq", H])
    mask = g.input(names.ATTENTION_MASK, I64, ["batch", "total"])
    pos = g.input(names.POSITION_IDS, I64, ["batch", "seq"])
    keep = g.input(names.NUM_LOGITS_TO_KEEP, I64, [])

    # RoPE tables from positions: [B,S] -> cos/sin [B,1,S,D]
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / D))
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=F32), g.c([-1])), g.c(inv_freq, np.float32))
    emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.c([1]))
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)
    half = g.c([D // 2, D // 2])

    # additive mask [B,1,1,S,T]: key j visible to query i iff mask[b,j] and j <= P+i  (P = T-S)
    total = g.op("Gather", g.op("Shape", mask), g.c(1), axis=0)
    seq = g.op("Gather", g.op("Shape", x), g.c(1), axis=0)
    rows = g.op("Range", g.op("Sub", total, seq), total, g.c(1))  # [S] absolute query positions
    cols = g.op("Range", g.c(0), total, g.c(1))  # [T]
    causal = g.op("LessOrEqual", g.op("Unsqueeze", cols, g.c([0])), g.op("Unsqueeze", rows, g.c([1])))  # [S,T]
    pad = g.op("Unsqueeze", g.op("Cast", mask, to=TensorProto.BOOL), g.c([1, 2, 3]))  # [B,1,1,1,T]
    allowed = g.op("And", causal, pad)  # [B,1,1,S,T]
    bias = g.op("Where", allowed, g.c(0.0, np.float32), g.c(np.finfo(np.float32).min, np.float32), hint="attn_bias")
    scale = g.c(1.0 / np.sqrt(D), np.float32)

    layers = []  # per layer: the hidden state in and out (names.GRAPH_LAYERS_KEY)
    for i in range(spec.layers):
        p = f"layers.{i}."
        x_in = x
        past_k = g.input(names.past_key(i), F32, ["batch", kvH, "past", D])
        past_v = g.input(names.past_value(i), F32, ["batch", kvH, "past", D])
        h = _rms_norm(g, x, g.w(p + "input_layernorm.weight", tensor(p + "input_layernorm.weight")), spec.rms_norm_eps)

        def heads(t: str, n: int) -> str:  # [B,S,n*D] -> [B,n,S,D]
            return g.op("Transpose", g.op("Reshape", t, g.c([0, 0, n, D])), perm=[0, 2, 1, 3])

        q = _rotate(g, heads(_linear(g, h, p + "self_attn.q_proj.weight", tensor), nH), cos, sin, half)
        k = _rotate(g, heads(_linear(g, h, p + "self_attn.k_proj.weight", tensor), kvH), cos, sin, half)
        v = heads(_linear(g, h, p + "self_attn.v_proj.weight", tensor), kvH)
        k_all = g.op_named("Concat", [past_k, k], names.present_key(i), axis=2)  # [B,kvH,T,D]
        v_all = g.op_named("Concat", [past_v, v], names.present_value(i), axis=2)
        g.output(names.present_key(i), F32, ["batch", kvH, "total", D])
        g.output(names.present_value(i), F32, ["batch", kvH, "total", D])

        # grouped attention: q [B,kvH,rep,S,D] against k [B,kvH,1,T,D] (head h = kv*rep + r, as repeat_kv)
        q5 = g.op("Reshape", q, g.c([0, kvH, rep, -1, D]))
        k5 = g.op("Unsqueeze", k_all, g.c([2]))
        v5 = g.op("Unsqueeze", v_all, g.c([2]))
        scores = g.op("Mul", g.op("MatMul", q5, g.op("Transpose", k5, perm=[0, 1, 2, 4, 3])), scale)
        probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)  # [B,kvH,rep,S,T]
        ctx = g.op("Reshape", g.op("MatMul", probs, v5), g.c([0, nH, -1, D]))  # [B,nH,S,D]
        ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.c([0, 0, nH * D]))  # [B,S,nH*D]
        x = g.op("Add", x, _linear(g, ctx, p + "self_attn.o_proj.weight", tensor), hint=f"resid{i}a")

        h = _rms_norm(
            g,
            x,
            g.w(p + "post_attention_layernorm.weight", tensor(p + "post_attention_layernorm.weight")),
            spec.rms_norm_eps,
        )
        gate = _linear(g, h, p + "mlp.gate_proj.weight", tensor)
        up = _linear(g, h, p + "mlp.up_proj.weight", tensor)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        x = g.op("Add", x, _linear(g, act, p + "mlp.down_proj.weight", tensor), hint=f"resid{i}b")
        layers.append({"in": [x_in], "out": [x]})
        if progress:
            progress(i + 1)

    g.metadata[names.GRAPH_LAYERS_KEY] = json.dumps({"layers": layers, "head_in": [x]})
    x = _rms_norm(g, x, g.w("norm.weight", tensor("norm.weight")), spec.rms_norm_eps)
    last = g.op("Slice", x, g.op("Neg", g.op("Unsqueeze", keep, g.c([0]))), g.c([np.iinfo(np.int64).max]), g.c([1]))
    g.op_named("MatMul", [last, g.w("lm_head.weight", tensor("lm_head.weight").T)], names.LOGITS)
    g.output(names.LOGITS, F32, ["batch", "keep", spec.vocab])
    return g.model("skinvl_decoder", OPSET)
