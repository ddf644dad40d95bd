"""Verification: every graph of a bundle checked against its checkpoint, in the memory of one decoder layer.

Run during the layer-streamed reference pass (layerstream.py), on probe 0's prompt (the first VERIFY_ROWS
positions: BOS, "[INST]", image features), for every decoder graph of the bundle:
- weights, every layer: every weight the layer stores equals the checkpoint's tensor, exactly, for its codec
  (weights_check.py);
- computation, layers 0, 1 and the last: the graph's layer cut (subgraph.py) fed the reference's hidden state, in
  two calls (the first positions, then the rest after their keys: the KV path too), against transformers'
  MistralDecoderLayer. A quantized graph is cut in exact mode (its weight MatMuls in fp32 over the stored weights)
  and compared with transformers running the weights decoded from its bytes, so the bound is fp32 rounding
  whatever the precision; what the quantized kernels' own rounding costs is the quality report's business;
- computation, the other layers: the same ops, attributes and wiring as layer 1, up to the layer index in the
  weight names (subgraph.DecoderGraph.signature). With their weights exact, that makes them layer 1's checked
  function of their own weights; it costs nothing, where a numeric check costs a dequantized copy of the layer
  (0.9 GB at 7B widths) and tens of seconds;
- the head (final norm + lm_head) the same way, the embedding table's rows against the checkpoint's, and each
  vision graph against transformers' CLIP tower + projector on the probe images.
A layer that fails names the graph, the layer and the weight (or the relative difference and its bound); the
export then stops and writes nothing. The per-layer checks stand for the whole graph because every layer is
written by the same builder code and the cuts run the graph's own nodes, preamble included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import names
from ..errors import SkinOfflineError
from ..manifest import Kernel, Manifest, Precision

VERIFY_ROWS = 48  # positions of probe 0 the layer checks run on (split 32 + 16: the second call reads the first's keys)
SPLIT = 32
# relative difference (|graph - reference| / |reference's layer update|) allowed, by how the cut computes:
BOUND = {"fp32": 1e-4, "fp16": 3e-2}  # exact-mode quantized cuts compute in fp32: the fp32 bound
VISION_COSINE_INT8 = 0.99  # int8 vision (dynamic quantization) is not exact: feature cosine with the reference


class VerificationError(SkinOfflineError):
    """The exported graphs do not compute what the checkpoint does: an exporter bug or a damaged bundle."""

    exit_code = 4


@dataclass
class GraphCheck:
    file: str
    precision: str
    exact: bool  # cut in exact mode (quantized weights computed in fp32)
    layers: int = 0
    numeric_layers: int = 0  # of them, checked against transformers (the others: by signature against layer 1)
    max_rel_diff: float = 0.0
    head_rel_diff: float | None = None
    weights: int = 0
    values: int = 0

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "layers_checked": self.layers,
            "layers_run": self.numeric_layers,
            "max_layer_rel_diff": self.max_rel_diff,
            "head_rel_diff": self.head_rel_diff,
            "weights_checked": self.weights,
            "values_checked": self.values,
            "mode": "stored weights, fp32 compute" if self.exact else "as stored",
        }


@dataclass
class Verifier:
    folder: Path
    manifest: Manifest
    threads: int | None = None
    checks: dict[str, GraphCheck] = field(default_factory=dict)
    other: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self):
        from .layerstream import GraphStack
        from .weights_check import StoredWeights

        L = self.manifest.model.num_layers
        self.numeric = {0, min(1, L - 1), L - 1}  # layers checked against transformers; the rest by signature
        self._signature: dict[str, list] = {}
        self.graphs = {}
        for g in self.manifest.variants(names.ROLE_DECODER):
            exact = g.precision != Precision.FP32 and g.kernel != Kernel.FLOAT
            stack = GraphStack(self.folder / g.file, self.threads, exact=exact)
            search = g.details.get("scales") == "mse-search"
            calibrated = g.details.get("scales") if "calibration" in g.details else None
            self.graphs[g.file] = (
                stack,
                StoredWeights(self.folder, stack.graph.inits, nbits_search=search, calibrated=calibrated),
            )
            self.checks[g.file] = GraphCheck(g.file, g.precision.value, exact)
        self._seen: dict[tuple, object] = {}  # (data file, offset) -> WeightCheck: graphs sharing weights check once

    def _bound(self, g: GraphCheck) -> float:
        return BOUND["fp16"] if g.precision == "fp16" else BOUND["fp32"]

    def _weights(self, file: str, weights: dict[str, np.ndarray], decode: bool) -> dict[str, np.ndarray]:
        """Check each stored weight; with `decode`, return the weights the graph computes with where they differ
        from the checkpoint's (quantized ones, decoded from the stored bytes)."""
        stack, stored = self.graphs[file]
        chk = self.checks[file]
        used = {}
        for name, w in weights.items():
            t = stored.inits.get(name) or next(
                (
                    stored.inits[name + s]
                    for s in (
                        names.Q_WEIGHT_SUFFIX.format(bits=4),
                        names.Q_WEIGHT_SUFFIX.format(bits=8),
                        names.QGEMM_WEIGHT_SUFFIX,
                    )
                    if name + s in stored.inits
                ),
                None,
            )
            key = (file, name) if t is None else tuple((e.key, e.value) for e in t.external_data) or (file, name)
            res = self._seen.get(key)
            if res is None:
                res = self._seen[key] = stored.check(name, w)
                chk.weights += 1
                chk.values += res.values
            if not res.ok:
                self.failures.append(f"{file}: {res.problem()}")
            if decode and stored.kind(name) not in (None, "float"):
                used[name] = np.ascontiguousarray(stored.dequantize(name, w))
        return used

    def _rel(self, got: np.ndarray, want: np.ndarray, before: np.ndarray) -> float:
        update = np.linalg.norm((want - before).astype(np.float64))
        return float(np.linalg.norm((got - want).astype(np.float64)) / max(update, 1e-30))

    # --- hooks of the reference pass ---
    def layer(self, i: int, ref_layer, h_in: np.ndarray, h_out: np.ndarray) -> None:
        """Layer i of every decoder graph against transformers' layer (`ref_layer`, a layerstream.TorchLayer)."""
        import torch

        from .layerstream import release_memory

        x, want = h_in[:, :VERIFY_ROWS], h_out[:, :VERIFY_ROWS]  # [1,R,H]
        split = min(SPLIT, x.shape[1] - 1)
        weights = {f"layers.{i}.{k}": v.numpy() for k, v in ref_layer.weights.items()}
        for file, (stack, _) in self.graphs.items():
            chk = self.checks[file]
            numeric = i in self.numeric
            deq = self._weights(file, weights, decode=numeric)
            chk.layers += 1
            if not numeric:
                if i > 1 and stack.graph.signature(i) != self._signature.setdefault(file, stack.graph.signature(1)):
                    self.failures.append(
                        f"{file}: layer {i} is not the same computation as layer 1 (ops, attributes or "
                        f"wiring differ beyond the layer index)"
                    )
                continue
            reference = want
            if deq:  # transformers on exactly the weights this graph stores
                w = {
                    k: (torch.from_numpy(deq[f"layers.{i}.{k}"]) if f"layers.{i}.{k}" in deq else v)
                    for k, v in ref_layer.weights.items()
                }
                reference = ref_layer.stack.open(i, w)(x, None)[0]
                del w
            del deq  # (0.9 GB at 7B widths) before the graph's own copy is loaded
            release_memory()
            layer = stack.open(i)
            a, k, v = layer(x[:, :split], None)
            b, _, _ = layer(x[:, split:], (k, v))
            del layer
            release_memory()
            rel = self._rel(np.concatenate([a, b], 1), reference, x)
            chk.numeric_layers += 1
            chk.max_rel_diff = max(chk.max_rel_diff, rel)
            if not rel <= self._bound(chk):
                self.failures.append(
                    f"{file}: layer {i} differs from transformers' by {rel:.2e} of the layer's "
                    f"update (bound {self._bound(chk):.0e})"
                )

    def head(self, reference_stack, h_final: np.ndarray) -> None:
        """Final norm + lm_head of every decoder graph on the reference's last hidden states [P,H]."""
        from .layerstream import CheckpointStack

        x = h_final[:VERIFY_ROWS]
        want = reference_stack.head(x)
        ckpt = reference_stack.ckpt if isinstance(reference_stack, CheckpointStack) else None
        head_w = {n: ckpt.text_tensor(n).numpy() for n in ("norm.weight", "lm_head.weight")} if ckpt else {}
        for file, (stack, _) in self.graphs.items():
            chk = self.checks[file]
            deq = self._weights(file, head_w, decode=True)
            ref = want
            if deq:
                ref = _head_with(reference_stack, x, deq.get("lm_head.weight"))
            got = stack.head(x)
            rel = float(
                np.linalg.norm((got - ref).astype(np.float64)) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30)
            )
            chk.head_rel_diff = rel
            if not rel <= self._bound(chk):
                self.failures.append(
                    f"{file}: final norm + lm_head differ from transformers' by {rel:.2e} "
                    f"(bound {self._bound(chk):.0e})"
                )

    def embeddings(self, ckpt) -> None:
        from ..runtime.bundle import _load_table
        from .weights_check import check_embeddings

        w = ckpt.text_tensor("embed_tokens.weight").numpy()  # [V,H]
        for g in self.manifest.variants(names.ROLE_EMBEDDINGS):
            table, scales = _load_table(self.folder, self.manifest, g)
            res = check_embeddings(table, scales, w, "embed_tokens.weight")
            self.other[g.file] = {"values_checked": res.values, "stored_as": res.stored_as}
            if not res.ok:
                self.failures.append(f"{g.file}: {res.problem()}")

    def vision(self, g, feats: np.ndarray, ref: np.ndarray) -> None:
        """One vision graph's features [B,N,H] on the probe images against the reference's."""
        a, b = feats.reshape(-1).astype(np.float64), ref.reshape(-1).astype(np.float64)
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        self.other[g.file] = {"precision": g.precision.value, "max_abs_diff_rel": rel, "feature_cosine": cos}
        if g.kernel == Kernel.QGEMM or g.precision == Precision.INT8:
            ok, what = cos >= VISION_COSINE_INT8, f"feature cosine {cos:.4f} (bound {VISION_COSINE_INT8})"
        else:
            bound = BOUND["fp16"] if g.precision == Precision.FP16 else BOUND["fp32"]
            ok, what = rel <= bound, f"max |difference| {rel:.2e} of the features' scale (bound {bound:.0e})"
        if not ok:
            self.failures.append(f"{g.file}: image features differ from transformers' CLIP + projector: {what}")

    def result(self) -> dict:
        return {
            "passed": not self.failures,
            "probe_rows": VERIFY_ROWS,
            "graphs": {**{f: c.to_dict() for f, c in self.checks.items()}, **self.other},
            "failures": self.failures[:20],
        }

    def raise_on_failure(self) -> None:
        if self.failures:
            more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            raise VerificationError(
                f"verification failed: {self.failures[0]}{more}; the bundle does not compute what "
                f"the checkpoint does (nothing was written); this is a bug, report it"
            )


