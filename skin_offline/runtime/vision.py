"""Vision stage: normalised pixels -> projected image features (CLIP tower + projector graph)."""

from __future__ import annotations

import numpy as np

from .. import names


class VisionEncoder:
    def __init__(self, session):
        self.session = session

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """[B,3,S,S] float32 -> [B,N,H] float32 (N = image tokens, H = decoder hidden size)."""
        # fp16 graphs (GPU precision tier) take and give float16; the runtime works in float32
        dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        (feats,) = self.session.run([names.IMAGE_FEATURES], {names.PIXEL_VALUES: np.ascontiguousarray(pixel_values, dtype)})
        return feats.astype(np.float32, copy=False)
