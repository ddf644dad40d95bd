"""A decoder run one layer at a time over a few probe sequences, holding one layer's weights.

Used three ways, by the same pass:
- the fp32 reference of verification and of the quality report: transformers' own MistralDecoderLayer fed the
  checkpoint's weights (`CheckpointStack`), or an fp32 bundle graph cut per layer (`GraphStack`, for `quantize`);
- the quantized bundle's prefill in the quality report: its graphs cut per layer (`GraphStack`), so the int8
  prefill graph (7 GB at 7B) never has to be loaded whole next to the int4 decode graph.

Sequences come in groups sharing a prefix (one probe image: "[INST] " + its 576 features), as the runtime's
prefix cache does: per layer the prefix runs once and each suffix (question, answer) attends to its keys, which
halves the reference's cost at 7B. Activations are small (a few thousand positions x hidden); the weights of one
layer (0.87 GB fp32 at 7B) are read, used for every group and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

KV = tuple[np.ndarray, np.ndarray]  # keys, values [1,kvH,T,D]


def release_memory() -> None:
    """Collect cycles and hand freed heap back to the OS. Why: a layer's tensors (4-64 MB each at 7B widths) come
    from malloc's heap, which glibc does not shrink by itself; without this the process's resident size kept the
    high-water mark of every stage before (measured on the bench preset: 1.6 GB still resident after the CLIP
    reference)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@dataclass
class Group:
    prefix: np.ndarray  # [P,H] embeddings shared by the group's sequences
    suffixes: list[np.ndarray]  # each [s,H]: what follows the prefix in one sequence


@dataclass
class GroupOut:
    prefix: np.ndarray  # [P,H] hidden state after the last layer (before the final norm)
    suffixes: list[np.ndarray]  # each [s,H]
    prefix_kv: list[KV] = field(default_factory=list)  # per layer (keep_kv)
    suffix_kv: list[list[KV]] = field(default_factory=list)  # per suffix, per layer: the suffix's own positions


class Layer(Protocol):
    def __call__(self, hidden: np.ndarray, past: KV | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[1,S,H] after `past` -> ([1,S,H] hidden, present keys, values [1,kvH,P+S,D])."""


class LayerStack(Protocol):
    num_layers: int

    def open(self, i: int) -> Layer: ...

    def head(self, hidden: np.ndarray) -> np.ndarray:
        """[n,H] final hidden states -> [n,V] logits."""


def run_pass(
    groups: list[Group],
    stack_for: Callable[[int], LayerStack],
    num_layers: int,
    *,
    keep_kv: bool = False,
    kv_sink: Callable | None = None,
    on_layer: Callable | None = None,
    on_done: Callable[[], None] | None = None,
) -> list[GroupOut]:
    """Every group through every layer; `stack_for(rows)` is the stack a call of that many rows runs on (one stack
    for a reference; the kernel policy's choice for a quantized bundle). `on_layer(i, layer, h_in, h_out)` sees group
    0's prefix entering and leaving layer i (verification), with the opened layer of its stack. Keys and values:
    `keep_kv` keeps them in the outputs; `kv_sink(group, layer, k, v)` is handed each prefix's instead (to spill)."""
    hidden = [(g.prefix[None].astype(np.float32), [s[None].astype(np.float32) for s in g.suffixes]) for g in groups]
    outs = [GroupOut(g.prefix, list(g.suffixes), suffix_kv=[[] for _ in g.suffixes]) for g in groups]
    for i in range(num_layers):
        opened: dict[int, Layer] = {}

        def layer_for(rows: int, i: int = i, opened: dict[int, Layer] = opened) -> Layer:
            stack = stack_for(rows)
            if id(stack) not in opened:
                opened[id(stack)] = stack.open(i)
            return opened[id(stack)]

        new = []
        for j, (hp, hs) in enumerate(hidden):
            first = layer_for(hp.shape[1])
            hp2, k, v = first(hp, None)
            if j == 0 and on_layer is not None:
                on_layer(i, first, hp, hp2)
            hs2 = []
            for m, h in enumerate(hs):
                h2, ks, vs = layer_for(h.shape[1])(h, (k, v))
                hs2.append(h2)
                if keep_kv:
                    p = k.shape[2]
                    outs[j].suffix_kv[m].append((ks[:, :, p:].copy(), vs[:, :, p:].copy()))
            if keep_kv:
                outs[j].prefix_kv.append((k, v))
            if kv_sink is not None:
                kv_sink(j, i, k, v)
            new.append((hp2, hs2))
        hidden = new
        opened.clear()  # this layer's sessions and weights go
        release_memory()
        if on_done is not None:
            on_done()
    for o, (hp, hs) in zip(outs, hidden):
        o.prefix, o.suffixes = hp[0], [h[0] for h in hs]
    return outs


# --- transformers' layers on the checkpoint's weights ---------------------------------------------------------
LAYER_WEIGHTS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


class _PresentKV:
    """The one method of transformers' Cache that MistralAttention calls: `update` returns past + new keys."""

    def __init__(self, past):
        self.past = past

    def update(self, k, v, layer_idx, *args, **kwargs):
        import torch

        if self.past is not None:
            k, v = torch.cat([self.past[0], k], 2), torch.cat([self.past[1], v], 2)
        self.present = (k, v)
        return k, v


class TorchLayer:
    """One MistralDecoderLayer built on the meta device and given `weights` (no second copy of them)."""

    def __init__(self, stack: "CheckpointStack", weights: dict):
        import torch
        from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

        with torch.device("meta"):
            layer = MistralDecoderLayer(stack.cfg, 0)
        layer.load_state_dict(weights, assign=True)
        self.module, self.stack, self.weights = layer.eval(), stack, weights

    def __call__(self, hidden: np.ndarray, past: KV | None):
        import torch

        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(hidden, np.float32))  # [1,S,H]
            s = x.shape[1]
            p = 0 if past is None else past[0].shape[2]
            pos = torch.arange(p, p + s)[None]
            cos_sin = self.stack.rotary(x, pos)
            # additive causal mask [1,1,S,P+S]: key j visible to query i iff j <= P + i
            j = torch.arange(p + s)[None, :]
            i = torch.arange(s)[:, None] + p
            mask = torch.where(j <= i, 0.0, torch.finfo(torch.float32).min)[None, None]
            cache = _PresentKV(None if past is None else (torch.from_numpy(past[0]), torch.from_numpy(past[1])))
            y = self.module(x, attention_mask=mask, position_ids=pos, cache=cache, position_embeddings=cos_sin)
            y = y[0] if isinstance(y, tuple) else y
            k, v = cache.present
            return y.numpy(), k.contiguous().numpy(), v.contiguous().numpy()


def layer_config(
    vocab: int, hidden: int, mlp: int, heads: int, kv_heads: int, head_dim: int, rope_theta: float, rms_norm_eps: float
):
    """transformers' MistralConfig for one decoder layer of these widths (eager attention, no sliding window): what
    every layer-streamed pass (reference, verification, calibration) builds its layers from."""
    from transformers import MistralConfig

    cfg = MistralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=rope_theta,
        rms_norm_eps=rms_norm_eps,
        sliding_window=None,
    )
    cfg._attn_implementation = "eager"
    return cfg


