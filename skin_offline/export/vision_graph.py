"""CLIP vision tower (trimmed to the selected layer) + mlp2x_gelu projector as one standard-op ONNX graph.

pixel_values [B,3,S,S] -> image_features [B,N,H_text]: patch conv, CLS + position embeddings, pre-LN,
the first `kept_layers` encoder layers (hidden_states[select_layer], no post-layernorm), CLS dropped,
Linear -> GELU(erf) -> Linear. Written with the same streaming builder as the decoder (no torch export:
one code path, bounded memory, and nothing version-fragile between torch and transformers releases).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto

from .. import names
from ..errors import CheckpointError
from .checkpoint import VisionSpec
from .onnx_writer import ExternalData, GraphBuilder, save

OPSET = 17
F32 = TensorProto.FLOAT
TensorFn = Callable[[str], np.ndarray]


def _layer_norm(g: GraphBuilder, x: str, prefix: str, tensor: TensorFn, eps: float) -> str:
    return g.op(
        "LayerNormalization",
        x,
        g.w(prefix + ".weight", tensor(prefix + ".weight")),
        g.w(prefix + ".bias", tensor(prefix + ".bias")),
        axis=-1,
        epsilon=eps,
    )


def _dense(g: GraphBuilder, x: str, prefix: str, tensor: TensorFn) -> str:
    y = g.op("MatMul", x, g.w(prefix + ".weight", tensor(prefix + ".weight").T), hint=prefix.replace(".", "_"))
    return g.op("Add", y, g.w(prefix + ".bias", tensor(prefix + ".bias")))


def _act(g: GraphBuilder, x: str, kind: str) -> str:
    if kind == "quick_gelu":  # x * sigmoid(1.702 x), CLIP's activation
        return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, g.c(1.702, np.float32))))
    if kind == "gelu":  # exact erf GELU (onnxruntime fuses this pattern into Gelu)
        erf = g.op("Erf", g.op("Div", x, g.c(np.sqrt(2.0), np.float32)))
        return g.op("Mul", g.op("Mul", x, g.c(0.5, np.float32)), g.op("Add", erf, g.c(1.0, np.float32)))
    raise CheckpointError(f"vision activation {kind!r} not supported (expected quick_gelu or gelu)")


def build_vision(
    spec: VisionSpec,
    tensor: TensorFn,
    projector: TensorFn,
    out_dir: Path,
    external: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[str, tuple[str, ...]]:
    """Write vision.onnx (+ .data) into out_dir. Returns (graph file, data files). `progress(i)` after layer i."""
    graph_file = names.VISION_GRAPH
    data_file = names.external_data_name(graph_file)
    data = ExternalData(Path(out_dir) / data_file) if external else None
    g = GraphBuilder(data)
    hid, nh = spec.hidden, spec.heads
    hd = hid // nh
    grid = spec.image_size // spec.patch_size
    n_tok = grid * grid + 1

    px = g.input(names.PIXEL_VALUES, F32, ["batch", 3, spec.image_size, spec.image_size])
    patches = g.op(
        "Conv",
        px,
        g.w("embeddings.patch_embedding.weight", tensor("embeddings.patch_embedding.weight")),
        strides=[spec.patch_size] * 2,
        kernel_shape=[spec.patch_size] * 2,
    )  # [B,hid,g,g]
    patches = g.op("Transpose", g.op("Reshape", patches, g.c([0, hid, grid * grid])), perm=[0, 2, 1])  # [B,N,hid]
    batch = g.op("Slice", g.op("Shape", px), g.c([0]), g.c([1]))
    cls = g.w("embeddings.class_embedding", tensor("embeddings.class_embedding").reshape(1, 1, hid))
    cls = g.op("Expand", cls, g.op("Concat", batch, g.c([1, hid]), axis=0))  # [B,1,hid]
    x = g.op("Concat", cls, patches, axis=1)  # [B,N+1,hid]
    pos = tensor("embeddings.position_embedding.weight")
    if pos.shape[0] != n_tok:
        raise CheckpointError(f"CLIP position table has {pos.shape[0]} rows, expected {n_tok} for {spec.image_size}px")
    x = g.op("Add", x, g.w("embeddings.position_embedding.weight", pos))
    x = _layer_norm(g, x, "pre_layrnorm", tensor, spec.layer_norm_eps)

    scale = g.c(hd**-0.5, np.float32)
    for i in range(spec.kept_layers):
        p = f"encoder.layers.{i}."
        h = _layer_norm(g, x, p + "layer_norm1", tensor, spec.layer_norm_eps)

        def heads(t: str) -> str:  # [B,T,hid] -> [B,nh,T,hd]
            return g.op("Transpose", g.op("Reshape", t, g.c([0, 0, nh, hd])), perm=[0, 2, 1, 3])

        q = heads(_dense(g, h, p + "self_attn.q_proj", tensor))
        k = heads(_dense(g, h, p + "self_attn.k_proj", tensor))
        v = heads(_dense(g, h, p + "self_attn.v_proj", tensor))
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
        ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # [B,nh,T,hd]
        ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.c([0, 0, hid]))
        x = g.op("Add", x, _dense(g, ctx, p + "self_attn.out_proj", tensor))
        h = _layer_norm(g, x, p + "layer_norm2", tensor, spec.layer_norm_eps)
        h = _dense(g, _act(g, _dense(g, h, p + "mlp.fc1", tensor), spec.hidden_act), p + "mlp.fc2", tensor)
        x = g.op("Add", x, h)
        if progress:
            progress(i + 1)

    feats = g.op("Slice", x, g.c([1]), g.c([n_tok]), g.c([1]))  # drop CLS: [B,N,hid]
    h = _act(g, _dense(g, feats, "linear_1", projector), "gelu")
    out = _dense(g, h, "linear_2", projector)
    g.op_named("Identity", [out], names.IMAGE_FEATURES)
    g.output(names.IMAGE_FEATURES, F32, ["batch", n_tok - 1, "hidden"])
    if data is not None:
        data.close()
    save(g.model("skinvl_vision", OPSET), Path(out_dir) / graph_file)
    return graph_file, ((data_file,) if data is not None else ())
