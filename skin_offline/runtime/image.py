"""Image loading and CLIP preprocessing for SkinVL (runtime: numpy + PIL + pydicom).

`read_image` is the one loader: path / bytes / PIL image / ImageSource (a source plus a frame number). The format is
recognised by content, never by extension. Documented handling:
- JPEG, PNG, WebP, GIF, BMP, TIFF (tiled, BigTIFF), AVIF, JPEG 2000: Pillow.
- DICOM (Part 10: 128-byte preamble + "DICM"): `dicom.py` (pydicom), without reading or echoing patient data.
  A header saying BurnedInAnnotation = YES adds a notice to the loaded image (never a refusal).
- HEIC/HEIF: pillow-heif, registered with Pillow only when such a file arrives and only if installed (the optional
  `heif` extra: its wheels bundle GPL-licensed codecs); without it, a one-line error naming the extra.
- Multi-frame files (DICOM, TIFF pages, animated GIF/WebP/APNG, HEIF image sequences): frame 0 unless `frame` asks
  for another; a frame that does not exist is an error naming the frame count.
- EXIF orientation is applied once (ImageOps.exif_transpose), so phone photos come out upright (an unreadable EXIF
  block is ignored rather than failing the image). pillow-heif applies HEIF's own rotation and resets the EXIF tag,
  so HEIC is not rotated twice. LLaVA's own loader does not do this; without an orientation tag nothing changes.
- Alpha is dropped, not composited: every mode goes through PIL's `convert('RGB')` exactly like
  LLaVA's `Image.open(f).convert('RGB')` (RGBA, LA, PA, palette, L, 1, CMYK, YCbCr). The PIL
  'transparency' info key is removed too, so transformers >= 5 (which composites anything carrying
  transparency onto white) sees the same pixels as the transformers LLaVA was trained with.
- 16-bit greyscale ('I;16*', and 'I' which 16-bit PNG/PGM decode to) is scaled to 8 bits with
  round(v / 257), so 65535 -> 255; PIL's convert would clip every value above 255 to white.
  'I' values outside [0, 65535] are clipped. 16-bit RGB(A) TIFF, which Pillow cuts to its high bytes, is scaled the
  same way (see _tiff16); 16-bit RGB(A) PNGs already decode with rounding in PIL.
- Images larger than `max_pixels` (default 100 MP, env SKIN_OFFLINE_MAX_PIXELS, pixel_limit.py) are refused
  before decoding. Pillow's own bomb guard (2 x Image.MAX_IMAGE_PIXELS, about 179 MP) still
  applies on top and is reported the same way; its warning is silenced.
Every failure is an `ImageError` with a one-line message naming the source and the problem.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageError
from ..manifest import PadMode, PreprocessConfig
from .pixel_limit import MAX_PIXELS_ENV, max_pixels_from_env

HEIF_EXTRA = "pip install 'skin-offline[heif]'"
_CONVERT_HINT = "convert it to JPEG or PNG"

# What corrupt or hostile files make PIL's decoders raise (struct.error, IndexError etc. come
# from plugins parsing garbage headers; RuntimeError from pillow-heif's libheif). Scoped to the PIL calls only.
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
    RuntimeError,
    Image.DecompressionBombError,
)


@dataclass(frozen=True)
class ImageSource:
    """An image (path / bytes / PIL image) and which of its frames to use, 0 = the first.

    Accepted wherever an image is (SkinVL.ask, stream, conversation, classify...), so choosing a frame of a
    multi-frame DICOM, a TIFF page or an animation needs no other change."""

    src: Any
    frame: int = 0

    def __post_init__(self) -> None:
        _check_frame(self.frame)


def _check_frame(frame: Any) -> int:
    if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
        raise ImageError(f"frame must be a whole number from 0 (the first frame), not {frame!r}")
    return frame


# ---------------------------------------------------------------- recognising formats by content

_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def _is_dicom(head: bytes) -> bool:
    """DICOM Part 10: a 128-byte preamble, then 'DICM'."""
    return head[128:132] == b"DICM"


def _is_heif(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM data set without the Part 10 header (no preamble, no 'DICM'): some PACS dumps and ACR-NEMA files.
    Only used to name the problem. Such files are not read (pydicom's force=True would parse any bytes as a data set,
    and without the file meta the transfer syntax, so the pixel layout, is a guess)."""
    if len(head) < 8 or head[0:2] not in (b"\x02\x00", b"\x08\x00") or head[3] != 0:
        return False
    vr = head[4:6]
    return (vr.isalpha() and vr.isupper()) or struct.unpack("<I", head[4:8])[0] < 256


def _sniff(head: bytes) -> str | None:
    """Name a format PIL cannot read here, from its magic bytes."""
    if _is_heif(head):
        return "HEIC/HEIF"
    if head.startswith(b"%PDF-"):
        return "PDF"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JPEG XL"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG"
    return None


