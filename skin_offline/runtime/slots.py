"""The engine's slots: `n` rows of KV cache, one running request each, prefilled one request at a time and
decoded together (one decoder run per engine step for every decoding row).

- `InPlaceSlots` (GroupQueryAttention graphs, the CPU default): one preallocated buffer [n, kvH, C, D] per layer
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

from typing import Protocol

import numpy as np

from .. import names
from .decoder import Decoder, FastDecoder
from .kv import HostCache, KVCache, Snapshot


class SlotTable(Protocol):
    n: int

    def length(self, slot: int) -> int: ...  # positions the row holds

    def prefill(self, slot: int, embeds: np.ndarray) -> np.ndarray: ...  # [1,S,H] -> [V] logits of the last

    def decode(self, slots: list[int], embeds: np.ndarray) -> np.ndarray: ...  # [B,1,H] -> [B,V]

    def load(self, slot: int, snap: Snapshot, length: int) -> None: ...  # the snapshot's first `length` positions

    def snapshot(self, slot: int, positions) -> Snapshot: ...  # copy of the row's first len(positions) positions

    def release(self, slot: int) -> None: ...


def slot_table(decoder: Decoder, n: int) -> SlotTable:
    return InPlaceSlots(decoder, n) if isinstance(decoder, FastDecoder) else PaddedSlots(decoder, n)


class InPlaceSlots:
    def __init__(self, dec: FastDecoder, n: int, capacity: int | None = None):
        d = dec.dims
        self.dec, self.n = dec, n
        self.capacity = capacity or d.max_context
        shape = (n, d.num_kv_heads, self.capacity, d.head_dim)  # [n,kvH,C,D]
        self.keys = [np.empty(shape, dec.kv_dtype) for _ in range(d.num_layers)]
        self.values = [np.empty(shape, dec.kv_dtype) for _ in range(d.num_layers)]
        self.lengths = np.zeros(n, np.int64)
        self._bindings: dict[tuple[int, int, int], tuple[object, list]] = {}  # (start, stop, session) -> binding
        self._logits: dict[int, tuple[np.ndarray, object]] = {}  # batch -> [B,1,V] buffer and its OrtValue

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    def _binding(self, start: int, stop: int, session):
        """An IOBinding of rows [start, stop) of every layer's buffer as past and present (views: no copy)."""
        key = (start, stop, id(session))
        if key not in self._bindings:
            import onnxruntime as ort

            bind, keep = session.io_binding(), []
            for i in range(self.dec.dims.num_layers):
                for buf, past, present in ((self.keys[i], names.past_key(i), names.present_key(i)),
                                           (self.values[i], names.past_value(i), names.present_value(i))):
                    ov = ort.OrtValue.ortvalue_from_numpy(buf[start:stop])  # contiguous: batch is the outer axis
                    bind.bind_ortvalue_input(past, ov)
                    bind.bind_ortvalue_output(present, ov)  # same memory: GQA writes in place
                    keep.append(ov)
            self._bindings[key] = (bind, keep)
        return self._bindings[key][0]

    def _run(self, start: int, stop: int, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             rows: int) -> np.ndarray:
        """One decoder run over buffer rows [start, stop) -> [B,1,V] logits (a copy)."""
        session = self.dec.session_for(rows)
        bind = self._binding(start, stop, session)
        b = stop - start
        bind.bind_cpu_input(names.INPUTS_EMBEDS, np.ascontiguousarray(embeds, self.dec.embeds_dtype))
        bind.bind_cpu_input(names.ATTENTION_MASK, mask)
        bind.bind_cpu_input(names.POSITION_IDS, positions)
        bind.bind_cpu_input(names.NUM_LOGITS_TO_KEEP, np.array(1, np.int64))
        if b not in self._logits:
            import onnxruntime as ort

            arr = np.empty((b, 1, self.dec.dims.vocab_size), self.dec.logits_dtype)
            self._logits[b] = (arr, ort.OrtValue.ortvalue_from_numpy(arr))
        arr, ov = self._logits[b]
        bind.bind_ortvalue_output(names.LOGITS, ov)
        session.run_with_iobinding(bind)
        return arr.astype(np.float32, copy=True)

    def prefill(self, slot: int, embeds: np.ndarray) -> np.ndarray:
        s = embeds.shape[1]
        t0 = int(self.lengths[slot])
        t = t0 + s
        if t > self.capacity:
            raise ValueError(f"slot {slot} holds {t0} positions; {s} more exceed its capacity {self.capacity}")
        mask = np.ones((1, t), np.int64)  # [1,T]
        positions = np.arange(t0, t, dtype=np.int64)[None]  # [1,S]
        logits = self._run(slot, slot + 1, embeds, mask, positions, rows=s)
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
        logits = self._run(0, hi, full, mask, pos[:, None], rows=hi)
        self.lengths[slots] += 1
        return logits[slots, -1]

    def load(self, slot: int, snap: Snapshot, length: int) -> None:
        for dst, src in zip(self.keys + self.values, snap.keys + snap.values):
            dst[slot, :, :length] = src[:, :length]
        self.lengths[slot] = length

    def snapshot(self, slot: int, positions) -> Snapshot:
        n = len(positions)
        return Snapshot(tuple(positions), tuple(np.array(k[slot, :, :n]) for k in self.keys),
                        tuple(np.array(v[slot, :, :n]) for v in self.values))

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0


