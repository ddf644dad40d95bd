"""Image loading/preprocessing: pixel parity with LLaVA + transformers, and a reliability matrix."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from skin_offline.errors import ImageError
from skin_offline.manifest import PadMode, PreprocessConfig
from skin_offline.runtime.image import (
    MAX_PIXELS_ENV,
    expand_to_square,
    load_image,
    preprocess,
)

TOL = 1e-5


# ---------------------------------------------------------------- reference (LLaVA + transformers)


def expand2square(pil_img, background_color):
    """Copied from LLaVA (llava/mm_utils.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


_processors: dict = {}


def reference(path_or_img, cfg: PreprocessConfig) -> np.ndarray:
    """LLaVA: Image.open(f).convert('RGB') [+ expand2square] + CLIPImageProcessor (PIL backend)."""
    transformers = pytest.importorskip("transformers")
    key = (cfg.size, cfg.crop_size)
    if key not in _processors:
        # CLIPImageProcessor resolves to CLIPImageProcessorPil without torchvision; name it directly
        # so an installed torchvision (different resize kernel) cannot silently change the reference.
        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        proc = cls(
            size={"shortest_edge": cfg.size},
            crop_size={"height": cfg.crop_size, "width": cfg.crop_size},
            image_mean=list(cfg.mean),
            image_std=list(cfg.std),
        )
        assert getattr(proc, "backend", "pil") == "pil"
        _processors[key] = proc
    img = path_or_img if isinstance(path_or_img, Image.Image) else Image.open(path_or_img).convert("RGB")
    if cfg.mode is PadMode.PAD:
        img = expand2square(img, tuple(int(x * 255) for x in _processors[key].image_mean))
    return _processors[key](images=img, return_tensors="np")["pixel_values"]


def random_image(w: int, h: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7 * w + 13 * h)
    rgba = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    if mode == "P":
        img = Image.frombytes("P", (w, h), rgba[..., 0].tobytes())
        img.putpalette(rng.integers(0, 256, size=768, dtype=np.uint8).tolist())
        return img
    if mode == "CMYK":
        return Image.frombytes("CMYK", (w, h), rgba.tobytes())
    bands = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = np.ascontiguousarray(rgba[..., :bands])
    return Image.frombytes(mode, (w, h), arr.tobytes())


def save(img: Image.Image, path, fmt: str = "PNG", **kw):
    img.save(path, fmt, **kw)
    return path


CONFIGS = [(336, 336), (224, 224), (56, 56), (48, 64), (64, 48)]  # (shortest edge, crop)
SIZES = [(1, 1), (7, 333), (333, 7), (513, 211), (211, 513), (336, 336), (1000, 999)]


# ---------------------------------------------------------------- pixel parity


@pytest.mark.parametrize("mode", [PadMode.PAD, PadMode.CROP])
@pytest.mark.parametrize("size,crop", CONFIGS)
@pytest.mark.parametrize("wh", SIZES, ids=lambda wh: f"{wh[0]}x{wh[1]}")
def test_parity_rgb(tmp_path, wh, size, crop, mode):
    cfg = PreprocessConfig(mode=mode, size=size, crop_size=crop)
    path = save(random_image(*wh, "RGB"), tmp_path / "x.png")
    ours = preprocess(load_image(path), cfg)
    ref = reference(path, cfg)
    assert ours.dtype == np.float32 and ours.shape == (1, 3, crop, crop) == ref.shape
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("mode", [PadMode.PAD, PadMode.CROP])
@pytest.mark.parametrize("size", [336, 56])
@pytest.mark.parametrize("wh", [(7, 333), (513, 211), (1, 1)], ids=lambda wh: f"{wh[0]}x{wh[1]}")
@pytest.mark.parametrize("pil_mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_parity_modes(tmp_path, pil_mode, wh, size, mode):
    cfg = PreprocessConfig(mode=mode, size=size, crop_size=size)
    img = random_image(*wh, pil_mode)
    path = save(img, tmp_path / "x.jpg", "JPEG") if pil_mode == "CMYK" else save(img, tmp_path / "x.png")
    ours = preprocess(load_image(path), cfg)
    assert np.abs(ours - reference(path, cfg)).max() <= TOL
    assert np.array_equal(preprocess(load_image(path.read_bytes()), cfg), ours)  # bytes: same route
    if pil_mode != "CMYK":  # PNG is lossless, so the in-memory image must give the same result
        assert np.array_equal(preprocess(load_image(img), cfg), ours)


def test_transparency_key_ignored_like_llava(tmp_path):
    """An RGB PNG with a tRNS colour key: LLaVA's convert('RGB') ignores it; transformers 5 would composite
    the keyed pixels onto white if the 'transparency' info survived. We drop it, so both agree."""
    rgb = random_image(40, 30, "RGB")
    key = tuple(int(v) for v in np.asarray(rgb)[0, 0])
    path = save(rgb, tmp_path / "k.png", transparency=key)
    cfg = PreprocessConfig(mode=PadMode.CROP, size=56, crop_size=56)
    loaded = load_image(path)
    assert "transparency" not in loaded.info
    plain = np.asarray(Image.open(path).convert("RGB"))  # pixels only: no transparency semantics
    assert np.abs(preprocess(loaded, cfg) - reference(Image.fromarray(plain), cfg)).max() <= TOL


def test_expand_to_square_matches_llava():
    for wh in [(5, 2), (2, 5), (4, 4), (1, 9)]:
        img = random_image(*wh, "RGB")
        assert np.array_equal(
            np.asarray(expand_to_square(img, (122, 116, 104))), np.asarray(expand2square(img, (122, 116, 104)))
        )
    assert PreprocessConfig().pad_color == (122, 116, 104)


# ---------------------------------------------------------------- reliability matrix


def _jpeg(path, img=None, **kw):
    (img or random_image(64, 48, "RGB")).save(path, "JPEG", **kw)
    return path


def _truncate(path, frac=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * frac)])
    return path