def _describe(src: Any) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<image bytes>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    return str(src)


def _read(src: Any, name: str) -> tuple[io.BytesIO | Path, bytes]:
    """Validate a path / bytes source: (what to open, its first 256 bytes)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError(f"{name}: empty image data (0 bytes); pass the contents of a JPEG or PNG file")
        return io.BytesIO(data), data[:256]
    if isinstance(src, (str, os.PathLike)):
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
        return path, head
    raise ImageError(f"{name}: unsupported image source type {type(src).__name__}; pass a path, bytes or a PIL image")


_heif_ready = False


def _register_heif(name: str) -> None:
    """pillow-heif is optional (its wheels bundle GPL-licensed HEVC codecs): registered with Pillow the first time
    a HEIC/HEIF file arrives, so other images never load it."""
    global _heif_ready
    if _heif_ready:
        return
    try:
        import pillow_heif
    except (ImportError, OSError):
        raise ImageError(
            f"{name}: HEIC/HEIF photos need the optional heif extra: {HEIF_EXTRA} (or {_CONVERT_HINT})"
        ) from None
    pillow_heif.register_heif_opener()
    _heif_ready = True


def _open(fp: io.BytesIO | Path, head: bytes, name: str) -> Image.Image:
    """Open lazily (header only) with Pillow; HEIF through pillow-heif."""
    try:
        return Image.open(fp)
    except Image.UnidentifiedImageError:
        pass
    if _is_heif(head) and not _heif_ready:
        _register_heif(name)
        return _open(fp, head, name)
    if _looks_like_bare_dicom(head):
        raise ImageError(
            f"{name}: DICOM data without its file header (no 'DICM' preamble); export it from the PACS "
            "or viewer as a DICOM file (Part 10), or as JPEG or PNG"
        ) from None
    fmt = _sniff(head)
    if fmt == "HEIC/HEIF":
        raise ImageError(f"{name}: corrupt or unsupported HEIC/HEIF file; {_CONVERT_HINT}") from None
    if fmt:
        raise ImageError(f"{name}: {fmt} files are not supported; {_CONVERT_HINT}") from None
    raise ImageError(f"{name}: not a recognised image file; {_CONVERT_HINT}") from None


# ---------------------------------------------------------------- decoding


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((a + 128) // 257).astype(np.uint8))  # 2-D uint8 -> mode L
    rgb = img.convert("RGB")
    rgb.info.pop("transparency", None)
    return rgb


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except _PIL_ERRORS:
        return img  # unreadable EXIF: keep the pixels, skip the rotation


# 16-bit colour: Pillow has no 16-bit RGB mode, and its unpackers for 16-bit samples keep the high byte (0x80FF ->
# 0x80 = 128, 1000 -> 3 where round(1000 / 257) = 4). The unpacker of the other byte order keeps the low byte, so a
# second decode of the same tiles with that raw mode gives it, and round(v / 257) is computed from both, like the
# grey path. Pillow's own decoders stay in charge of compression, tiles, strips, predictors and BigTIFF.
_WIDE_BASES = ("RGB", "RGBA", "RGBX")  # not 'RGBa' (premultiplied: its unpacker divides by alpha per byte)
_OTHER_ORDER = {"L": "B", "B": "L", "N": "B" if sys.byteorder == "little" else "L"}


def _rawmode(tile: Any) -> str | None:
    args = tile.args
    raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else None)
    return raw if isinstance(raw, str) else None


def _low_byte_tiles(tiles: Any) -> list[Any] | None:
    """The tiles with each 16-bit colour raw mode swapped for the other byte order; None if not all such."""
    out = []
    for t in tiles or ():
        raw = _rawmode(t)
        base, _, depth = (raw or "").partition(";")
        if base not in _WIDE_BASES or depth[:2] != "16" or depth[2:] not in _OTHER_ORDER:
            return None
        swapped = f"{base};16{_OTHER_ORDER[depth[2:]]}"
        args = swapped if isinstance(t.args, str) else (swapped, *t.args[1:])
        out.append(t._replace(args=args))
    return out or None


def _with_low_bytes(high: Image.Image, fp: io.BytesIO | Path, name: str, frame: int) -> Image.Image:
    """`high` (decoded, upright) rebuilt from both bytes of each 16-bit sample, rounded to 8 bits."""
    low = Image.open(io.BytesIO(fp.getvalue()) if isinstance(fp, io.BytesIO) else fp)
    try:
        if frame:
            low.seek(frame)
        tiles = _low_byte_tiles(low.tile)
        if tiles is not None:
            low.tile = tiles
            low.load()
        lo = np.asarray(_upright(low), dtype=np.int64)
        hi = np.asarray(high, dtype=np.int64)
        if tiles is None or lo.shape != hi.shape:  # only if the file changed between the two reads
            raise ImageError(f"{name}: the file changed while it was read; copy it again")
        return Image.fromarray(((hi * 256 + lo + 128) // 257).astype(np.uint8))  # [H,W,C] -> RGB / RGBA
    finally:
        low.close()


def _seek(img: Image.Image, name: str, frame: int) -> None:
    n = getattr(img, "n_frames", 1)
    if frame >= n:
        raise ImageError(f"{name}: frame {frame} does not exist: the image has {n} frame(s), numbered 0 to {n - 1}")
    if frame:
        img.seek(frame)


def _check_size(img: Image.Image, name: str, limit: int) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: image has zero size ({w}x{h}); the file is corrupt")
    if w * h > limit:
        raise ImageError(
            f"{name}: image too large ({w}x{h} = {w * h} pixels > limit {limit}); downscale it or raise {MAX_PIXELS_ENV}"
        )


def _decode_pil(img: Image.Image, fp: io.BytesIO | Path | None, name: str, frame: int, limit: int) -> Image.Image:
    _seek(img, name, frame)
    _check_size(img, name, limit)  # from the header: nothing decoded yet
    wide = fp is not None and _low_byte_tiles(getattr(img, "tile", None)) is not None
    img.load()  # full decode now, so truncated/corrupt data fails here
    upright = _upright(img)
    if wide and fp is not None:
        upright = _with_low_bytes(upright, fp, name, frame)
    return _to_rgb(upright)


def _decode_dicom(fp: io.BytesIO | Path, name: str, frame: int, limit: int, notices: list[str]) -> Image.Image:
    from .dicom import read_dicom  # pydicom is imported only when a DICOM file arrives

    if isinstance(fp, Path):
        try:
            with open(fp, "rb") as f:
                d = read_dicom(f, name, frame=frame, max_pixels=limit)
        except OSError as e:
            raise ImageError(f"{name}: cannot be read ({e.strerror or e}); check its permissions") from None
    else:
        d = read_dicom(fp, name, frame=frame, max_pixels=limit)
    if d.burned_in_annotation:
        notices.append(
            f"{name}: the DICOM header says text is burned into the pixels (BurnedInAnnotation); "
            "patient details may be visible in the image and are seen by the model"
        )
    return _to_rgb(Image.fromarray(d.pixels))  # [H,W,3] -> RGB, [H,W] -> L -> RGB


def _decode(src: Any, name: str, frame: int, limit: int, notices: list[str]) -> Image.Image:
    if isinstance(src, Image.Image):
        return _decode_pil(src, None, name, frame, limit)
    fp, head = _read(src, name)
    if _is_dicom(head):
        return _decode_dicom(fp, name, frame, limit, notices)
    img = _open(fp, head, name)
    try:
        return _decode_pil(img, fp, name, frame, limit)
    finally:
        img.close()


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and what its loader noticed for the user (e.g. a DICOM header saying text is burned into the
    pixels): one-liners that never quote a header value, carried to the front end as data."""

    image: Image.Image  # 8-bit RGB
    notices: tuple[str, ...] = ()


