"""One decoder layer (or the head) of a saved decoder graph as its own onnxruntime session, weights read in place.

Verification and the layer-streamed quality report run a decoder graph one layer at a time, so that memory holds
one layer's weights instead of the model (29 GB fp32 / 4-7 GB quantized at 7B). The builders record where each
layer starts and ends (names.GRAPH_LAYERS_KEY: the tensors whose sum is the hidden state in and out); a layer's
subgraph is every node between those tensors, found by walking back from its outputs, so it shares the preamble
(mask, RoPE, GQA lengths) and each node exactly with the full graph, and its initializers still point into the
bundle's `.data` file (onnxruntime reads only this layer's ranges).

`exact=True` makes the weight MatMuls compute in fp32 from the stored weights, for checks whose reference uses
the dequantized weights: MatMulNBits at accuracy_level 0 (no int8 activations), DynamicQuantizeMatMul replaced by
MatMul over (int8 codes x column scales). The check then isolates the graph's structure and stored bytes from
the kernels' activation rounding (which the quality report measures).

Hand-written rather than onnx.utils.Extractor: that one runs ONNX shape inference first and needs value_info for
every cut tensor, which contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization) do not get.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import names
from ..errors import BundleError

HEAD = -1  # `layer` index of the final norm + lm_head


@dataclass(frozen=True)
class Boundaries:
    layers: list[dict]  # [{"in": [...], "out": [...]}] per layer
    head_in: list[str]


def boundaries(model: onnx.ModelProto, graph_file: str) -> Boundaries:
    props = {p.key: p.value for p in model.metadata_props}
    if names.GRAPH_LAYERS_KEY not in props:
        raise BundleError(
            f"{graph_file} records no layer boundaries (exported by an older skin-offline); "
            f"re-export the bundle to verify it layer by layer"
        )
    d = json.loads(props[names.GRAPH_LAYERS_KEY])
    return Boundaries(d["layers"], d["head_in"])


class DecoderGraph:
    """A saved decoder graph's structure (no weights loaded) from which per-layer sessions are cut."""

    def __init__(self, path: Path, model: onnx.ModelProto | None = None):
        """`model`: the graph's structure when it is not (yet) a file at `path` (prefill_gate's candidate graph: its
        cuts' weights are filled in by the caller); `path` then names it and its folder."""
        self.path = Path(path)
        self.model = onnx.load(str(self.path), load_external_data=False) if model is None else model
        self.bounds = boundaries(self.model, self.path.name)
        g = self.model.graph
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.inits = {t.name: t for t in g.initializer}
        self.graph_inputs = {i.name: i for i in g.input}
        self.num_layers = len(self.bounds.layers)
        self.float_type = self.graph_inputs[names.INPUTS_EMBEDS].type.tensor_type.elem_type

    def cut(self, layer: int, exact: bool = False) -> onnx.ModelProto:
        """Layer `layer` (or HEAD) as a model: inputs = the boundary tensors in, the graph inputs its preamble reads,
        its past k/v; outputs = the boundary tensors out (+ its presents), or the logits for HEAD."""
        if layer == HEAD:
            cut_in, outs = list(self.bounds.head_in), [names.LOGITS]
        else:
            b = self.bounds.layers[layer]
            cut_in, outs = list(b["in"]), [*b["out"], names.present_key(layer), names.present_value(layer)]
        stop = set(cut_in)
        keep: set[int] = set()
        order = {id(n): j for j, n in enumerate(self.model.graph.node)}
        used_inputs: list[str] = []
        used_inits: dict[str, TensorProto] = {}
        todo = list(outs)
        seen = set()
        while todo:
            t = todo.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in stop:
                continue
            if t in self.inits:
                used_inits[t] = self.inits[t]
                continue
            if t in self.graph_inputs:
                used_inputs.append(t)
                continue
            node = self.producer.get(t)
            if node is None:
                raise BundleError(f"{self.path.name}: tensor {t!r} has no producer; the graph is malformed, re-export")
            if id(node) not in keep:
                keep.add(id(node))
                todo.extend(node.input)
        nodes = sorted((n for n in self.model.graph.node if id(n) in keep), key=lambda n: order[id(n)])
        if exact:
            nodes = _exact(nodes)
        ft = self.float_type
        inputs = [helper.make_tensor_value_info(n, ft, None) for n in cut_in]
        inputs += [self.graph_inputs[n] for n in sorted(set(used_inputs)) if n not in stop]
        outputs = [helper.make_tensor_value_info(n, ft, None) for n in outs]
        graph = helper.make_graph(
            nodes, f"{self.model.graph.name}_cut{layer}", inputs, outputs, list(used_inits.values())
        )
        m = helper.make_model(graph, opset_imports=list(self.model.opset_import), producer_name="skin-offline")
        m.ir_version = self.model.ir_version
        return m

    def signature(self, layer: int) -> list:
        """Layer `layer`'s computation with its index taken out: ops, attributes and wiring, with initializers named
        by their layer-free name (`layers.*.mlp.up_proj.weight`) or, for inline constants, their value, and other
        tensors by order of appearance. Two layers with equal signatures compute the same function of their own
        weights (verify.py checks the rest of the layers against a numerically checked one this way)."""
        import hashlib

        model = self.cut(layer)
        init = {t.name: t for t in model.graph.initializer}
        tag = f"layers.{layer}."
        cut_in = self.bounds.head_in if layer == HEAD else self.bounds.layers[layer]["in"]
        ids: dict[str, str] = {t: f"x{k}" for k, t in enumerate(cut_in)}  # the hidden state in, however it arrives

        def name(t: str) -> str:
            if not t:
                return ""
            if t in ids:
                return ids[t]
            if t in init:
                x = init[t]
                if x.data_location == TensorProto.EXTERNAL:
                    return "w:" + t.replace(tag, "layers.*.")
                anon = TensorProto()
                anon.CopyFrom(x)
                anon.name = ""
                return f"c:{hashlib.sha256(anon.SerializeToString()).hexdigest()[:16]}"
            for a, b in (
                (names.past_key(layer), "past_k"),
                (names.past_value(layer), "past_v"),
                (names.present_key(layer), "present_k"),
                (names.present_value(layer), "present_v"),
            ):
                if t == a:
                    return b
            if t in self.graph_inputs:
                return "in:" + t
            return ids.setdefault(t, f"t{len(ids)}")

        sig = []
        for n in model.graph.node:
            attrs = tuple(sorted((a.name, a.SerializeToString()) for a in n.attribute))
            sig.append((n.op_type, n.domain, attrs, tuple(name(i) for i in n.input), tuple(name(o) for o in n.output)))
        return sig

    def session(self, layer: int, threads: int | None = None, exact: bool = False):
        """An onnxruntime session of `cut(layer)` reading its weights from the graph's folder."""
        return self.session_of(self.cut(layer, exact), layer, threads)

    def session_of(self, cut: onnx.ModelProto, layer: int, threads: int | None = None):
        """An onnxruntime session of `cut` (one of this graph's cuts, possibly rewritten), external weights read from
        the graph's folder."""
        import onnxruntime as ort

        from ..runtime.sessions import SessionFactory

        so = SessionFactory(threads=threads).options()
        # the cut model lives in memory: its external initializers resolve against the bundle folder
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path.parent))
        try:
            return ort.InferenceSession(cut.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(
                f"cannot load layer {layer} of {self.path.name}: {first}; run `skin-offline verify`"
            ) from None


def _exact(nodes: list) -> list:
    """fp32 compute over the stored weights (see the module docstring)."""
    out = []
    for n in nodes:
        if n.op_type == "MatMulNBits" and n.domain == "com.microsoft":
            m = onnx.NodeProto()
            m.CopyFrom(n)
            del m.attribute[:]
            m.attribute.extend(a for a in n.attribute if a.name != "accuracy_level")
            out.append(m)
        elif n.op_type == "DynamicQuantizeMatMul" and n.domain == "com.microsoft":
            # x @ (B * s) = (x @ B) * s for per-column scales s [N]: scaling the output keeps one fp32 copy of B
            # (the folded Cast) instead of two while onnxruntime folds constants
            a, b, scale = n.input[0], n.input[1], n.input[2]
            bf, y = n.name + "_exact_b", n.name + "_exact_y"
            out.append(helper.make_node("Cast", [b], [bf], name=n.name + "_cast", to=TensorProto.FLOAT))
            out.append(helper.make_node("MatMul", [a, bf], [y], name=n.name + "_exact"))
            out.append(helper.make_node("Mul", [y, scale], list(n.output), name=n.name + "_scale"))
        else:
            out.append(n)
    return out


def run_layer(
    session,
    hidden: np.ndarray,
    past: tuple[np.ndarray, np.ndarray] | None,
    layer: int,
    kv_heads: int,
    head_dim: int,
    dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[1,S,H] hidden state after `past` ([1,kvH,P,D] keys, values) -> (hidden out [1,S,H], present k, v [1,kvH,P+S,D])."""
    s = hidden.shape[1]
    if past is None:
        past = (np.zeros((1, kv_heads, 0, head_dim), dtype), np.zeros((1, kv_heads, 0, head_dim), dtype))
    p = past[0].shape[2]
    feed = _feed(session, hidden, p, s, dtype)
    feed[names.past_key(layer)] = np.ascontiguousarray(past[0], dtype)
    feed[names.past_value(layer)] = np.ascontiguousarray(past[1], dtype)
    outs = session.run(None, feed)
    n_out = len(session.get_outputs()) - 2
    h = outs[0].astype(np.float32)
    for extra in outs[1:n_out]:  # the contrib graph's hidden state is two halves of a residual add
        h = h + extra.astype(np.float32)
    return h, outs[n_out], outs[n_out + 1]


def run_head(session, hidden: np.ndarray, keep: int, dtype=np.float32) -> np.ndarray:
    """[1,S,H] final hidden state -> [1,keep,V] logits of the last `keep` positions."""
    feed = _feed(session, hidden, 0, hidden.shape[1], dtype)
    feed[names.NUM_LOGITS_TO_KEEP] = np.array(keep, np.int64)
    return session.run(None, feed)[0].astype(np.float32)


def _feed(session, hidden: np.ndarray, past: int, s: int, dtype) -> dict:
    """Inputs of a cut: the first boundary tensor gets the hidden state, further ones zeros (x = a + 0 exactly);
    graph inputs the preamble reads (shape of the embeddings, mask, positions) as a request of S tokens after P."""
    feed = {}
    first = True
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            continue
        if i.name == names.ATTENTION_MASK:
            feed[i.name] = np.ones((1, past + s), np.int64)
        elif i.name == names.POSITION_IDS:
            feed[i.name] = (past + np.arange(s, dtype=np.int64))[None]
        elif i.name == names.NUM_LOGITS_TO_KEEP:
            feed[i.name] = np.array(1, np.int64)
        elif i.name == names.INPUTS_EMBEDS and not first:  # read for its shape only
            feed[i.name] = np.ascontiguousarray(hidden, dtype)
        else:
            feed[i.name] = np.ascontiguousarray(hidden if first else np.zeros_like(hidden), dtype)
            first = False
    return feed
