"""Decoder stage: embeddings + KV cache -> logits, for both decoder graph flavors and any float dtype.

The request path runs decoders through the engine's slots (runtime/slots.py); `forward(embeds, cache)` is the
functional form the slots of the standard graph, teacher forcing, export checks and tests use. Sessions are shared
and stateless, so threads may run their own caches through one decoder (onnxruntime's Run is thread-safe).

- `Decoder` (standard-op graph, TensorRT-friendly): the graph concatenates past and new keys, so each step
  returns fresh present arrays; the cache is plain NumPy.
- `FastDecoder` (contrib graph with GroupQueryAttention): the cache lives in preallocated rows [R,kvH,C,D]
  (kv.KVRows) bound as both past input and present output, so GQA writes each new key/value in place: no
  per-token allocation or copy of the cache.
- `DeviceDecoder` (standard graph on a GPU provider): presents are IO-bound outputs left on the device and
  bound as the next step's pasts, so the cache never crosses to the host per token; only the last position's
  logits are copied back. (The standard graph's Concat still allocates each step's presents on the device;
  the GQA share-buffer graph would avoid that, but onnxruntime's CUDA GQA is unverified here: no GPU.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import names
from ..manifest import ModelDims
from .kernels.policy import KernelPolicy
from .kv import DeviceCache, HostCache, KVCache, KVRows, StoreCache

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _np_dtype(ort_type: str) -> np.dtype:
    try:
        return np.dtype(_ORT_DTYPES[ort_type])
    except KeyError:
        from ..errors import BundleError

        raise BundleError(
            f"decoder graph uses {ort_type}, which this runtime does not feed; re-export the bundle"
        ) from None


def _mask_and_positions(cache_mask: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """[B,P] cache mask + S new tokens -> ([B,P+S] mask, [B,S] positions counting real tokens only)."""
    b = cache_mask.shape[0]
    mask = np.concatenate([cache_mask, np.ones((b, s), np.int64)], axis=1)  # [B, P+S]
    # positions count real tokens only (left padding keeps HF's cumsum(mask) - 1 convention)
    start = cache_mask.sum(axis=1, keepdims=True)  # [B,1] real tokens before the new ones
    return mask, start + np.arange(s, dtype=np.int64)[None, :]


class Decoder:
    """Runs either graph flavor through plain session.run (the standard graph's presents are new arrays)."""

    def __init__(self, session: Any, dims: ModelDims):
        self.session = session
        self.dims = dims
        types = {i.name: i.type for i in session.get_inputs()}
        self.embeds_dtype = _np_dtype(types[names.INPUTS_EMBEDS])
        self.kv_dtype = _np_dtype(types[names.past_key(0)])
        self._outputs = [names.LOGITS] + [
            n for i in range(dims.num_layers) for n in (names.present_key(i), names.present_value(i))
        ]

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
    """Contrib graph (GroupQueryAttention): a cache lives in `KVRows` (kv.py) that GQA writes in place.

    `gemm_session`: a second graph with the same I/O and KV layout (a bundle's int8 QGEMM variant) that calls of
    many rows run through, as `policy` decides (runtime/kernels/policy.py); both write the same buffers, so a
    cache prefilled by one is continued by the other."""

    def __init__(
        self,
        session: Any,
        dims: ModelDims,
        capacity: int | None = None,
        gemm_session: Any = None,
        policy: KernelPolicy | None = None,
    ):
        super().__init__(session, dims)
        self.gemm_session = gemm_session
        self.policy = policy or KernelPolicy.for_this_machine()
        self.capacity = capacity or dims.max_context  # buffer length per row (lazily committed pages)
        self.logits_dtype = _np_dtype(next(o.type for o in session.get_outputs() if o.name == names.LOGITS))

    def session_for(self, rows: int) -> Any:
        """The graph a call of `rows` rows (batch x new tokens) runs through."""
        return self.gemm_session if self.gemm_session is not None and self.policy.multi_row(rows) else self.session

    def rows(self, n: int, capacity: int | None = None) -> KVRows:
        """`n` rows of KV memory for this decoder's graphs."""
        return KVRows(self.dims, self.kv_dtype, n, capacity or self.capacity)

    def run_rows(
        self,
        kv: KVRows,
        start: int,
        stop: int,
        embeds: np.ndarray,
        mask: np.ndarray,
        positions: np.ndarray,
        keep: int = 1,
    ) -> np.ndarray:
        """One run over rows [start, stop) of `kv` -> [B,keep,V] logits; the graph is picked by the call's rows."""
        session = self.session_for((stop - start) * embeds.shape[1])
        return kv.run(session, start, stop, embeds, mask, positions, keep, self.embeds_dtype, self.logits_dtype)

    def _writable(self, cache: KVCache, needed: int) -> KVRows:
        """The rows to extend `cache` in: its own when it is at their frontier and has room, else a copy."""
        store = getattr(cache, "store", None)
        if (
            isinstance(store, KVRows)
            and store.frontier == cache.length
            and needed <= store.capacity
            and store.keys[0].dtype == self.kv_dtype
        ):
            return store
        b, t = cache.mask.shape
        fresh = self.rows(b, max(self.capacity, -(-needed // 256) * 256))
        for dst, src in zip(fresh.keys + fresh.values, cache.keys + cache.values):
            dst[:, :, :t] = src  # copy-on-write of the prefix only (the tail of the buffer is never read)
        fresh.frontier = t
        return fresh

    def empty_cache(self, batch: int = 1) -> KVCache:
        return StoreCache(self.rows(batch), np.zeros((batch, 0), np.int64))

    def forward(self, embeds: np.ndarray, cache: KVCache, keep: int = 1) -> tuple[np.ndarray, KVCache]:
        """[B,S,H] embeddings after `cache` -> ([B,keep,V] logits of the last `keep` positions, new cache)."""
        b, s, _ = embeds.shape
        keep = max(1, min(keep, s))
        t = cache.length + s
        kv = self._writable(cache, t)
        mask, positions = _mask_and_positions(cache.mask, s)
        logits = self.run_rows(kv, 0, b, embeds, mask, positions, keep)
        kv.frontier = t
        return logits, StoreCache(kv, mask)


class DeviceDecoder(Decoder):
    """Standard graph with the cache resident where the session runs (CUDA / TensorRT): IO-bound outputs.

    Per step only the new token's embedding, mask and positions go host -> device and [B,keep,V] logits come
    back. Works on any provider: with `device_type="cpu"` the tests run this exact binding logic on the CPU."""

    def __init__(self, session: Any, dims: ModelDims, device_type: str = "cuda", device_id: int = 0):
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
        else:  # empty, or a host cache (a truncated or gathered one): uploaded once here
            host = [a for i in range(self.dims.num_layers) for a in (cache.keys[i], cache.values[i])]
            for name, arr in zip(self._pasts, host):
                bind.bind_cpu_input(name, np.ascontiguousarray(arr, self.kv_dtype))
        bind.bind_output(names.LOGITS, "cpu")  # the only output copied back: [B,keep,V]
        for name in self._outputs[1:]:
            bind.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(bind)
        out = bind.get_outputs()
        return out[0].numpy().astype(np.float32, copy=False), DeviceCache(list(out[1:]), mask)


def _session_device(session: Any) -> tuple[str, int] | None:
    """('cuda', id) when the session's first provider keeps tensors on an NVIDIA GPU, else None (CPU)."""
    first = session.get_providers()[0]
    if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        opts = session.get_provider_options().get(first, {})
        return "cuda", int(opts.get("device_id", 0) or 0)
    return None


def make_decoder(session: Any, dims: ModelDims, share_buffer: bool, gemm_session: Any = None) -> Decoder:
    """FastDecoder for graphs whose attention is GroupQueryAttention (Flavor.CONTRIB), with the multi-row graph
    when the bundle carries one; for the standard graph DeviceDecoder on a GPU provider (cache stays on the
    device), plain Decoder on the CPU."""
    if share_buffer:
        return FastDecoder(session, dims, gemm_session=gemm_session)
    dev = _session_device(session)
    return DeviceDecoder(session, dims, *dev) if dev else Decoder(session, dims)
