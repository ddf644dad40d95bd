"""KV caches: the one in-place buffer mechanism (`KVRows`), the cache values decoders pass around, and snapshots.

- `KVRows` (GroupQueryAttention graphs): preallocated buffers per layer [R,kvH,C,D], bound to a session as both past
  input and present output (onnxruntime's past-present share-buffer mode), so GQA writes each new key/value in place.
  It is the only code that binds KV memory to a session: the engine's slots (slots.py), `FastDecoder`'s caches and
  every snapshot read and write through it. Buffers are `np.empty`: untouched capacity costs address space, not
  resident memory.
- Cache values for the functional `Decoder.forward(embeds, cache)` API (teacher forcing, checks, the standard graph's
  slots): `HostCache` (NumPy arrays [B,kvH,T,D]), `DeviceCache` (presents left on a GPU as OrtValues) and
  `StoreCache` (positions [0, T) of a `KVRows`). A cache is a value: continuing it never changes what an older cache
  object means (a `StoreCache` that is not at its rows' frontier is copied before it is continued).
- `Snapshot`: one row's keys/values copied to the host with the decoder positions they hold (prompt ids, image rows,
  generated tokens); the prompt cache keeps them and copies them back into a slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from .. import names
from ..manifest import ModelDims


class KVCache(Protocol):
    mask: np.ndarray  # [B, T] int64, 1 = real token (0 = left padding)

    @property
    def length(self) -> int: ...

    @property
    def keys(self) -> list[np.ndarray]: ...  # per layer [B, kvH, T, D] on the host

    @property
    def values(self) -> list[np.ndarray]: ...

    def truncate(self, length: int) -> "KVCache": ...


@dataclass(frozen=True)
class Snapshot:
    """One row of a cache copied to the host: keys/values per layer [kvH, L, D] and the L decoder positions they
    hold (prompt ids, (image key, row) pairs for image features, generated tokens), for prefix matching."""

    positions: tuple
    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]

    @property
    def length(self) -> int:
        return len(self.positions)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.keys, *self.values))

    @classmethod
    def of(cls, cache: KVCache, positions: Sequence[Any], row: int = 0) -> "Snapshot":
        """Copy row `row` of an unpadded cache (its first len(positions) positions)."""
        n = len(positions)
        return cls(
            tuple(positions),
            tuple(np.array(k[row, :, :n]) for k in cache.keys),
            tuple(np.array(v[row, :, :n]) for v in cache.values),
        )

    def shared_prefix(self, positions: Sequence[Any]) -> int:
        """How many leading positions this snapshot holds for a prompt (leaving one to prefill)."""
        n = min(self.length, len(positions) - 1)
        i = 0
        while i < n and self.positions[i] == positions[i]:
            i += 1
        return i

    def as_cache(self, length: int) -> "HostCache":
        """Its first `length` positions as a batch-1 host cache."""
        return HostCache(
            [k[None, :, :length] for k in self.keys],
            [v[None, :, :length] for v in self.values],
            np.ones((1, length), np.int64),
        )


class KVRows:
    """`rows` rows of KV memory per layer [R,kvH,C,D], run in place through any session that reads and writes them
    (the decode graph and, in a hybrid bundle, its int8 GEMM graph: both use the same layout)."""

    def __init__(self, dims: ModelDims, dtype: np.dtype, rows: int, capacity: int):
        import onnxruntime as ort

        self.dims, self.rows, self.capacity = dims, rows, capacity
        shape = (rows, dims.num_kv_heads, capacity, dims.head_dim)  # [R,kvH,C,D]
        self.keys = [np.empty(shape, dtype) for _ in range(dims.num_layers)]
        self.values = [np.empty(shape, dtype) for _ in range(dims.num_layers)]
        self._ort = ort
        self._bindings: dict[tuple[int, int, int], tuple[Any, list[Any]]] = {}  # (start, stop, session) -> binding
        self._logits: dict[tuple[int, int, np.dtype], tuple[np.ndarray, Any]] = {}  # (batch, keep, dtype) -> buffer
        self.frontier = 0  # functional caches (StoreCache): positions [0, frontier) hold the newest cache's keys

    def _binding(self, session: Any, start: int, stop: int) -> Any:
        """An IOBinding of rows [start, stop) of every layer as past and present (views: no copy)."""
        key = (start, stop, id(session))
        if key not in self._bindings:
            bind, keep = session.io_binding(), []
            for i in range(self.dims.num_layers):
                for buf, past, present in (
                    (self.keys[i], names.past_key(i), names.present_key(i)),
                    (self.values[i], names.past_value(i), names.present_value(i)),
                ):
                    ov = self._ort.OrtValue.ortvalue_from_numpy(buf[start:stop])  # contiguous: rows are the outer axis
                    bind.bind_ortvalue_input(past, ov)
                    bind.bind_ortvalue_output(present, ov)  # same memory: GQA writes in place
                    keep.append(ov)
            self._bindings[key] = (bind, keep)
        return self._bindings[key][0]

    def run(
        self,
        session: Any,
        start: int,
        stop: int,
        embeds: np.ndarray,
        mask: np.ndarray,
        positions: np.ndarray,
        keep: int,
        embeds_dtype: np.dtype,
        logits_dtype: np.dtype,
    ) -> np.ndarray:
        """One decoder run over rows [start, stop): [B,S,H] embeddings, [B,T] mask, [B,S] positions ->
        [B,keep,V] float32 logits (a copy: the bound buffer is rewritten by the next run)."""
        bind = self._binding(session, start, stop)
        b = stop - start
        bind.bind_cpu_input(names.INPUTS_EMBEDS, np.ascontiguousarray(embeds, embeds_dtype))
        bind.bind_cpu_input(names.ATTENTION_MASK, mask)
        bind.bind_cpu_input(names.POSITION_IDS, positions)
        bind.bind_cpu_input(names.NUM_LOGITS_TO_KEEP, np.array(keep, np.int64))
        out = self._logits.get((b, keep, logits_dtype))
        if out is None:  # one logits buffer per shape, reused every step
            arr = np.empty((b, keep, self.dims.vocab_size), logits_dtype)  # [B,keep,V]
            out = self._logits[(b, keep, logits_dtype)] = (arr, self._ort.OrtValue.ortvalue_from_numpy(arr))
        bind.bind_ortvalue_output(names.LOGITS, out[1])
        session.run_with_iobinding(bind)
        return out[0].astype(np.float32, copy=True)

    def copy_rows(self, dst: Sequence[int], src: Sequence[int], length: int, start: int = 0) -> None:
        """Rows dst[j] := rows src[j], positions [start, length) (a gather: every source is read before any write)."""
        if not len(dst):
            return
        d, s = np.asarray(dst, np.int64), np.asarray(src, np.int64)
        for buf in (*self.keys, *self.values):
            buf[d, :, start:length] = buf[s, :, start:length]  # the right side copies just those positions

    def snapshot(self, row: int, positions: Sequence[Any]) -> Snapshot:
        n = len(positions)
        return Snapshot(
            tuple(positions),
            tuple(np.array(k[row, :, :n]) for k in self.keys),
            tuple(np.array(v[row, :, :n]) for v in self.values),
        )

    def load(self, row: int, snap: Snapshot, length: int) -> None:
        """The snapshot's first `length` positions into `row`."""
        for dst, src in zip(self.keys + self.values, snap.keys + snap.values):
            dst[row, :, :length] = src[:, :length]