class PaddedSlots:
    def __init__(self, dec: Decoder, n: int):
        self.dec, self.n = dec, n
        self.caches: list[KVCache | None] = [None] * n
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
            self.caches[r] = HostCache([k[j:j + 1, :, p:] for k in keys], [v[j:j + 1, :, p:] for v in values],
                                       np.ones((1, cache.length - p), np.int64))
        self._batch = None

    def prefill(self, slot: int, embeds: np.ndarray) -> np.ndarray:
        if self._batch is not None and slot in self._batch[0]:
            self._unbatch()
        cache = self.caches[slot] if self.caches[slot] is not None else self.dec.empty_cache()
        logits, self.caches[slot] = self.dec.forward(embeds, cache)
        self.lengths[slot] = self.caches[slot].length
        return logits[0, -1]

    def decode(self, slots: list[int], embeds: np.ndarray) -> np.ndarray:
        rows = tuple(slots)
        if self._batch is None or self._batch[0] != rows:
            self._unbatch()
            lengths = np.array([self.caches[r].length for r in rows])
            width = int(lengths.max())
            pads = width - lengths
            keys, values = [], []
            for i in range(self.dec.dims.num_layers):
                for out, src in ((keys, lambda c: c.keys[i]), (values, lambda c: c.values[i])):
                    parts = [np.pad(src(self.caches[r]), ((0, 0), (0, 0), (int(p), 0), (0, 0))) for r, p in zip(rows, pads)]
                    out.append(np.concatenate(parts))  # [B,kvH,width,D], left-padded
            mask = (np.arange(width)[None, :] >= pads[:, None]).astype(np.int64)  # [B,width]
            self._batch = (rows, HostCache(keys, values, mask), pads)
        _, cache, pads = self._batch
        logits, cache = self.dec.forward(embeds, cache)  # [B,1,V]
        self._batch = (rows, cache, pads)
        self.lengths[list(rows)] += 1
        return logits[:, -1]

    def load(self, slot: int, snap: Snapshot, length: int) -> None:
        self.release(slot)
        self.caches[slot] = snap.as_cache(length)
        self.lengths[slot] = length

    def snapshot(self, slot: int, positions) -> Snapshot:
        if self._batch is not None and slot in self._batch[0]:
            self._unbatch()
        return Snapshot.of(self.caches[slot], positions)

    def release(self, slot: int) -> None:
        if self._batch is not None and slot in self._batch[0]:
            self._unbatch()
        self.caches[slot] = None
        self.lengths[slot] = 0
