"""Decoder stage: embeddings + KV cache -> logits. The cache is plain NumPy, owned by the caller.

A `KVCache` belongs to one generation; the session is shared and stateless, so many threads may run
their own caches through one Decoder concurrently (onnxruntime's Run is thread-safe).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import names
from ..manifest import ModelDims


@dataclass
class KVCache:
    keys: list[np.ndarray]  # per layer [B, kvH, T, D]
    values: list[np.ndarray]
    mask: np.ndarray  # [B, T] int64, 1 = real token

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def select(self, rows: np.ndarray) -> "KVCache":
        """Reorder / repeat batch rows (beam search, one prefix shared by several continuations)."""
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.mask[rows])


class Decoder:
    def __init__(self, session, dims: ModelDims):
        self.session = session
        self.dims = dims
        self._outputs = [names.LOGITS] + [n for i in range(dims.num_layers) for n in (names.present_key(i), names.present_value(i))]

    def empty_cache(self, batch: int = 1) -> KVCache:
        d = self.dims
        z = np.zeros((batch, d.num_kv_heads, 0, d.head_dim), np.float32)
        return KVCache([z] * d.num_layers, [z] * d.num_layers, np.zeros((batch, 0), np.int64))

    def forward(self, embeds: np.ndarray, cache: KVCache, keep: int = 1) -> tuple[np.ndarray, KVCache]:
        """[B,S,H] embeddings after `cache` -> ([B,keep,V] logits of the last `keep` positions, new cache)."""
        b, s, _ = embeds.shape
        mask = np.concatenate([cache.mask, np.ones((b, s), np.int64)], axis=1)  # [B, T+S]
        # positions count real tokens only (left padding keeps HF's cumsum(mask) - 1 convention)
        positions = (np.cumsum(mask, axis=1) - 1)[:, -s:].clip(min=0)
        feed = {
            names.INPUTS_EMBEDS: np.ascontiguousarray(embeds, np.float32),
            names.ATTENTION_MASK: mask,
            names.POSITION_IDS: positions.astype(np.int64),
            names.NUM_LOGITS_TO_KEEP: np.array(keep, np.int64),
        }
        for i in range(self.dims.num_layers):
            feed[names.past_key(i)] = cache.keys[i]
            feed[names.past_value(i)] = cache.values[i]
        out = self.session.run(self._outputs, feed)
        return out[0], KVCache(out[1::2], out[2::2], mask)

    def logits_all(self, embeds: np.ndarray) -> np.ndarray:
        """[B,S,H] -> [B,S,V]: every position's logits from an empty cache (teacher forcing, checks)."""
        logits, _ = self.forward(embeds, self.empty_cache(embeds.shape[0]), keep=embeds.shape[1])
        return logits