def _check_truncate(cache: KVCache, length: int) -> None:
    if not 0 <= length <= cache.length:
        raise ValueError(f"cannot truncate a cache of {cache.length} positions to {length}")


class HostCache:
    def __init__(self, keys: list[np.ndarray], values: list[np.ndarray], mask: np.ndarray):
        self.keys, self.values, self.mask = keys, values, mask

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def truncate(self, length: int) -> "HostCache":
        _check_truncate(self, length)
        if length == self.length:
            return self
        return HostCache(
            [k[:, :, :length] for k in self.keys], [v[:, :, :length] for v in self.values], self.mask[:, :length]
        )


class DeviceCache:
    def __init__(self, device_kv: list[Any], mask: np.ndarray):
        self.device_kv = device_kv  # OrtValues [k0, v0, k1, v1, ...] left where the session ran
        self.mask = mask
        self._host: tuple[list[np.ndarray], list[np.ndarray]] | None = None

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def _download(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self._host is None:  # device -> host, once (truncation, snapshots)
            arrays = [ov.numpy() for ov in self.device_kv]
            self._host = (arrays[0::2], arrays[1::2])
        return self._host

    @property
    def keys(self) -> list[np.ndarray]:
        return self._download()[0]

    @property
    def values(self) -> list[np.ndarray]:
        return self._download()[1]

    def truncate(self, length: int) -> KVCache:
        _check_truncate(self, length)
        if length == self.length:
            return self
        return HostCache(
            [k[:, :, :length] for k in self.keys], [v[:, :, :length] for v in self.values], self.mask[:, :length]
        )  # uploaded again by the next forward: once per turn


class StoreCache:
    """Positions [0, T) of every row of a `KVRows` (a FastDecoder cache: rows = batch)."""

    def __init__(self, store: KVRows, mask: np.ndarray):
        self.store = store
        self.mask = mask

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @property
    def keys(self) -> list[np.ndarray]:  # views into the store
        return [k[:, :, : self.length] for k in self.store.keys]

    @property
    def values(self) -> list[np.ndarray]:
        return [v[:, :, : self.length] for v in self.store.values]

    def truncate(self, length: int) -> "StoreCache":
        """No copy: continuing it copies the prefix first (copy-on-write, the store's frontier is past it)."""
        _check_truncate(self, length)
        return self if length == self.length else StoreCache(self.store, self.mask[:, :length])