class CheckpointStack:
    """transformers' Mistral layers over a checkpoint, one layer's fp32 weights in memory at a time."""

    def __init__(self, ckpt):
        from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

        t = ckpt.text
        cfg = layer_config(t.vocab, t.hidden, t.mlp, t.heads, t.kv_heads, t.head_dim, t.rope_theta, t.rms_norm_eps)
        self.ckpt, self.cfg, self.num_layers = ckpt, cfg, t.layers
        self.rotary = MistralRotaryEmbedding(cfg)

    def weights(self, i: int) -> dict:
        """Layer i's tensors, MistralDecoderLayer-named, fp32 [out,in] (LoRA merged when the checkpoint has one)."""
        return {k: self.ckpt.text_tensor(f"layers.{i}.{k}") for k in LAYER_WEIGHTS}

    def open(self, i: int, weights: dict | None = None) -> TorchLayer:
        return TorchLayer(self, weights if weights is not None else self.weights(i))

    def head(self, hidden: np.ndarray) -> np.ndarray:
        import torch
        from transformers.models.mistral.modeling_mistral import MistralRMSNorm

        with torch.no_grad():
            norm = MistralRMSNorm(self.cfg.hidden_size, eps=self.cfg.rms_norm_eps)
            norm.weight.copy_(self.ckpt.text_tensor("norm.weight"))
            w = self.ckpt.text_tensor("lm_head.weight")  # [V,H]
            return (norm(torch.from_numpy(np.ascontiguousarray(hidden, np.float32))) @ w.T).numpy()


# --- a bundle's decoder graph cut per layer -------------------------------------------------------------------
class GraphStack:
    """A decoder graph (fp32 or quantized) run one layer cut at a time (export/subgraph.py): a saved one, or one not
    written yet: `model` its structure and `fill(cut)` the cut with its weights (prefill_gate's candidate graph)."""

    def __init__(
        self,
        path: Path,
        threads: int | None = None,
        exact: bool = False,
        *,
        model=None,
        fill: Callable | None = None,
    ):
        from onnx import helper

        from .. import names
        from .subgraph import DecoderGraph

        self.graph = DecoderGraph(path, model)
        self.threads, self.exact, self.fill = threads, exact, fill
        self.num_layers = self.graph.num_layers
        past = self.graph.graph_inputs[names.past_key(0)].type.tensor_type.shape.dim
        self.kv_heads, self.head_dim = past[1].dim_value, past[3].dim_value
        self.dtype = helper.tensor_dtype_to_np_dtype(self.graph.float_type)
        self._head = None

    def _session(self, i: int):
        cut = self.graph.cut(i, self.exact)
        return self.graph.session_of(cut if self.fill is None else self.fill(cut), i, self.threads)

    def open(self, i: int) -> Layer:
        from .subgraph import run_layer

        session = self._session(i)
        return lambda hidden, past: run_layer(session, hidden, past, i, self.kv_heads, self.head_dim, self.dtype)

    def close(self) -> None:
        self._head = None

    def head(self, hidden: np.ndarray) -> np.ndarray:
        from .subgraph import HEAD, run_head

        if self._head is None:  # kept: called once per probe (the lm_head, 131-524 MB at 7B, read once)
            self._head = self._session(HEAD)
        return run_head(self._head, hidden[None], hidden.shape[0], self.dtype)[0]