def _head_with(stack, x: np.ndarray, lm_head: np.ndarray | None) -> np.ndarray:
    """The reference head with the graph's stored (dequantized) lm_head [V,H]."""
    import torch
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    with torch.no_grad():
        norm = MistralRMSNorm(stack.cfg.hidden_size, eps=stack.cfg.rms_norm_eps)
        norm.weight.copy_(stack.ckpt.text_tensor("norm.weight"))
        w = torch.from_numpy(lm_head) if lm_head is not None else stack.ckpt.text_tensor("lm_head.weight")
        return (norm(torch.from_numpy(np.ascontiguousarray(x, np.float32))) @ w.T).numpy()


def format_verification(v: dict) -> list[str]:
    """The manifest's verification record as lines for `info`."""
    if "passed" not in v:  # bundles verified by older exporters: flat figures
        return ["verification: " + ", ".join(f"{k}={val:.2e}" for k, val in v.items() if isinstance(val, float))]
    lines = [f"verification: {'passed' if v['passed'] else 'FAILED'} (against the checkpoint, layer by layer)"]
    for f, g in v.get("graphs", {}).items():
        if "layers_checked" in g:
            head = "" if g.get("head_rel_diff") is None else f", head {g['head_rel_diff']:.1e}"
            lines.append(
                f"  {f}: {g['layers_checked']} layers ({g.get('layers_run', g['layers_checked'])} run against "
                f"transformers, max rel diff {g['max_layer_rel_diff']:.1e}{head}); "
                f"{g['weights_checked']} weights ({g['values_checked'] / 1e6:.1f}M values) exact "
                f"[{g['mode']}]"
            )
        elif "feature_cosine" in g:
            lines.append(
                f"  {f}: image features rel diff {g['max_abs_diff_rel']:.1e}, cosine {g['feature_cosine']:.6f}"
            )
        elif "values_checked" in g:
            lines.append(f"  {f}: {g['values_checked'] / 1e6:.1f}M values exact ({g['stored_as']})")
    lines += [f"  failure: {x}" for x in v.get("failures", [])]
    return lines
