"""Image loading and CLIP preprocessing for SkinVL (runtime: numpy + PIL only).

Documented handling in `load_image`:
- EXIF orientation is applied (ImageOps.exif_transpose), so phone photos come out upright
  (an unreadable EXIF block is ignored rather than failing the image).
  LLaVA's own loader does not do this; for images without an orientation tag nothing changes.
- Animated GIF/WebP/APNG: the first frame is used (what `Image.open` selects).
- Alpha is dropped, not composited: every mode goes through PIL's `convert('RGB')` exactly like
  LLaVA's `Image.open(f).convert('RGB')` (RGBA, LA, PA, palette, L, 1, CMYK, YCbCr). The PIL
  'transparency' info key is removed too, so transformers >= 5 (which composites anything carrying
  transparency onto white) sees the same pixels as the transformers LLaVA was trained with.
- 16-bit greyscale ('I;16*', and 'I' which 16-bit PNG/PGM decode to) is scaled to 8 bits with
  round(v / 257), so 65535 -> 255; PIL's convert would clip every value above 255 to white.
  'I' values outside [0, 65535] are clipped. 16-bit RGB(A) PNGs already decode to 8 bits in PIL.
- Images larger than `max_pixels` (default 100 MP, env SKIN_OFFLINE_MAX_PIXELS) are refused
  before decoding. Pillow's own bomb guard (2 x Image.MAX_IMAGE_PIXELS, about 179 MP) still
  applies on top and is reported the same way; its warning is silenced.
Every failure is an `ImageError` with a one-line message naming the source and the problem.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageError
from ..manifest import PadMode, PreprocessConfig

DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "SKIN_OFFLINE_MAX_PIXELS"
_CONVERT_HINT = "convert it to JPEG or PNG"

# What corrupt or hostile files make PIL's decoders raise (struct.error, IndexError etc. come
# from plugins parsing garbage headers). Scoped to the PIL calls only.
_PIL_ERRORS = (
    OSError,  # includes Image.UnidentifiedImageError and truncated-data errors
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    Image.DecompressionBombError,
)


def _max_pixels_from_env() -> int:
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ImageError(f"{MAX_PIXELS_ENV}={raw!r} is not a positive integer; set it to a pixel count such as 100000000")
    return value


def _sniff(head: bytes) -> str | None:
    """Name a format PIL cannot read here, from its magic bytes."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIC/HEIF"
    if head.startswith(b"%PDF-"):
        return "PDF"
    if head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JPEG XL"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG"
    return None


def _describe(src) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<image bytes>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    return str(src)


def _open(src, name: str) -> Image.Image:
    """Validate the source and open it lazily (header only)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError(f"{name}: empty image data (0 bytes); pass the contents of a JPEG or PNG file")
        fp, head = io.BytesIO(data), data[:256]
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise ImageError(f"{name}: no such file; check the path")
        if path.is_dir():
            raise ImageError(f"{name}: is a directory, not an image file; pass an image file")
        try:
            with open(path, "rb") as f:
                head = f.read(256)
        except OSError as e:
            raise ImageError(f"{name}: cannot be read ({e.strerror or e}); check its permissions") from None
        if not head:
            raise ImageError(f"{name}: empty file (0 bytes); the file is incomplete, copy it again")
        fp = path
    else:
        raise ImageError(f"{name}: unsupported image source type {type(src).__name__}; pass a path, bytes or a PIL image")
    try:
        return Image.open(fp)
    except Image.UnidentifiedImageError:
        fmt = _sniff(head)
        if fmt:
            raise ImageError(f"{name}: {fmt} files are not supported; {_CONVERT_HINT}") from None
        raise ImageError(f"{name}: not a recognised image file; {_CONVERT_HINT}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((a + 128) // 257).astype(np.uint8))  # 2-D uint8 -> mode L
    rgb = img.convert("RGB")
    rgb.info.pop("transparency", None)
    return rgb


def load_image(src, max_pixels: int | None = None) -> Image.Image:
    """Open a path / bytes / PIL image as an 8-bit RGB PIL image (see module docstring)."""
    name = _describe(src)
    limit = _max_pixels_from_env() if max_pixels is None else int(max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # e.g. "palette images with transparency ..."
        try:
            if isinstance(src, Image.Image):
                img, owned = src, False
            else:
                img, owned = _open(src, name), True
            try:
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ImageError(f"{name}: image has zero size ({w}x{h}); the file is corrupt")
                if w * h > limit:
                    raise ImageError(
                        f"{name}: image too large ({w}x{h} = {w * h} pixels > limit {limit}); "
                        f"downscale it or raise {MAX_PIXELS_ENV}"
                    )
                img.load()  # full decode now, so truncated/corrupt data fails here
                try:
                    upright = ImageOps.exif_transpose(img)
                except _PIL_ERRORS:
                    upright = img  # unreadable EXIF: keep the pixels, skip the rotation
                return _to_rgb(upright)
            finally:
                if owned:
                    img.close()
        except ImageError:
            raise
        except Image.DecompressionBombError:
            hard = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else "?"
            raise ImageError(f"{name}: image too large (over Pillow's hard limit of {hard} pixels); downscale it") from None
        except MemoryError:
            raise ImageError(f"{name}: not enough memory to decode the image; downscale it") from None
        except _PIL_ERRORS as e:
            detail = " ".join(str(e).split()) or type(e).__name__
            raise ImageError(
                f"{name}: corrupt or truncated image ({detail}); re-export or copy the file again"
            ) from None


def expand_to_square(img: Image.Image, color) -> Image.Image:
    """LLaVA's expand2square: centre the image on a square canvas of its longer side."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _resize_shortest_edge(img: Image.Image, size: int) -> Image.Image:
    # transformers' get_resize_output_image_size(default_to_square=False): long side truncated by int().
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def _center_crop(a: np.ndarray, crop: int) -> np.ndarray:
    """transformers' center_crop on [C, H, W]: floor offsets; zero padding when the image is smaller."""
    _, h, w = a.shape
    top, left = (h - crop) // 2, (w - crop) // 2
    if top >= 0 and left >= 0:
        return a[:, top : top + crop, left : left + crop]
    # Pad to at least crop x crop with the image at ceil offsets, then crop (transformers' order).
    nh, nw = max(crop, h), max(crop, w)
    pad_top, pad_left = -(-(nh - h) // 2), -(-(nw - w) // 2)
    padded = np.zeros((a.shape[0], nh, nw), dtype=a.dtype)
    padded[:, pad_top : pad_top + h, pad_left : pad_left + w] = a
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top) : min(nh, top + crop), max(0, left) : min(nw, left + crop)]


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """CLIP pixel values, float32 [1, 3, crop, crop], matching LLaVA (+ expand2square in PAD mode)."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    if cfg.mode is PadMode.PAD:
        img = expand_to_square(img, cfg.pad_color)
    img = _resize_shortest_edge(img, cfg.size)
    a = np.asarray(img).transpose(2, 0, 1)  # [3, H, W] uint8
    a = _center_crop(a, cfg.crop_size)  # [3, S, S]
    # Same float order as transformers: rescale in float64, cast to float32, normalise in float32.
    x = (a.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    x = (x - mean) / std
    return np.ascontiguousarray(x[None])  # [1, 3, S, S]


def pixel_values_from(src, cfg: PreprocessConfig, max_pixels: int | None = None) -> np.ndarray:
    """load_image + preprocess: float32 [1, 3, crop, crop]."""
    return preprocess(load_image(src, max_pixels=max_pixels), cfg)
