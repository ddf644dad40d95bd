"""The KV-cached Mistral decoder on onnxruntime contrib ops (Flavor.CONTRIB), weights streamed as in decoder_graph.

Same I/O names and semantics as the standard graph (decoder_graph.py), so either graph runs under the same
runtime: inputs_embeds [B,S,H] + attention_mask [B,P+S] + position_ids [B,S] + num_logits_to_keep [] + past
k/v [B,kvH,P,D] per layer -> logits [B,k,V] + present k/v. One addition: when a past buffer is bound to the
same memory as its present output (onnxruntime's past-present share-buffer mode), P is the buffer capacity,
GroupQueryAttention writes the new keys in place at [T-S, T) (T = attention_mask length) and the present is
that same buffer; the runtime uses this to decode without reallocating or copying the cache.

Per layer (about a quarter of the standard graph's nodes):
  SkipSimplifiedLayerNormalization (residual add + RMSNorm in one pass) -> q/k/v MatMuls ->
  RotaryEmbedding on q and k (per-row positions, so left-padded batches keep HF's cumsum(mask)-1 positions) ->
  GroupQueryAttention (grouped heads without repeat_kv, causal, attention_bias from the padding mask) ->
  o_proj MatMul -> SkipSimplifiedLayerNormalization -> gate/up MatMuls -> SiLU * up -> down MatMul.
Why a separate RotaryEmbedding rather than GQA's do_rotary: GQA's fused rotary uses only the first row's
position on a first prompt, which would mis-rotate left-padded rows. Every weight stays MatMul(x, W[in,out]) so
the streaming MatMul -> MatMulNBits quantizer applies unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto, helper

from .. import names
from .checkpoint import TextSpec
from .decoder_graph import TensorFn
from .onnx_writer import ExternalData, GraphBuilder, save

OPSET = 17
MS = "com.microsoft"
MS_OPSET = 1
F32 = TensorProto.FLOAT
I32 = TensorProto.INT32
I64 = TensorProto.INT64


def rope_tables(spec: TextSpec, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_positions, D/2] with transformers' float32 arithmetic (inv_freq, pos * inv_freq)."""
    D = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / D))
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _skip_norm(g: GraphBuilder, x: str, resid: str, weight: str, eps: float, hint: str) -> tuple[str, str]:
    # (x, resid) [B,S,H] -> (RMSNorm(x + resid), x + resid); outputs 1-2 (mean, inv_std) are not wanted
    out, total = g.fresh(hint), g.fresh(hint + "_sum")
    g.nodes.append(
        helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [x, resid, weight],
            [out, "", "", total],
            name=g.fresh("n_SkipSLN"),
            domain=MS,
            epsilon=eps,
        )
    )
    return out, total


def build_decoder_fast(
    spec: TextSpec,
    tensor: TensorFn,
    out_dir: Path,
    progress: Callable[[int], None] | None = None,
    max_positions: int | None = None,
    shared: dict | None = None,
) -> tuple[str, str]:
    """Write decoder_contrib.onnx + its .data into out_dir. Returns the two file names.

    `max_positions` (default spec.max_context) sizes the RoPE tables: the bundle's context limit, which the
    runtime enforces (positions past the table would be out of range for RotaryEmbedding). `shared`: the
    standard graph's external initializers (onnx_writer.external_initializers) to reference instead of rewriting."""
    graph_file = names.DECODER_CONTRIB_GRAPH
    data_file = names.external_data_name(graph_file)
    data = ExternalData(Path(out_dir) / data_file)
    model = decoder_fast_model(spec, tensor, data, progress, max_positions, shared)
    data.close()
    save(model, Path(out_dir) / graph_file)
    return graph_file, data_file