def read_image(src: Any, max_pixels: int | None = None, *, frame: int | None = None) -> LoadedImage:
    """Open a path / bytes / PIL image / ImageSource as an 8-bit RGB PIL image and its notices (see module docstring).

    `frame` (default: the ImageSource's, else 0) picks a frame of a multi-frame image."""
    if isinstance(src, ImageSource):
        frame = src.frame if frame is None else frame
        src = src.src
    frame = _check_frame(0 if frame is None else frame)
    name = _describe(src)
    limit = max_pixels_from_env() if max_pixels is None else int(max_pixels)
    notices: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # e.g. "palette images with transparency ..."
        try:
            img = _decode(src, name, frame, limit, notices)
        except ImageError:
            raise
        except Image.DecompressionBombError:
            hard = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else "?"
            raise ImageError(
                f"{name}: image too large (over Pillow's hard limit of {hard} pixels); downscale it"
            ) from None
        except MemoryError:
            raise ImageError(f"{name}: not enough memory to decode the image; downscale it") from None
        except _PIL_ERRORS as e:
            detail = " ".join(str(e).split()) or type(e).__name__
            raise ImageError(
                f"{name}: corrupt or truncated image ({detail}); re-export or copy the file again"
            ) from None
    return LoadedImage(img, tuple(notices))


def load_image(src: Any, max_pixels: int | None = None, *, frame: int | None = None) -> Image.Image:
    """`read_image` without its notices: the pixels only (for code that shows no notices to a user)."""
    return read_image(src, max_pixels, frame=frame).image


def expand_to_square(img: Image.Image, color: tuple[int, int, int]) -> Image.Image:
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
