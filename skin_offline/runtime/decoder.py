"""Decoder stage: embeddings + KV cache -> logits, for both decoder graph flavors and any float dtype.

A `KVCache` belongs to one generation; the session is shared and stateless, so many threads may run their own
caches through one Decoder concurrently (onnxruntime's Run is thread-safe; each cache has its own IOBinding).

- `Decoder` (standard-op graph, TensorRT-friendly): the graph concatenates past and new keys, so each step
  returns fresh present arrays; the cache is plain NumPy.
- `FastDecoder` (contrib graph with GroupQueryAttention): the cache lives in preallocated per-request buffers
  [B,kvH,capacity,D] bound as both past input and present output (onnxruntime's past-present share-buffer mode),
  so GQA writes each new key/value in place: no per-token allocation or copy of the cache. Buffers are
  `np.empty`, so untouched capacity costs address space, not resident memory, and they return to a small pool
  when the last cache using them is dropped.
- `DeviceDecoder` (standard graph on a GPU provider): presents are IO-bound outputs left on the device and
  bound as the next step's pasts, so the cache never crosses to the host per token; only the last position's
  logits are copied back. (The standard graph's Concat still allocates each step's presents on the device;
  the GQA share-buffer graph would avoid that, but onnxruntime's CUDA GQA is unverified here: no GPU.)

Caches stay values to callers: continuing a cache never changes what an older cache object means. A store
remembers how far it was written (`frontier`); continuing a cache that is not at the frontier (two
continuations of one prefix, beam rows) first copies its prefix to another store (copy-on-write).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from .. import names
from ..manifest import ModelDims
from .kernels.policy import KernelPolicy

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_POOL_SIZE = 2  # idle stores kept per decoder: one per concurrent request is the common case


def _np_dtype(ort_type: str):
    try:
        return np.dtype(_ORT_DTYPES[ort_type])
    except KeyError:
        from ..errors import BundleError

        raise BundleError(f"decoder graph uses {ort_type}, which this runtime does not feed; re-export the bundle") from None


def _mask_and_positions(cache_mask: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """[B,P] cache mask + S new tokens -> ([B,P+S] mask, [B,S] positions counting real tokens only)."""
    b = cache_mask.shape[0]
    mask = np.concatenate([cache_mask, np.ones((b, s), np.int64)], axis=1)  # [B, P+S]
    # positions count real tokens only (left padding keeps HF's cumsum(mask) - 1 convention)
    start = cache_mask.sum(axis=1, keepdims=True)  # [B,1] real tokens before the new ones
    return mask, start + np.arange(s, dtype=np.int64)[None, :]


class _KVStore:
    """Per-request KV buffers, per layer [B,kvH,capacity,D], with their OrtValues and one IOBinding per session
    (the decode graph and, in a bundle with a multi-row graph, that one: both read and write the same buffers)."""

    def __init__(self, owner: "FastDecoder", keys: list[np.ndarray], values: list[np.ndarray]):
        import onnxruntime as ort

        self.owner = owner
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


class KVCache:
    """Keys/values of the tokens seen so far plus their mask; a value: forward() returns a new one."""

    def __init__(self, keys: list[np.ndarray] | None, values: list[np.ndarray] | None, mask: np.ndarray,
                 store: _KVStore | None = None, full: bool | None = None, device_kv: list | None = None):
        self._keys, self._values = keys, values
        self.mask = mask  # [B, T] int64, 1 = real token
        self.store = store  # share-buffer backing (FastDecoder), else None
        self._full = full  # no padding: every slot is a real token (None = not known yet)
        self.device_kv = device_kv  # DeviceDecoder: OrtValues [k0, v0, k1, v1, ...] left where the session ran

    @property
    def full(self) -> bool:
        if self._full is None:
            self._full = bool(self.mask.all())
        return self._full

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def keys(self) -> list[np.ndarray]:  # per layer [B, kvH, T, D] (views into the store when there is one)
        if self._keys is None:
            self._keys = ([ov.numpy() for ov in self.device_kv[0::2]] if self.device_kv is not None  # device -> host
                          else [k[:, :, :self.length] for k in self.store.keys])
        return self._keys

    @property
    def values(self) -> list[np.ndarray]:
        if self._values is None:
            self._values = ([ov.numpy() for ov in self.device_kv[1::2]] if self.device_kv is not None
                            else [v[:, :, :self.length] for v in self.store.values])
        return self._values

    def truncate(self, length: int) -> "KVCache":
        """The cache of the first `length` positions (a follow-up turn reusing a shared prefix); no copy for
        store-backed caches: continuing it copies the prefix first (copy-on-write, the store's frontier is past)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        if length == self.length:
            return self
        if self.store is not None:
            return KVCache(None, None, self.mask[:, :length], self.store, self._full)
        return KVCache([k[:, :, :length] for k in self.keys], [v[:, :, :length] for v in self.values],
                       self.mask[:, :length])  # (a device cache comes through the host here: once per turn)

    def select(self, rows: np.ndarray) -> "KVCache":
        """Reorder / repeat batch rows (beam search, one prefix shared by several continuations); copies."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.device_kv is not None and np.array_equal(rows, np.arange(self.mask.shape[0])):
            return self  # device caches are never written in place: the identity selection can share them
        if self.store is None:  # (a device cache is gathered on the host and uploaded by the next forward)
            return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.mask[rows])
        t = self.length
        new = self.store.owner._store(len(rows), self.store.capacity)
        for dst, src in zip(new.keys + new.values, self.store.keys + self.store.values):
            for j, r in enumerate(rows):  # prefix rows only: one copy, the tails stay untouched
                dst[j, :, :t] = src[r, :, :t]
        new.frontier = t
        return KVCache(None, None, self.mask[rows], new, self._full)


class Decoder:
    """Runs either graph flavor through plain session.run (the standard graph's presents are new arrays)."""

    def __init__(self, session, dims: ModelDims):
        self.session = session
        self.dims = dims
        types = {i.name: i.type for i in session.get_inputs()}
        self.embeds_dtype = _np_dtype(types[names.INPUTS_EMBEDS])
        self.kv_dtype = _np_dtype(types[names.past_key(0)])
        self._outputs = [names.LOGITS] + [n for i in range(dims.num_layers) for n in (names.present_key(i), names.present_value(i))]

    def empty_cache(self, batch: int = 1) -> KVCache:
        d = self.dims
        z = np.zeros((batch, d.num_kv_heads, 0, d.head_dim), self.kv_dtype)
        return KVCache([z] * d.num_layers, [z] * d.num_layers, np.zeros((batch, 0), np.int64))

    def forward(self, embeds: np.ndarray, cache: KVCache, keep: int = 1) -> tuple[np.ndarray, KVCache]:
        """[B,S,H] embeddings after `cache` -> ([B,keep,V] logits of the last `keep` positions, new cache)."""
        mask, positions = _mask_and_positions(cache.mask, embeds.shape[1])
        feed = {
            names.INPUTS_EMBEDS: np.ascontiguousarray(embeds, self.embeds_dtype),
            names.ATTENTION_MASK: mask,
            names.POSITION_IDS: positions,
            names.NUM_LOGITS_TO_KEEP: np.array(keep, np.int64),
        }
        for i in range(self.dims.num_layers):
            feed[names.past_key(i)] = np.ascontiguousarray(cache.keys[i], self.kv_dtype)
            feed[names.past_value(i)] = np.ascontiguousarray(cache.values[i], self.kv_dtype)
        out = self.session.run(self._outputs, feed)
        return out[0].astype(np.float32, copy=False), KVCache(out[1::2], out[2::2], mask)

    def logits_all(self, embeds: np.ndarray) -> np.ndarray:
        """[B,S,H] -> [B,S,V]: every position's logits from an empty cache (teacher forcing, checks)."""
        logits, _ = self.forward(embeds, self.empty_cache(embeds.shape[0]), keep=embeds.shape[1])
        return logits


class FastDecoder(Decoder):
    """Contrib graph (GroupQueryAttention) with the cache in preallocated share-buffer stores and IO binding.

    `gemm_session`: a second graph with the same I/O and KV layout (a bundle's int8 QGEMM variant) that calls of
    many rows run through, as `policy` decides (runtime/kernels/policy.py); both write the same buffers, so a
    cache prefilled by one is continued by the other."""

    def __init__(self, session, dims: ModelDims, capacity: int | None = None, gemm_session=None,
                 policy: KernelPolicy | None = None):
        super().__init__(session, dims)
        self.gemm_session = gemm_session
        self.policy = policy or KernelPolicy.for_this_machine()
        self.capacity = capacity or dims.max_context  # per-request buffer length (lazily committed pages)
        self.logits_dtype = _np_dtype(next(o.type for o in session.get_outputs() if o.name == names.LOGITS))
        self._pool: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
        self._lock = threading.Lock()

    def session_for(self, rows: int):
        """The graph a call of `rows` rows (batch x new tokens) runs through."""
        return self.gemm_session if self.gemm_session is not None and self.policy.multi_row(rows) else self.session

    # --- stores ---
    def _store(self, batch: int, capacity: int) -> _KVStore:
        with self._lock:
            for j, (ks, vs) in enumerate(self._pool):
                if ks[0].shape[0] == batch and ks[0].shape[2] >= capacity:
                    keys, values = self._pool.pop(j)
                    break
            else:
                shape = (batch, self.dims.num_kv_heads, capacity, self.dims.head_dim)  # [B,kvH,C,D]
                keys = [np.empty(shape, self.kv_dtype) for _ in range(self.dims.num_layers)]
                values = [np.empty(shape, self.kv_dtype) for _ in range(self.dims.num_layers)]
        store = _KVStore(self, keys, values)
        weakref.finalize(store, self._recycle, keys, values)  # buffers outlive the store, back to the pool
        return store

    def _recycle(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        with self._lock:
            if len(self._pool) < _POOL_SIZE:
                self._pool.append((keys, values))

    def _writable_store(self, cache: KVCache, needed: int) -> _KVStore:
        """The store to extend `cache` in: its own when it is at the frontier and has room, else a copy."""
        store = cache.store
        if store is not None and store.owner is self and store.frontier == cache.length and needed <= store.capacity:
            return store
        b, t = cache.mask.shape
        capacity = max(self.capacity, -(-needed // 256) * 256)
        fresh = self._store(b, capacity)
        for dst, src in zip(fresh.keys + fresh.values, cache.keys + cache.values):
            dst[:, :, :t] = src  # copy-on-write of the prefix only (the tail of the buffer is never read)
        fresh.frontier = t
        return fresh

    def empty_cache(self, batch: int = 1) -> KVCache:
        return KVCache(None, None, np.zeros((batch, 0), np.int64), self._store(batch, self.capacity), True)

    # --- step ---
    def forward(self, embeds: np.ndarray, cache: KVCache, keep: int = 1) -> tuple[np.ndarray, KVCache]:
        """[B,S,H] embeddings after `cache` -> ([B,keep,V] logits of the last `keep` positions, new cache)."""
        b, s, _ = embeds.shape
        keep = max(1, min(keep, s))
        t = cache.length + s
        store = self._writable_store(cache, t)
        session = self.session_for(b * s)
        bind = store.binding(session)
        if s == 1 and keep == 1 and b == store.batch and cache.full:  # decode step: refill pre-bound inputs
            mask = store.ones[:b * t].reshape(b, t)  # [B,T] all ones, a view (never written)
            np.copyto(store.step_embeds, embeds)
            store.step_positions.fill(t - 1)
            store.bind_step(session)
        else:  # prefill, chunks, padded rows
            mask, positions = _mask_and_positions(cache.mask, s)
            bind.bind_cpu_input(names.INPUTS_EMBEDS, np.ascontiguousarray(embeds, self.embeds_dtype))
            bind.bind_cpu_input(names.POSITION_IDS, positions)
            bind.bind_cpu_input(names.NUM_LOGITS_TO_KEEP, np.array(keep, np.int64))
            store.unbind_step(session)
        bind.bind_cpu_input(names.ATTENTION_MASK, mask)
        out = store.logits.get((b, keep))
        if out is None:  # one logits buffer per shape, reused every step
            import onnxruntime as ort

            arr = np.empty((b, keep, self.dims.vocab_size), self.logits_dtype)  # [B,keep,V]
            out = store.logits[(b, keep)] = (arr, ort.OrtValue.ortvalue_from_numpy(arr))
        bind.bind_ortvalue_output(names.LOGITS, out[1])
        session.run_with_iobinding(bind)
        store.frontier = t
        # the buffer is rewritten next step: hand out a copy (V floats, ~10 us) so callers may keep it
        return out[0].astype(np.float32, copy=True), KVCache(None, None, mask, store, cache._full)


class DeviceDecoder(Decoder):
    """Standard graph with the cache resident where the session runs (CUDA / TensorRT): IO-bound outputs.

    Per step only the new token's embedding, mask and positions go host -> device and [B,keep,V] logits come
    back. Works on any provider: with `device_type="cpu"` the tests run this exact binding logic on the CPU."""

    def __init__(self, session, dims: ModelDims, device_type: str = "cuda", device_id: int = 0):
        super().__init__(session, dims)
        self.device_type, self.device_id = device_type, device_id
        self._pasts = [n for i in range(dims.num_layers) for n in (names.past_key(i), names.past_value(i))]

    def forward(self, embeds: np.ndarray, cache: KVCache, keep: int = 1) -> tuple[np.ndarray, KVCache]:
        """[B,S,H] embeddings after `cache` -> ([B,keep,V] logits of the last `keep` positions, new cache)."""
        mask, positions = _mask_and_positions(cache.mask, embeds.shape[1])
        bind = self.session.io_binding()  # per call: cheap, and keeps concurrent requests independent
        bind.bind_cpu_input(names.INPUTS_EMBEDS, np.ascontiguousarray(embeds, self.embeds_dtype))
        bind.bind_cpu_input(names.ATTENTION_MASK, mask)
        bind.bind_cpu_input(names.POSITION_IDS, positions)
        bind.bind_cpu_input(names.NUM_LOGITS_TO_KEEP, np.array(keep, np.int64))
        if cache.device_kv is not None:  # last step's presents, still on the device
            for name, ov in zip(self._pasts, cache.device_kv):
                bind.bind_ortvalue_input(name, ov)
        else:  # empty, or a host cache (select() gathered rows): uploaded once here
            host = [a for i in range(self.dims.num_layers) for a in (cache.keys[i], cache.values[i])]
            for name, arr in zip(self._pasts, host):
                bind.bind_cpu_input(name, np.ascontiguousarray(arr, self.kv_dtype))
        bind.bind_output(names.LOGITS, "cpu")  # the only output copied back: [B,keep,V]
        for name in self._outputs[1:]:
            bind.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(bind)
        out = bind.get_outputs()
        return out[0].numpy().astype(np.float32, copy=False), KVCache(None, None, mask, device_kv=list(out[1:]))


def _session_device(session) -> tuple[str, int] | None:
    """('cuda', id) when the session's first provider keeps tensors on an NVIDIA GPU, else None (CPU)."""
    first = session.get_providers()[0]
    if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        opts = session.get_provider_options().get(first, {})
        return "cuda", int(opts.get("device_id", 0) or 0)
    return None


def make_decoder(session, dims: ModelDims, share_buffer: bool, gemm_session=None) -> Decoder:
    """FastDecoder for graphs whose attention is GroupQueryAttention (Flavor.CONTRIB), with the multi-row graph
    when the bundle carries one; for the standard graph DeviceDecoder on a GPU provider (cache stays on the
    device), plain Decoder on the CPU."""
    if share_buffer:
        return FastDecoder(session, dims, gemm_session=gemm_session)
    dev = _session_device(session)
    return DeviceDecoder(session, dims, *dev) if dev else Decoder(session, dims)
