"""Vision stage: normalised pixels -> projected image features (CLIP tower + projector graph)."""

from __future__ import annotations

import numpy as np

from .. import names


class VisionEncoder:
    def __init__(self, session):
        self.session = session

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """[B,3,S,S] float32 -> [B,N,H] float32 (N = image tokens, H = decoder hidden size)."""
        (feats,) = self.session.run([names.IMAGE_FEATURES], {names.PIXEL_VALUES: np.ascontiguousarray(pixel_values, np.float32)})
        return feats