def decoder_fast_model(
    spec: TextSpec,
    tensor: TensorFn,
    data,
    progress: Callable[[int], None] | None = None,
    max_positions: int | None = None,
    shared: dict | None = None,
):
    """The contrib-op decoder graph, its weights sent to `data` (ExternalData, or LazyData: see decoder_graph)."""
    g = GraphBuilder(data, shared=shared)
    H, D, nH, kvH = spec.hidden, spec.head_dim, spec.heads, spec.kv_heads
    eps = float(spec.rms_norm_eps)

    x = g.input(names.INPUTS_EMBEDS, F32, ["batch", "seq", H])
    mask = g.input(names.ATTENTION_MASK, I64, ["batch", "total"])
    pos = g.input(names.POSITION_IDS, I64, ["batch", "seq"])
    keep = g.input(names.NUM_LOGITS_TO_KEEP, I64, [])

    cos_np, sin_np = rope_tables(spec, max_positions or spec.max_context)
    cos, sin = g.w("rope_cos_cache", cos_np), g.w("rope_sin_cache", sin_np)

    # Each row's cache ends at its last attended slot: seqlens_k[b] = (index of the last 1 in mask[b]), so one decode
    # run serves rows of different lengths (the engine's slots: row b right-padded after its own length, its new
    # key written at that index). Left-padded rows (beam / label batches) end at T-1 as before; their padding is
    # hidden by the additive bias, as in the standard graph.
    mask_shape = g.op("Shape", mask)
    total64 = g.op("Gather", mask_shape, g.c([1]), axis=0)  # [1] T (GraphBuilder.c stores 0-d constants as [1])
    total = g.op("Cast", g.op("Squeeze", total64, g.c([0])), to=I32)  # [] scalar, as GQA requires (the batch max)
    batch = g.op("Gather", mask_shape, g.c([0]), axis=0)  # [1]
    slot_ids = g.op("Range", g.c(1), g.op("Add", g.op("Squeeze", total64, g.c([0])), g.c(1)), g.c(1))  # [T] 1..T
    last = g.op("ReduceMax", g.op("Mul", mask, slot_ids), axes=[1], keepdims=0)  # [B] 1 + index of the last 1
    seqlens_k = g.op("Cast", g.op("Sub", last, g.c(1)), to=I32)  # [B] total length - 1 per row
    seq = g.op("Gather", g.op("Shape", x), g.c([1]), axis=0)  # [1]
    pad = g.op("Unsqueeze", g.op("Cast", mask, to=TensorProto.BOOL), g.c([1, 2]))  # [B,1,1,T]
    bias = g.op("Where", pad, g.c(0.0, np.float32), g.c(np.finfo(np.float32).min, np.float32))
    bias = g.op(
        "Expand", bias, g.op("Concat", batch, g.c([1]), seq, total64, axis=0), hint="attn_bias"
    )  # [B,1,S,T] (GQA wants the S axis spelled out)

    def norm_w(name: str) -> str:
        return g.w_shared(name, lambda: tensor(name))

    def linear(x: str, name: str, hint: str) -> str:  # weights stored [in,out], as in decoder_graph.py
        return g.op("MatMul", x, g.w_shared(name, lambda: tensor(name).T), hint=hint)

    resid = x
    h = g.op(
        "SimplifiedLayerNormalization",
        x,
        norm_w("layers.0.input_layernorm.weight"),
        axis=-1,
        epsilon=eps,
        stash_type=1,
        hint="ln0",
    )
    # the hidden state between layers is never one tensor here: layer i leaves it as down_proj output + residual,
    # which the next SkipSimplifiedLayerNormalization adds (names.GRAPH_LAYERS_KEY records both halves)
    layers, x_in = [], [x]
    for i in range(spec.layers):
        p = f"layers.{i}."
        past_k = g.input(names.past_key(i), F32, ["batch", kvH, "past", D])
        past_v = g.input(names.past_value(i), F32, ["batch", kvH, "past", D])
        # q/k/v (and gate/up below) stay separate MatMuls with the standard graph's weight names and [in,out]
        # layout, so this graph shares the standard graph's external data: no second copy of the weights
        # (28 GB at 7B); GQA takes unpacked query/key/value directly.
        q = linear(h, p + "self_attn.q_proj.weight", f"q{i}")
        k = linear(h, p + "self_attn.k_proj.weight", f"k{i}")
        v = linear(h, p + "self_attn.v_proj.weight", f"v{i}")
        q = g.op("RotaryEmbedding", q, pos, cos, sin, domain=MS, hint=f"q_rot{i}")
        k = g.op("RotaryEmbedding", k, pos, cos, sin, domain=MS, hint=f"k_rot{i}")
        attn = g.fresh(f"attn{i}")
        g.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [q, k, v, past_k, past_v, seqlens_k, total, "", "", "", bias],
                [attn, names.present_key(i), names.present_value(i)],
                name=g.fresh("n_GQA"),
                domain=MS,
                num_heads=nH,
                kv_num_heads=kvH,
                do_rotary=0,
                scale=float(1.0 / np.sqrt(D)),
            )
        )
        g.output(names.present_key(i), F32, ["batch", kvH, "present", D])
        g.output(names.present_value(i), F32, ["batch", kvH, "present", D])
        o = linear(attn, p + "self_attn.o_proj.weight", f"o{i}")
        h, resid = _skip_norm(g, o, resid, norm_w(p + "post_attention_layernorm.weight"), eps, f"ln{i}b")
        gate = linear(h, p + "mlp.gate_proj.weight", f"gate{i}")
        up = linear(h, p + "mlp.up_proj.weight", f"up{i}")
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        m = linear(act, p + "mlp.down_proj.weight", f"down{i}")
        layers.append({"in": x_in, "out": [m, resid]})
        x_in = [m, resid]
        if i + 1 < spec.layers:
            nxt = f"layers.{i + 1}.input_layernorm.weight"
            h, resid = _skip_norm(g, m, resid, norm_w(nxt), eps, f"ln{i + 1}a")
        if progress:
            progress(i + 1)

    g.metadata[names.GRAPH_LAYERS_KEY] = json.dumps({"layers": layers, "head_in": [m, resid]})
    # only the last `keep` positions reach the final norm and the lm_head
    start, end = g.op("Neg", g.op("Unsqueeze", keep, g.c([0]))), g.c([np.iinfo(np.int64).max])
    m_last = g.op("Slice", m, start, end, g.c([1]))
    r_last = g.op("Slice", resid, start, end, g.c([1]))
    h, _ = _skip_norm(g, m_last, r_last, norm_w("norm.weight"), eps, "ln_final")
    g.op_named("MatMul", [h, g.w_shared("lm_head.weight", lambda: tensor("lm_head.weight").T)], names.LOGITS)
    g.output(names.LOGITS, F32, ["batch", "keep", spec.vocab])
    return g.model("skinvl_decoder_contrib", OPSET, {MS: MS_OPSET})
