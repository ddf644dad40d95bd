"""The largest image the loaders decode (image.py for every format, dicom.py for DICOM): refused before decoding."""

from __future__ import annotations

import os

from ..errors import ImageError

DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "SKIN_OFFLINE_MAX_PIXELS"


def max_pixels_from_env() -> int:
    """$SKIN_OFFLINE_MAX_PIXELS, else 100 MP."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ImageError(
            f"{MAX_PIXELS_ENV}={raw!r} is not a positive integer; set it to a pixel count such as 100000000"
        )
    return value
