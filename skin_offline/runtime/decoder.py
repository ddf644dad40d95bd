"""Decoder stage: embeddings + KV cache -> logits, for both decoder graph flavors and any float dtype.

A cache (runtime/kv.py: one type per decoder) belongs to one generation; the session is shared and stateless, so
many threads may run their own caches through one Decoder concurrently (onnxruntime's Run is thread-safe; each
cache has its own IOBinding). The engine's slots (runtime/slots.py) are built on the same decoders.

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

"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from .. import names
from ..manifest import ModelDims
from .kernels.policy import KernelPolicy
from .kv import DeviceCache, HostCache, KVCache, KVStore, StoreCache

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
        return HostCache([z] * d.num_layers, [z] * d.num_layers, np.zeros((batch, 0), np.int64))

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
        return out[0].astype(np.float32, copy=False), HostCache(out[1::2], out[2::2], mask)

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
        # reentrant: a garbage collection can start inside the locked region (np.empty, a tuple) and run a dead
        # store's finalizer (_recycle) in the same thread; a plain Lock then deadlocks that thread and every other
        # request (seen under server load about once per 9,000 requests)
        self._lock = threading.RLock()

    def session_for(self, rows: int):
        """The graph a call of `rows` rows (batch x new tokens) runs through."""
        return self.gemm_session if self.gemm_session is not None and self.policy.multi_row(rows) else self.session

    # --- stores ---
    def new_store(self, batch: int, capacity: int) -> KVStore:
        with self._lock:
            for j, (ks, vs) in enumerate(self._pool):
                if ks[0].shape[0] == batch and ks[0].shape[2] >= capacity:
                    keys, values = self._pool.pop(j)
                    break
            else:
                shape = (batch, self.dims.num_kv_heads, capacity, self.dims.head_dim)  # [B,kvH,C,D]
                keys = [np.empty(shape, self.kv_dtype) for _ in range(self.dims.num_layers)]
                values = [np.empty(shape, self.kv_dtype) for _ in range(self.dims.num_layers)]
        store = KVStore(self, keys, values)
        weakref.finalize(store, self._recycle, keys, values)  # buffers outlive the store, back to the pool
        return store

    def _recycle(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        with self._lock:
            if len(self._pool) < _POOL_SIZE:
                self._pool.append((keys, values))

    def _writable_store(self, cache: KVCache, needed: int) -> KVStore:
        """The store to extend `cache` in: its own when it is at the frontier and has room, else a copy."""
        store = getattr(cache, "store", None)
        if store is not None and store.owner is self and store.frontier == cache.length and needed <= store.capacity:
            return store
        b, t = cache.mask.shape
        capacity = max(self.capacity, -(-needed // 256) * 256)
        fresh = self.new_store(b, capacity)
        for dst, src in zip(fresh.keys + fresh.values, cache.keys + cache.values):
            dst[:, :, :t] = src  # copy-on-write of the prefix only (the tail of the buffer is never read)
        fresh.frontier = t
        return fresh

    def empty_cache(self, batch: int = 1) -> KVCache:
        return StoreCache(self.new_store(batch, self.capacity), np.zeros((batch, 0), np.int64), True)

    # --- step ---
    def forward(self, embeds: np.ndarray, cache: KVCache, keep: int = 1) -> tuple[np.ndarray, KVCache]:
        """[B,S,H] embeddings after `cache` -> ([B,keep,V] logits of the last `keep` positions, new cache)."""
        b, s, _ = embeds.shape
        keep = max(1, min(keep, s))
        t = cache.length + s
        store = self._writable_store(cache, t)
        session = self.session_for(b * s)
        bind = store.binding(session)
        full = getattr(cache, "full", None)
        full = bool(cache.mask.all()) if full is None else full
        if s == 1 and keep == 1 and b == store.batch and full:  # decode step: refill pre-bound inputs
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
        out = store.logits_buffer(b, keep, self.dims.vocab_size, self.logits_dtype)
        bind.bind_ortvalue_output(names.LOGITS, out[1])
        session.run_with_iobinding(bind)
        store.frontier = t
        # the buffer is rewritten next step: hand out a copy (V floats, ~10 us) so callers may keep it
        return out[0].astype(np.float32, copy=True), StoreCache(store, mask, full)


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
        if isinstance(cache, DeviceCache):  # last step's presents, still on the device
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
        return out[0].numpy().astype(np.float32, copy=False), DeviceCache(list(out[1:]), mask)


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
