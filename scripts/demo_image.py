"""Draw a synthetic 'lesion' photo (a brown irregular blob on skin tone) for the demo; deterministic."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def lesion_image(width: int = 640, height: int = 480, seed: int = 7) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    skin = np.array([224, 180, 150], np.float32) + rng.normal(0, 6, (height, width, 3))
    angle = np.arctan2(yy - height / 2, xx - width / 2)
    radius = 110 + 18 * np.sin(3 * angle) + 9 * np.cos(7 * angle)
    inside = np.hypot(xx - width / 2, (yy - height / 2) * 1.2) < radius
    lesion = np.array([110, 70, 50], np.float32) + rng.normal(0, 12, (height, width, 3))
    img = np.where(inside[..., None], lesion, skin).clip(0, 255).astype(np.uint8)
    return Image.fromarray(img).filter(ImageFilter.GaussianBlur(2))


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-lesion.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    lesion_image().save(out)