def _png16(path):
    a = np.array([[0, 257, 32896], [65535, 1000, 65280]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    img.save(path, "PNG")
    return path


def _exif_jpeg(orientation):
    def make(path):
        a = np.zeros((20, 40, 3), np.uint8)
        a[:, :20] = (255, 0, 0)  # left half red
        a[:, 20:] = (0, 0, 255)  # right half blue
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(a).save(path, "JPEG", exif=exif, quality=95)
        return path

    return make


def _animated(fmt):
    def make(path):
        frames = [Image.new("RGB", (16, 12), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
        frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
        return path

    return make


def _png_header(w, h):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


_DICOM_PX = np.random.default_rng(3).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)


def _dicom(pixels: bool = True) -> bytes:
    import dicom_samples

    ds = dicom_samples.native(_DICOM_PX)
    if not pixels:
        del ds.PixelData
    return dicom_samples.write(ds)


def _bare_dicom() -> bytes:
    from pydicom import uid

    import dicom_samples

    return dicom_samples.write_bare(dicom_samples.native(_DICOM_PX, ts=uid.ImplicitVRLittleEndian))


def _heic() -> bytes:
    import pillow_heif  # the heif extra (installed by make)

    buf = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", (16, 12), (255, 0, 0))).save(buf, quality=-1)
    return buf.getvalue()


def _tiff16(path):
    import tifffile

    a = np.array([[0, 257, 32896], [65535, 1000, 65280]], dtype=np.uint16)
    tifffile.imwrite(path, np.stack([a, a, a], -1), photometric="rgb", compression="zlib")
    return path


def _mkdir(path):
    path.mkdir()
    return path


def _red(img):
    r, g, b = (int(v) for v in np.asarray(img).reshape(-1, 3).mean(0))
    return r > 200 and g < 60 and b < 60


def _check_16bit(img):
    assert img.mode == "RGB"
    assert np.asarray(img)[..., 0].tolist() == [[0, 1, 128], [255, 4, 254]]


def _check_rotated(top_red):
    def check(img):
        assert img.size == (20, 40)  # 40x20 landscape stored, EXIF says rotate: portrait out
        top, bottom = np.asarray(img)[:20], np.asarray(img)[20:]
        assert _red(top) == top_red and _red(bottom) != top_red

    return check


def _check_pixel(rgb):
    def check(img):
        assert img.mode == "RGB" and tuple(np.asarray(img)[0, 0]) == rgb

    return check


# name -> (builder(path) -> src, name of file, load kwargs, expected error substring or a check(img))
CASES = {
    "truncated_jpeg": (lambda p: _truncate(_jpeg(p)), "a.jpg", {}, "truncated"),
    "truncated_png": (lambda p: _truncate(save(random_image(64, 64, "RGB"), p)), "a.png", {}, "truncated"),
    "corrupt_bytes": (lambda p: p.write_bytes(bytes(range(256)) * 8) and p, "a.jpg", {}, "not a recognised image"),
    "corrupt_jpeg_body": (
        lambda p: p.write_bytes(_jpeg(p).read_bytes()[:200] + b"\x00" * 50) and p,
        "a.jpg",
        {},
        "corrupt or truncated",
    ),
    "zero_byte": (lambda p: p.write_bytes(b"") is not None and p, "a.jpg", {}, "empty file"),
    "text_as_jpg": (
        lambda p: p.write_text("hello, this is not a picture\n") and p,
        "a.jpg",
        {},
        "not a recognised image",
    ),
    "heic": (
        lambda p: p.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 100) and p,
        "a.heic",
        {},
        "HEIC/HEIF",
    ),
    "svg": (
        lambda p: p.write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>') and p,
        "a.svg",
        {},
        "SVG",
    ),
    "pdf": (lambda p: p.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n") and p, "a.pdf", {}, "PDF"),
    "over_max_pixels": (lambda p: save(random_image(100, 60, "RGB"), p), "a.png", {"max_pixels": 5000}, "too large"),
    "bomb_header": (lambda p: p.write_bytes(_png_header(100_000, 100_000)) and p, "a.png", {}, "too large"),
    "bomb_header_default_limit": (lambda p: p.write_bytes(_png_header(11_000, 10_000)) and p, "a.png", {}, "too large"),
    "one_by_one": (lambda p: save(Image.new("RGB", (1, 1), (9, 8, 7)), p), "a.png", {}, _check_pixel((9, 8, 7))),
    "png_16bit": (_png16, "a.png", {}, _check_16bit),
    "cmyk_jpeg": (
        lambda p: _jpeg(p, Image.new("CMYK", (8, 8), (0, 255, 255, 0))),
        "a.jpg",
        {},
        lambda im: _red(im) and im.mode == "RGB",
    ),
    "palette_png": (
        lambda p: save(Image.new("RGB", (8, 8), (255, 0, 0)).convert("P"), p),
        "a.png",
        {},
        _check_pixel((255, 0, 0)),
    ),
    "la_png": (lambda p: save(Image.new("LA", (8, 8), (200, 0)), p), "a.png", {}, _check_pixel((200, 200, 200))),
    "rgba_png_alpha_dropped": (
        lambda p: save(Image.new("RGBA", (8, 8), (10, 20, 30, 0)), p),
        "a.png",
        {},
        _check_pixel((10, 20, 30)),
    ),
    "animated_gif_first_frame": (_animated("GIF"), "a.gif", {}, _red),
    "animated_webp_first_frame": (_animated("WEBP"), "a.webp", {}, _red),
    "apng_first_frame": (_animated("PNG"), "a.png", {}, _red),
    "exif_orientation_6": (_exif_jpeg(6), "a.jpg", {}, _check_rotated(top_red=True)),
    "exif_orientation_8": (_exif_jpeg(8), "a.jpg", {}, _check_rotated(top_red=False)),
    "dicom_no_extension": (lambda p: _write(p, _dicom()), "IM000001", {}, _check_pixel(tuple(_DICOM_PX[0, 0]))),
    "dicom_no_pixel_data": (lambda p: _write(p, _dicom(pixels=False)), "IM000002", {}, "has no pixel data"),
    "dicom_without_file_header": (lambda p: _write(p, _bare_dicom()), "IM000003", {}, "without its file header"),
    "dicom_over_max_pixels": (lambda p: _write(p, _dicom()), "a.dcm", {"max_pixels": 100}, "too large"),
    "heic_photo": (lambda p: _write(p, _heic()), "IMG_0001.HEIC", {}, _red),
    "avif_photo": (lambda p: save(Image.new("RGB", (16, 12), (255, 0, 0)), p, "AVIF"), "a.avif", {}, _red),
    "tiff_16bit_rgb": (_tiff16, "a.tif", {}, _check_16bit),
    "directory": (_mkdir, "folder.jpg", {}, "is a directory"),
    "missing": (lambda p: p, "missing.jpg", {}, "no such file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reliability(tmp_path, case):
    build, filename, kwargs, expect = CASES[case]
    src = build(tmp_path / filename)
    if isinstance(expect, str):
        with pytest.raises(ImageError) as info:
            load_image(src, **kwargs)
        msg = str(info.value)
        assert "\n" not in msg and expect in msg and filename in msg, msg
        assert info.value.exit_code == 3
        err = info.value  # no chained PIL traceback (raised directly or `from None`)
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    else:
        img = load_image(src, **kwargs)
        assert img.mode == "RGB"
        assert expect(img) is not False
        x = preprocess(load_image(src, **kwargs), PreprocessConfig(size=56, crop_size=56))
        assert x.shape == (1, 3, 56, 56) and np.isfinite(x).all()


def test_max_pixels_env(tmp_path, monkeypatch):
    path = save(random_image(100, 60, "RGB"), tmp_path / "a.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    with pytest.raises(ImageError, match="too large"):
        load_image(path)
    assert load_image(path, max_pixels=6000).size == (100, 60)  # argument wins over env
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ImageError, match=MAX_PIXELS_ENV):
        load_image(path)


def test_bytes_and_pil_sources():
    buf = io.BytesIO()
    random_image(30, 20, "RGBA").save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (30, 20)
    with pytest.raises(ImageError, match="empty image data"):
        load_image(b"")
    with pytest.raises(ImageError, match="not a recognised image") as info:
        load_image(b"\x00" * 40)
    assert "<image bytes>" in str(info.value)
    truncated = Image.open(io.BytesIO(buf.getvalue()[:200]))  # lazily opened PIL image
    with pytest.raises(ImageError, match="truncated"):
        load_image(truncated)
    with pytest.raises(ImageError, match="unsupported image source"):
        load_image(12345)


# ---------------------------------------------------------------- fuzz


def _valid(fmt: str) -> bytes:
    buf = io.BytesIO()
    random_image(24, 16, "RGB").save(buf, fmt)
    return buf.getvalue()


SEEDS = [_valid(fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=512), mutated()))
def test_fuzz_only_image_error(data):
    try:
        img = load_image(data, max_pixels=4_000_000)
    except ImageError as e:
        assert "\n" not in str(e)
    else:
        assert img.mode == "RGB"
