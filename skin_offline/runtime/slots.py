"""The engine's slots: `n` rows of KV cache. A request holds one row (sampling) or several (beams, label scores);
prompts are prefilled one chunk at a time into a request's first row, then every decoding row of every request
advances in one decoder run per engine step. `copy` forks a prompt into a request's other rows and reorders
beams (a row gather: the keys are copied, never recomputed); `truncate` rewinds a row to its prompt.

- `InPlaceSlots` (GroupQueryAttention graphs, the CPU default): the rows of one kv.KVRows [n, kvH, C, D] per layer
  (np.empty: untouched capacity costs address space, not memory). A prefill chunk runs at batch 1 on its row's
  view (GQA refuses several new tokens with a past at batch > 1); a decode step runs rows [0, hi) at once, each
  row right-padded after its own length, which the graph reads per row from the mask. Rows in [0, hi) that are
  not decoding (free, or between prefill chunks) ride along as dummies: their one garbage key lands at their
  own frontier, the next position their next chunk overwrites.
- `PaddedSlots` (the standard Concat graph: TensorRT, CUDA, the portable CPU graph): one cache per row through
  the decoder's own `forward`; the decoding rows are left-padded into one batch cache (HF's convention: positions
  count real tokens) that is kept from step to step while the set of rows stays the same, and split back into
  per-row caches when it changes (on a GPU the batch stays on the device between those changes).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from .decoder import Decoder, FastDecoder
from .kv import HostCache, KVCache, Snapshot


class SlotTable(Protocol):
    n: int

    def length(self, slot: int) -> int: ...  # positions the row holds

    def prefill(self, slot: int, embeds: np.ndarray) -> np.ndarray: ...  # [1,S,H] -> [V] logits of the last

    def decode(self, slots: list[int], embeds: np.ndarray) -> np.ndarray: ...  # [B,1,H] -> [B,V]

    def copy(self, dst: list[int], src: list[int], length: int, start: int = 0) -> None: ...

    # rows dst[j] := rows src[j] up to `length`; positions before `start` are known to be equal already

    def truncate(self, slot: int, length: int) -> None: ...  # keep the first `length` positions

    def load(self, slot: int, snap: Snapshot, length: int) -> None: ...  # the snapshot's first `length` positions

    def snapshot(self, slot: int, positions: Sequence[Any]) -> Snapshot: ...  # the row's first len(positions)

    def release(self, slot: int) -> None: ...


def slot_table(decoder: Decoder, n: int) -> SlotTable:
    return InPlaceSlots(decoder, n) if isinstance(decoder, FastDecoder) else PaddedSlots(decoder, n)


class InPlaceSlots:
    def __init__(self, dec: FastDecoder, n: int, capacity: int | None = None):
        self.dec, self.n = dec, n
        self.kv = dec.rows(n, capacity or dec.dims.max_context)  # [n,kvH,C,D] per layer
        self.capacity = self.kv.capacity
        self.lengths = np.zeros(n, np.int64)

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    def prefill(self, slot: int, embeds: np.ndarray) -> np.ndarray:
        s = embeds.shape[1]
        t0 = int(self.lengths[slot])
        t = t0 + s
        if t > self.capacity:
            raise ValueError(f"slot {slot} holds {t0} positions; {s} more exceed its capacity {self.capacity}")
        mask = np.ones((1, t), np.int64)  # [1,T]
        positions = np.arange(t0, t, dtype=np.int64)[None]  # [1,S]
        logits = self.dec.run_rows(self.kv, slot, slot + 1, embeds, mask, positions)
        self.lengths[slot] = t
        return logits[0, -1]

    def decode(self, slots: list[int], embeds: np.ndarray) -> np.ndarray:
        if len(slots) == 1:  # one row: its own view at batch 1 (the one-row kernel, no dummies)
            return self.prefill(slots[0], embeds)[None]
        hi = max(slots) + 1
        h = embeds.shape[-1]
        full = np.zeros((hi, 1, h), np.float32)  # [hi,1,H]; dummy rows feed zeros
        full[slots] = embeds
        pos = self.lengths[:hi].copy()  # every row writes its new key at its own length
        mask = (np.arange(pos.max() + 1)[None, :] <= pos[:, None]).astype(np.int64)  # [hi, max+1], right-padded
        logits = self.dec.run_rows(self.kv, 0, hi, full, mask, pos[:, None])
        self.lengths[slots] += 1
        return logits[slots, -1]

    def copy(self, dst: list[int], src: list[int], length: int, start: int = 0) -> None:
        self.kv.copy_rows(dst, src, length, start)
        self.lengths[dst] = length

    def truncate(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} positions, cannot keep {length}")
        self.lengths[slot] = length  # what lies past it is overwritten by the next run

    def load(self, slot: int, snap: Snapshot, length: int) -> None:
        self.kv.load(slot, snap, length)
        self.lengths[slot] = length

    def snapshot(self, slot: int, positions: Sequence[Any]) -> Snapshot:
        return self.kv.snapshot(slot, positions)

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0


class PaddedSlots:
    def __init__(self, dec: Decoder, n: int):
        self.dec, self.n = dec, n
        self.caches: list[KVCache] = [dec.empty_cache() for _ in range(n)]
        self.lengths = np.zeros(n, np.int64)
        self._batch: tuple[tuple[int, ...], KVCache, np.ndarray] | None = None  # (rows, cache, left pads)

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    def _unbatch(self) -> None:
        """Split the batch cache back into per-row caches (its left padding dropped)."""
        if self._batch is None:
            return
        rows, cache, pads = self._batch
        keys, values = cache.keys, cache.values  # on a GPU: one download per change of the batch
        for j, r in enumerate(rows):
            p = int(pads[j])
            self.caches[r] = HostCache(
                [k[j : j + 1, :, p:] for k in keys],
                [v[j : j + 1, :, p:] for v in values],
                np.ones((1, cache.length - p), np.int64),
            )
        self._batch = None

    def prefill(self, slot: int, embeds: np.ndarray) -> np.ndarray:
        if self._batch is not None and slot in self._batch[0]:
            self._unbatch()
        logits, self.caches[slot] = self.dec.forward(embeds, self.caches[slot])
        self.lengths[slot] = self.caches[slot].length
        return logits[0, -1]

    def decode(self, slots: list[int], embeds: np.ndarray) -> np.ndarray:
        rows = tuple(slots)
        if self._batch is None or self._batch[0] != rows:
            self._unbatch()
            lengths = np.array([self.caches[r].length for r in rows])
            width = int(lengths.max())
            pads = width - lengths

            def left_padded(per_row: list[np.ndarray]) -> np.ndarray:  # -> [B,kvH,width,D]
                return np.concatenate([np.pad(a, ((0, 0), (0, 0), (int(p), 0), (0, 0))) for a, p in zip(per_row, pads)])

            caches = [self.caches[r] for r in rows]
            keys = [left_padded([c.keys[i] for c in caches]) for i in range(self.dec.dims.num_layers)]
            values = [left_padded([c.values[i] for c in caches]) for i in range(self.dec.dims.num_layers)]
            mask = (np.arange(width)[None, :] >= pads[:, None]).astype(np.int64)  # [B,width]
            self._batch = (rows, HostCache(keys, values, mask), pads)
        _, cache, pads = self._batch
        logits, cache = self.dec.forward(embeds, cache)  # [B,1,V]
        self._batch = (rows, cache, pads)
        self.lengths[list(rows)] += 1
        return logits[:, -1]

    def copy(self, dst: list[int], src: list[int], length: int, start: int = 0) -> None:
        self._unbatch()
        sources = [self.caches[s] for s in src]  # read every source before any write (a gather)
        for d, c in zip(dst, sources):
            self.caches[d] = c.truncate(length)  # caches are values: rows may share one
            self.lengths[d] = length

    def truncate(self, slot: int, length: int) -> None:
        self._unbatch()
        self.caches[slot] = self.caches[slot].truncate(length)
        self.lengths[slot] = length

    def load(self, slot: int, snap: Snapshot, length: int) -> None:
        self.release(slot)
        self.caches[slot] = snap.as_cache(length)
        self.lengths[slot] = length

    def snapshot(self, slot: int, positions: Sequence[Any]) -> Snapshot:
        if self._batch is not None and slot in self._batch[0]:
            self._unbatch()
        return Snapshot.of(self.caches[slot], positions)

    def release(self, slot: int) -> None:
        if self._batch is not None and slot in self._batch[0]:
            self._unbatch()
        self.caches[slot] = self.dec.empty_cache()
        self.lengths[slot] = 0
