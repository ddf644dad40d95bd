"""KV caches: one type per decoder behind one small protocol, and host snapshots for reuse across requests.

A cache is a value to its callers: continuing it never changes what an older cache object means.
- `HostCache` (Decoder, the standard graph on the CPU): NumPy arrays per layer [B,kvH,T,D].
- `DeviceCache` (DeviceDecoder, CUDA / TensorRT): the presents left on the device as OrtValues.
- `StoreCache` (FastDecoder, GroupQueryAttention): positions [0, T) of a preallocated buffer [B,kvH,C,D] that
  GQA writes in place. A store remembers how far it was written (`frontier`); continuing a cache that is not at
  the frontier (two continuations of one prefix, beam rows) first copies its prefix to another store.
- `Snapshot`: one row's keys/values copied to the host with the decoder positions they hold (prompt ids, image
  rows, generated tokens); the engine's prompt cache keeps them and copies them back into a slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .. import names


class KVCache(Protocol):
    mask: np.ndarray  # [B, T] int64, 1 = real token (0 = left padding)

    @property
    def length(self) -> int: ...

    @property
    def keys(self) -> list[np.ndarray]: ...  # per layer [B, kvH, T, D] on the host

    @property
    def values(self) -> list[np.ndarray]: ...

    def truncate(self, length: int) -> "KVCache": ...

    def select(self, rows: np.ndarray) -> "KVCache": ...  # reorder / repeat batch rows (copies)


def _check_truncate(cache, length: int) -> None:
    if not 0 <= length <= cache.length:
        raise ValueError(f"cannot truncate a cache of {cache.length} positions to {length}")


class HostCache:
    def __init__(self, keys: list[np.ndarray], values: list[np.ndarray], mask: np.ndarray):
        self.keys, self.values, self.mask = keys, values, mask

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def truncate(self, length: int) -> "HostCache":
        _check_truncate(self, length)
        if length == self.length:
            return self
        return HostCache([k[:, :, :length] for k in self.keys], [v[:, :, :length] for v in self.values],
                         self.mask[:, :length])

    def select(self, rows: np.ndarray) -> "HostCache":
        rows = np.asarray(rows, dtype=np.int64)
        return HostCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.mask[rows])


class DeviceCache:
    def __init__(self, device_kv: list, mask: np.ndarray):
        self.device_kv = device_kv  # OrtValues [k0, v0, k1, v1, ...] left where the session ran
        self.mask = mask
        self._host: tuple[list, list] | None = None

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def _download(self) -> tuple[list, list]:
        if self._host is None:  # device -> host, once (beam reordering, truncation, snapshots)
            arrays = [ov.numpy() for ov in self.device_kv]
            self._host = (arrays[0::2], arrays[1::2])
        return self._host

    @property
    def keys(self) -> list[np.ndarray]:
        return self._download()[0]

    @property
    def values(self) -> list[np.ndarray]:
        return self._download()[1]

    def truncate(self, length: int) -> "KVCache":
        _check_truncate(self, length)
        if length == self.length:
            return self
        return HostCache([k[:, :, :length] for k in self.keys], [v[:, :, :length] for v in self.values],
                         self.mask[:, :length])  # uploaded again by the next forward: once per turn

    def select(self, rows: np.ndarray) -> "KVCache":
        rows = np.asarray(rows, dtype=np.int64)
        if np.array_equal(rows, np.arange(self.mask.shape[0])):
            return self  # device caches are never written in place: the identity selection can share them
        return HostCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.mask[rows])


class KVStore:
    """Preallocated KV buffers, per layer [B,kvH,capacity,D], with their OrtValues and one IOBinding per session
    (the decode graph and, in a bundle with a multi-row graph, that one: both read and write the same buffers)."""

    def __init__(self, owner, keys: list[np.ndarray], values: list[np.ndarray]):
        import onnxruntime as ort

        self.owner = owner  # the FastDecoder whose pool the buffers return to
        self.keys, self.values = keys, values
        self.batch, self.capacity = keys[0].shape[0], keys[0].shape[2]
        self.frontier = 0  # positions [0, frontier) hold the keys of the latest cache built on this store
        self._kv = [(names.past_key(i), names.present_key(i), ort.OrtValue.ortvalue_from_numpy(k))  # shares k's memory
                    for i, k in enumerate(keys)]
        self._kv += [(names.past_value(i), names.present_value(i), ort.OrtValue.ortvalue_from_numpy(v))
                     for i, v in enumerate(values)]
        self._bindings: dict[int, object] = {}  # id(session) -> IOBinding
        self._step_bound: set[int] = set()  # sessions whose binding holds the decode-step inputs below
        self.logits: dict[tuple[int, int], tuple[np.ndarray, object]] = {}  # (batch, keep) -> (array, OrtValue)
        # decode-step inputs, bound once and refilled in place (no per-token OrtValue for them)
        b = self.batch
        self.ones = np.ones(b * self.capacity, np.int64)  # flat, so [:B*T].reshape(B,T) is a contiguous mask
        self.step_embeds = np.empty((b, 1, owner.dims.hidden_size), owner.embeds_dtype)  # [B,1,H]
        self.step_positions = np.empty((b, 1), np.int64)  # [B,1]
        self._step = [(names.INPUTS_EMBEDS, ort.OrtValue.ortvalue_from_numpy(self.step_embeds)),
                      (names.POSITION_IDS, ort.OrtValue.ortvalue_from_numpy(self.step_positions)),
                      (names.NUM_LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(np.array(1, np.int64)))]

    def binding(self, session):
        bind = self._bindings.get(id(session))
        if bind is None:
            bind = self._bindings[id(session)] = session.io_binding()
            for past, present, ov in self._kv:
                bind.bind_ortvalue_input(past, ov)
                bind.bind_ortvalue_output(present, ov)  # same memory: GQA writes in place
        return bind

    def bind_step(self, session) -> None:
        if id(session) not in self._step_bound:
            bind = self.binding(session)
            for name, ov in self._step:
                bind.bind_ortvalue_input(name, ov)
            self._step_bound.add(id(session))

    def unbind_step(self, session) -> None:
        self._step_bound.discard(id(session))

    def logits_buffer(self, b: int, keep: int, vocab: int, dtype):
        out = self.logits.get((b, keep))
        if out is None:  # one logits buffer per shape, reused every step
            import onnxruntime as ort

            arr = np.empty((b, keep, vocab), dtype)  # [B,keep,V]
            out = self.logits[(b, keep)] = (arr, ort.OrtValue.ortvalue_from_numpy(arr))
        return out


class StoreCache:
    def __init__(self, store: KVStore, mask: np.ndarray, full: bool | None = None):
        self.store = store
        self.mask = mask
        self._full = full  # no padding: every slot is a real token (None = not known yet)

    @property
    def full(self) -> bool:
        if self._full is None:
            self._full = bool(self.mask.all())
        return self._full

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def keys(self) -> list[np.ndarray]:  # views into the store
        return [k[:, :, :self.length] for k in self.store.keys]

    @property
    def values(self) -> list[np.ndarray]:
        return [v[:, :, :self.length] for v in self.store.values]

    def truncate(self, length: int) -> "StoreCache":
        """No copy: continuing it copies the prefix first (copy-on-write, the store's frontier is past it)."""
        _check_truncate(self, length)
        return self if length == self.length else StoreCache(self.store, self.mask[:, :length], self._full)

    def select(self, rows: np.ndarray) -> "StoreCache":
        rows = np.asarray(rows, dtype=np.int64)
        t = self.length
        new = self.store.owner.new_store(len(rows), self.store.capacity)
        for dst, src in zip(new.keys + new.values, self.store.keys + self.store.values):
            for j, r in enumerate(rows):  # prefix rows only: one copy, the tails stay untouched
                dst[j, :, :t] = src[r, :, :t]
        new.frontier = t
        return StoreCache(new, self.mask[rows], self._full)


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
    def of(cls, cache: KVCache, positions, row: int = 0) -> "Snapshot":
        """Copy row `row` of an unpadded cache (its first len(positions) positions)."""
        n = len(positions)
        return cls(tuple(positions), tuple(np.array(k[row, :, :n]) for k in cache.keys),
                   tuple(np.array(v[row, :, :n]) for v in cache.values))

    def shared_prefix(self, positions) -> int:
        """How many leading positions this snapshot holds for a prompt (leaving one to prefill)."""
        n = min(self.length, len(positions) - 1)
        i = 0
        while i < n and self.positions[i] == positions[i]:
            i += 1
        return i

    def as_cache(self, length: int) -> HostCache:
        """Its first `length` positions as a batch-1 host cache."""
        return HostCache([k[None, :, :length] for k in self.keys], [v[None, :, :length] for v in self.values],
                         np.ones((1, length), np.int64))
