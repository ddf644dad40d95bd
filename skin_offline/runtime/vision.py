"""Vision stage: normalised pixels -> projected image features (CLIP tower + projector graph), memoised by content.

The engine runs it on its own thread, off the decode loop; a second question about the same image finds its
features in the cache (and usually its prefill in the prompt cache, which then skips this stage altogether)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from .. import names


class VisionEncoder:
    def __init__(self, session: Any):
        self.session = session

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """[B,3,S,S] float32 -> [B,N,H] float32 (N = image tokens, H = decoder hidden size)."""
        # fp16 graphs (GPU precision tier) take and give float16; the runtime works in float32
        dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        (feats,) = self.session.run(
            [names.IMAGE_FEATURES], {names.PIXEL_VALUES: np.ascontiguousarray(pixel_values, dtype)}
        )
        return feats.astype(np.float32, copy=False)


def pixel_key(pixels: np.ndarray) -> str:
    """sha256 of the pixel values: the key of the feature cache and of image rows in the prompt cache."""
    return hashlib.sha256(pixels.tobytes()).hexdigest()


class VisionStage:
    """The encoder and a small LRU of its outputs (thread-safe: the engine's vision thread and callers share it)."""

    def __init__(self, encoder: VisionEncoder, cache_size: int = 8):
        self.encoder = encoder
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def features(self, pixels: np.ndarray, key: str | None = None) -> np.ndarray:
        """[1,3,S,S] -> [N,H]; `key`: the pixels' sha256 when already computed."""
        key = key or pixel_key(pixels)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        feats = self.encoder.encode(pixels)[0]
        with self._lock:
            self._cache[key] = feats
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return feats
