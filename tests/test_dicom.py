"""DICOM through the one image loader: every transfer syntax and photometric interpretation we accept, multi-frame,
broken files, and patient data that never leaves (messages, warnings, pydicom's logger, exception chains).

Files are generated here with pydicom (and Pillow / GDCM / imagecodecs for codestreams pydicom cannot write);
expected pixels come from the array written, or, for lossy codecs, from an independent decode of the same codestream.
The CLI side (exit codes, stdout/stderr of every command, token parity with PNG) is in test_image_formats.py."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid

from skin_offline.errors import ImageError
from skin_offline.runtime.image import ImageSource, load_image, read_image

import dicom_samples as S

RGB = S.rgb_pixels()  # [32, 48, 3]


def load(data: bytes, **kw) -> np.ndarray:
    return np.asarray(load_image(data, **kw))


def grey_case(bits: int, photometric: str = "MONOCHROME2", **kw):
    g = S.grey_pixels(bits=bits)
    top = (1 << bits) - 1
    shown = g.astype(np.int64) if photometric == "MONOCHROME2" else top - g.astype(np.int64)
    return g, S.grey_rgb(S.scale_to_8(shown, bits))


# ---------------------------------------------------------------- lossless: exact pixels


def _native(ts, arr=RGB, **kw):
    return S.write(S.native(arr, ts=ts, **kw))


def _grey_native(bits, photometric, ts=uid.ExplicitVRLittleEndian):
    g, _ = grey_case(bits, photometric)
    return S.write(S.native(g, photometric=photometric, bits_stored=bits, ts=ts))


def _compressed(ts, arr=RGB, **kw):
    return S.write(S.compressed(S.native(arr, **kw), ts))


def _gdcm(ts, arr=RGB, **kw):
    return S.gdcm_compress(S.write(S.native(arr, sop_class=S.VL_PHOTO, **kw)), ts)


def _j2k_pillow_rct():
    return S.write(S.encapsulated(S.native(RGB), [S.pillow_j2k(RGB, lossless=True)], uid.JPEG2000Lossless, "YBR_RCT"))


def _htj2k(ts, arr=RGB, photometric="RGB", bits=8):
    return S.write(S.encapsulated(S.native(arr, photometric=photometric, bits_stored=bits), [S.htj2k(arr)], ts))


def _signed_grey():
    g = S.grey_pixels(bits=12).astype(np.int16) - 2048  # [-2048, 2047]
    ds = S.native(g.astype(np.uint16), photometric="MONOCHROME2", bits_stored=12)
    ds.PixelRepresentation = 1
    ds.PixelData = g.astype("<i2").tobytes()
    return S.write(ds), S.grey_rgb(S.scale_to_8(g.astype(np.int64) + 2048, 12))


def _one_bit():
    bits = (S.grey_pixels(bits=1) & 1).astype(np.uint8)  # [24, 40] of 0/1
    ds = S.native(bits, photometric="MONOCHROME2", bits_stored=1)
    ds.BitsAllocated = 1
    ds.PixelData = pydicom.pixels.pack_bits(bits)
    return S.write(ds), S.grey_rgb(bits * 255)


def _palette(bits):
    lut, desc = S.palette_lut(bits=bits)
    if bits == 8:
        lut = lut.astype(np.uint16)
    idx = (np.arange(24 * 40) * 7 % 256).astype(np.uint8).reshape(24, 40)
    ds = S.with_palette(S.native(idx, photometric="PALETTE COLOR", sop_class=S.VL_PHOTO), lut, desc)
    return S.write(ds), (lut[idx] if bits == 8 else S.scale_to_8(lut[idx], 16)).astype(np.uint8)


def _ybr_full_native():
    ybr = S.rgb_to_ybr_full(RGB)
    return S.write(S.native(ybr, photometric="YBR_FULL")), S.ybr_full_to_rgb(ybr)


def _ybr_422_native():
    packed, full = S.ybr_422_bytes(S.rgb_to_ybr_full(RGB))
    ds = S.native(RGB, photometric="YBR_FULL_422")
    ds.PixelData = packed
    return S.write(ds), S.ybr_full_to_rgb(full)


GREY_BITS = [(8, "MONOCHROME2"), (10, "MONOCHROME2"), (12, "MONOCHROME1"), (16, "MONOCHROME2"), (16, "MONOCHROME1")]

# name -> builder() -> (file bytes, expected [H, W, 3] uint8, max abs difference allowed)
EXACT = {
    **{
        f"{ts.name}-rgb": (lambda ts=ts: (_native(ts), RGB, 0))
        for ts in (
            uid.ImplicitVRLittleEndian,
            uid.ExplicitVRLittleEndian,
            uid.DeflatedExplicitVRLittleEndian,
            uid.ExplicitVRBigEndian,
        )
    },
    **{
        f"{ts.name}-{pi}-{b}bit": (lambda ts=ts, b=b, pi=pi: (_grey_native(b, pi, ts), grey_case(b, pi)[1], 0))
        for ts in (uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian, uid.ExplicitVRBigEndian)
        for b, pi in GREY_BITS
    },
    "planar-rgb": (lambda: (_native(uid.ExplicitVRLittleEndian, planar=1), RGB, 0)),
    "rle-rgb": (lambda: (_compressed(uid.RLELossless), RGB, 0)),
    **{
        f"rle-{pi}-{b}bit": (
            lambda b=b, pi=pi: (
                S.write(S.compressed(S.native(grey_case(b, pi)[0], photometric=pi, bits_stored=b), uid.RLELossless)),
                grey_case(b, pi)[1],
                0,
            )
        )
        for b, pi in GREY_BITS
    },
    "jpegls-lossless-rgb": (lambda: (_compressed(uid.JPEGLSLossless), RGB, 0)),
    "jpegls-lossless-12bit": (
        lambda: (
            S.write(
                S.compressed(S.native(grey_case(12)[0], photometric="MONOCHROME2", bits_stored=12), uid.JPEGLSLossless)
            ),
            grey_case(12)[1],
            0,
        )
    ),
    "j2k-lossless-rgb": (lambda: (_compressed(uid.JPEG2000Lossless), RGB, 0)),
    "j2k-lossless-YBR_RCT": (lambda: (_j2k_pillow_rct(), RGB, 0)),
    "j2k-lossless-16bit-MONOCHROME1": (
        lambda: (
            S.write(
                S.compressed(S.native(grey_case(16, "MONOCHROME1")[0], photometric="MONOCHROME1"), uid.JPEG2000Lossless)
            ),
            grey_case(16, "MONOCHROME1")[1],
            0,
        )
    ),
    "jpeg-lossless-sv1-rgb": (lambda: (_gdcm(uid.JPEGLosslessSV1), RGB, 0)),
    "jpeg-lossless-p14-12bit": (
        lambda: (
            _gdcm(uid.JPEGLossless, grey_case(12)[0], photometric="MONOCHROME2", bits_stored=12),
            grey_case(12)[1],
            0,
        )
    ),
    "jpeg-lossless-sv1-16bit-MONOCHROME1": (
        lambda: (
            _gdcm(uid.JPEGLosslessSV1, grey_case(16, "MONOCHROME1")[0], photometric="MONOCHROME1"),
            grey_case(16, "MONOCHROME1")[1],
            0,
        )
    ),
    "htj2k-lossless-rgb": (lambda: (_htj2k(uid.HTJ2KLossless), RGB, 0)),
    "htj2k-rpcl-12bit": (
        lambda: (_htj2k(uid.HTJ2KLosslessRPCL, grey_case(12)[0], "MONOCHROME2", 12), grey_case(12)[1], 0)
    ),
    "signed-12bit": (lambda: (*_signed_grey(), 0)),
    "one-bit": (lambda: (*_one_bit(), 0)),
    "palette-16bit-lut": (lambda: (*_palette(16), 0)),
    "palette-8bit-lut": (lambda: (*_palette(8), 0)),
    # colour transforms: the reference is the standard's equations; 1 level of rounding either way
    "YBR_FULL-native": (lambda: (*_ybr_full_native(), 1)),
    "YBR_FULL_422-native": (lambda: (*_ybr_422_native(), 1)),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_lossless_pixels(case, tmp_path):
    data, expected, tol = EXACT[case]()
    got = load(data)
    assert got.dtype == np.uint8 and got.shape == expected.shape, (got.shape, expected.shape)
    assert int(np.abs(got.astype(np.int64) - expected).max()) <= tol
    path = tmp_path / "IM000001"  # a PACS export: no extension; recognised by content
    path.write_bytes(data)
    assert np.array_equal(np.asarray(load_image(path)), got)


def test_scaling_matches_the_16bit_png_path(tmp_path):
    """BitsStored 16 is scaled exactly like a 16-bit PNG (round(v / 257)); values chosen where truncation differs."""
    a = np.array([[0, 257, 32896, 65535, 1000, 65280, 0x80FF, 384]], dtype=np.uint16)
    dicom = load(S.write(S.native(a, photometric="MONOCHROME2")))
    Image.fromarray(a).save(tmp_path / "a.png")
    assert np.array_equal(dicom, np.asarray(load_image(tmp_path / "a.png")))
    assert dicom[0, :, 0].tolist() == [0, 1, 128, 255, 4, 254, 128, 1]


# ---------------------------------------------------------------- lossy: within the codec's error, converted once


def _pillow_rgb(codestream: bytes) -> np.ndarray:
    """libjpeg's / OpenJPEG's own RGB decode of the codestream (an independent decoder path)."""
    return np.asarray(Image.open(io.BytesIO(codestream)).convert("RGB"))


@pytest.mark.parametrize(
    "photometric,subsampling,keep_rgb",
    [
        ("YBR_FULL_422", 1, False),  # 4:2:2, the standard's label for JPEG baseline colour
        ("YBR_FULL", 0, False),  # 4:4:4
        ("RGB", 0, True),  # RGB components (Adobe marker, no colour transform)
        ("RGB", 1, False),  # mislabelled: a JFIF (YCbCr) stream labelled RGB, as some writers do
    ],
)
def test_jpeg_baseline_colour_converted_once(photometric, subsampling, keep_rgb):
    jpeg = S.pillow_jpeg(RGB, subsampling, keep_rgb=keep_rgb)
    got = load(S.write(S.encapsulated(S.native(RGB), [jpeg], uid.JPEGBaseline8Bit, photometric))).astype(np.int64)
    ref = _pillow_rgb(jpeg).astype(np.int64)
    # pydicom converts libjpeg's YCbCr with the standard's float equations; libjpeg uses fixed point: 1-2 levels.
    # Converting twice (or not at all) is off by tens of levels.
    assert np.abs(got - ref).max() <= 2
    err = np.abs(got - RGB)
    assert err.mean() < 4 and np.abs(ref - RGB).mean() < 4  # quality 95: within JPEG error of the source


def test_jpeg_baseline_grey():
    g = S.grey_pixels(bits=8)
    jpeg = S.pillow_jpeg(g, 0)
    got = load(S.write(S.encapsulated(S.native(g, photometric="MONOCHROME2"), [jpeg], uid.JPEGBaseline8Bit)))
    assert np.array_equal(got, S.grey_rgb(np.asarray(Image.open(io.BytesIO(jpeg)))))


def test_j2k_lossy_YBR_ICT():
    c = S.pillow_j2k(RGB, lossless=False)
    got = load(S.write(S.encapsulated(S.native(RGB), [c], uid.JPEG2000, "YBR_ICT"))).astype(np.int64)
    assert (
        np.abs(got - _pillow_rgb(c)).max() == 0
    )  # the same decoder (OpenJPEG in Pillow) returns RGB: no 2nd transform
    assert np.abs(got - RGB).mean() < 8


def test_jpegls_near_lossless_within_its_bound():
    got = load(S.write(S.compressed(S.native(RGB), uid.JPEGLSNearLossless, jls_error=3))).astype(np.int64)
    assert np.abs(got - RGB).max() <= 3  # JPEG-LS NEAR = 3 bounds every sample's error


# ---------------------------------------------------------------- multi-frame


def _frames():
    return np.stack([RGB, 255 - RGB, RGB[::-1].copy()])


@pytest.mark.parametrize("kind", ["native", "rle", "jpeg"])
def test_multiframe_first_by_default_and_frame_k(kind):
    frames = _frames()
    if kind == "jpeg":
        streams = [S.pillow_jpeg(f, 0, quality=100) for f in frames]
        data = S.write(S.encapsulated(S.native(frames, frames=3), streams, uid.JPEGBaseline8Bit, "YBR_FULL"))
        expected = [_pillow_rgb(s) for s in streams]
        tol = 2
    else:
        ds = S.native(frames, frames=3)
        data = S.write(S.compressed(ds, uid.RLELossless) if kind == "rle" else ds)
        expected, tol = list(frames), 0
    assert np.abs(load(data).astype(np.int64) - expected[0]).max() <= tol
    for k in range(3):
        for got in (load(data, frame=k), np.asarray(load_image(ImageSource(data, frame=k)))):
            assert np.abs(got.astype(np.int64) - expected[k]).max() <= tol, k
    with pytest.raises(ImageError, match="frame 3 does not exist: the image has 3 frame"):
        load_image(data, frame=3)


def test_frame_argument_validation_and_other_formats():
    with pytest.raises(ImageError, match="frame must be a whole number"):
        ImageSource(b"x", frame=-1)
    with pytest.raises(ImageError, match="frame must be a whole number"):
        load_image(b"x", frame=1.5)
    buf = io.BytesIO()  # a multi-page TIFF: the same frame option
    Image.fromarray(RGB).save(buf, "TIFF", save_all=True, append_images=[Image.fromarray(255 - RGB)])
    assert np.array_equal(load(buf.getvalue(), frame=1), 255 - RGB)
    assert np.array_equal(np.asarray(load_image(ImageSource(buf.getvalue(), 0))), RGB)
    with pytest.raises(ImageError, match="frame 2 does not exist: the image has 2 frame"):
        load_image(buf.getvalue(), frame=2)


# ---------------------------------------------------------------- broken and unsupported files


def _without_pixels():
    ds = S.native(RGB)
    del ds.PixelData
    return S.write(ds)


def _with_ts(ts):
    ds = S.native(RGB)
    ds.file_meta.TransferSyntaxUID = ts
    return S.write(ds)


def _encapsulated(ts, streams=(b"\x00" * 64,), **kw):
    return S.write(S.encapsulated(S.native(RGB, **kw), list(streams), ts))


def _header_claims(**attrs) -> bytes:
    return S.write(S.with_attrs(S.native(RGB), **attrs))


def _jpeg_size_mismatch():
    ds = S.encapsulated(S.native(RGB), [S.pillow_jpeg(RGB, 1)], uid.JPEGBaseline8Bit, "YBR_FULL_422")
    ds.Rows = 8  # the codestream says 48x32
    return S.write(ds)


_RLE = _compressed(uid.RLELossless)
_NATIVE = _native(uid.ExplicitVRLittleEndian)
_JPEG = _encapsulated(uid.JPEGBaseline8Bit, [S.pillow_jpeg(RGB, 1)])

# name -> (file bytes, expected substring of the one-line error)
BROKEN = {
    "no_pixel_data": (_without_pixels, "has no pixel data"),
    "header_only": (lambda: _NATIVE[:132], "corrupt file meta"),  # preamble + DICM and nothing else
    "truncated_in_header": (lambda: _NATIVE[:400], "no pixel data"),
    "truncated_native_pixels": (lambda: _NATIVE[:-100], "truncated"),
    "truncated_rle_pixels": (lambda: _RLE[:-100], "truncated"),
    "truncated_jpeg_pixels": (lambda: _JPEG[: len(_JPEG) - 300], "truncated"),
    "truncated_jpegls_pixels": (
        lambda: _compressed(uid.JPEGLSLossless)[:-200],
        "truncated",
    ),  # CharLS: 10 s if let through
    "truncated_j2k_pixels": (lambda: _compressed(uid.JPEG2000Lossless)[:-200], "truncated"),
    "corrupt_jpeg_stream": (
        lambda: _encapsulated(uid.JPEGBaseline8Bit, [b"\xff\xd8" + b"\x00" * 300 + b"\xff\xd9"]),
        "corrupt",
    ),
    "garbage_after_magic": (lambda: b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4, "corrupt"),
    "not_dicom": (lambda: bytes(range(256)) * 8, "not a recognised image"),
    "bare_dataset": (lambda: S.write_bare(S.native(RGB, ts=uid.ImplicitVRLittleEndian)), "without its file header"),
    "unknown_ts": (lambda: _with_ts("1.2.3.4.5.6"), "unknown transfer syntax 1.2.3.4.5.6"),
    "garbage_ts": (lambda: _with_ts(S.PATIENT["PatientID"]), "unrecognised transfer syntax"),
    "mpeg2_video": (lambda: _encapsulated(uid.MPEG2MPML), "video (MPEG2 Main Profile / Main Level)"),
    "h264_video": (lambda: _encapsulated(uid.MPEG4HP41), "video (MPEG-4 AVC/H.264"),
    "hevc_video": (lambda: _encapsulated(uid.HEVCMP51), "video (HEVC/H.265"),
    "jpeg_extended_12bit": (
        lambda: S.write(
            S.encapsulated(
                S.native(grey_case(12)[0], photometric="MONOCHROME2", bits_stored=12),
                [b"\xff\xd8"],
                uid.JPEGExtended12Bit,
            )
        ),
        "12-bit JPEG Extended",
    ),
    "photometric_quotes_a_name": (
        lambda: _header_claims(PhotometricInterpretation="QWERTYUIOP^ZANZ"),
        "unsupported photometric interpretation",
    ),
    "ybr_partial": (lambda: _header_claims(PhotometricInterpretation="YBR_PARTIAL_420"), "unsupported photometric"),
    "samples_mismatch": (lambda: _header_claims(SamplesPerPixel=1), "corrupt DICOM image description"),
    "bits_32": (lambda: _header_claims(BitsAllocated=32, BitsStored=32, HighBit=31), "32 of 32 bits"),
    "rows_not_a_number": (lambda: _header_claims(Rows=0), "corrupt DICOM image description"),
    "codestream_size_mismatch": (_jpeg_size_mismatch, "declares 48x32 but the header says 48x8"),
    "more_rows_than_pixels": (lambda: _header_claims(Rows=64), "truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_files_one_line_without_patient_data(case, tmp_path):
    build, expect = BROKEN[case]
    path = tmp_path / "IM000001"
    path.write_bytes(build())
    for src, name in ((path, str(path)), (path.read_bytes(), "<image bytes>")):
        with pytest.raises(ImageError) as info:
            load_image(src)
        err = info.value
        msg = str(err)
        assert "\n" not in msg and expect.lower() in msg.lower() and msg.startswith(name), msg
        assert err.exit_code == 3
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
        _assert_no_secret(msg, repr(err.args), *_chain(err))


def _chain(err: BaseException) -> list[str]:
    """Every exception reachable from `err` (cause and context, even suppressed): none may quote a header value."""
    out, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        out.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return out


def _assert_no_secret(*texts: str) -> None:
    for t in texts:
        for s in S.SECRETS:
            assert s.lower() not in t.lower(), (s, t)


def test_pixel_limit_applies_before_decoding():
    ds = S.native(RGB)
    ds.Rows, ds.Columns = 20000, 20000  # 400 MP claimed; the pixel data is 4.6 KB, so decoding would say truncated
    with pytest.raises(ImageError, match=r"too large \(20000x20000 = 400000000 pixels > limit"):
        load_image(S.write(ds))
    with pytest.raises(ImageError, match="too large"):
        load_image(_NATIVE, max_pixels=1000)
    assert load(_NATIVE, max_pixels=48 * 32).shape == (32, 48, 3)


def test_deflate_bomb_refused_before_pydicom_inflates_it(monkeypatch):
    """pydicom inflates a deflated data set whole, into memory, before any tag is checked. A small file that
    inflates past what the pixel limit allows is refused by our streamed count, and pydicom never reads it."""
    from skin_offline.runtime.dicom import inflated_size_cap

    ds = S.native(RGB, ts=uid.DeflatedExplicitVRLittleEndian)
    ds.add_new(0x00090010, "LO", "SKIN OFFLINE TEST")
    ds.add_new(0x00091010, "OB", bytes(4 << 20))  # 4 MiB of zeros: deflates to a few KB
    data = S.write(ds)
    assert len(data) < 64_000
    limit = 48 * 32
    assert inflated_size_cap(limit) < 4 << 20 < inflated_size_cap(10**6)

    def no_pydicom(*a, **k):
        raise AssertionError("pydicom read a deflate bomb")

    with monkeypatch.context() as m:
        m.setattr(pydicom, "dcmread", no_pydicom)
        with pytest.raises(ImageError, match="deflated DICOM data set inflates to more than 1 MiB") as e:
            load_image(data, max_pixels=limit)
    assert "\n" not in str(e.value)
    # the refusal is the size, not the file: under a limit that admits 4 MiB it reads exactly
    assert np.array_equal(load(data, max_pixels=10**6), RGB)
    # a corrupt deflate stream is one line too
    with pytest.raises(ImageError, match="corrupt"):
        load_image(data[:-2000] + bytes(range(256)) * 8)


# ---------------------------------------------------------------- optional decoders missing


def test_missing_codec_names_the_extra(monkeypatch):
    """As without the dicom-codecs extra: pydicom reports no plugin for these syntaxes (a subprocess with the real
    packages hidden is in test_image_formats.py)."""
    from pydicom.pixels import get_decoder

    cases = {
        uid.JPEGLSLossless: _compressed(uid.JPEGLSLossless),
        uid.JPEGLosslessSV1: _gdcm(uid.JPEGLosslessSV1),
        uid.HTJ2KLossless: _htj2k(uid.HTJ2KLossless),
    }
    for ts, data in cases.items():
        dec = get_decoder(ts)
        monkeypatch.setattr(type(dec), "available_plugins", property(lambda self: ()))
        with pytest.raises(
            ImageError, match=r"needs an optional decoder; install it with pip install 'skin-offline\[dicom-codecs\]'"
        ):
            load_image(data)
        monkeypatch.undo()
        assert load(data).shape == (32, 48, 3)


# ---------------------------------------------------------------- patient data: warnings, logs, burned-in notice


def test_nothing_logged_or_warned_even_with_pydicom_debug(caplog, capfd):
    """With pydicom's debug logging on, reading a header logs every element with a preview of its value (the control
    below finds planted data in it); our reads log nothing and warn nothing; the burned-in notice is data."""
    files = [
        S.write(S.native(RGB, BurnedInAnnotation="YES")),
        _compressed(uid.RLELossless),
        _jpeg_size_mismatch(),
        _without_pixels(),
        _NATIVE[:-100],
        _header_claims(PhotometricInterpretation="QWERTYUIOP"),
    ]
    pydicom.config.debug(True)
    try:
        with caplog.at_level(logging.DEBUG):
            pydicom.dcmread(io.BytesIO(files[0]))  # control: plain pydicom, debug on
            control = caplog.text + capfd.readouterr().err
            assert any(secret in control for secret in S.SECRETS), control
            caplog.clear()
            notices = []
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                for data in files:
                    try:
                        notices += read_image(data).notices
                    except ImageError as e:
                        _assert_no_secret(str(e))
    finally:
        pydicom.config.debug(False)
    out = capfd.readouterr()
    assert caplog.records == [], caplog.text
    _assert_no_secret(out.out, out.err, caplog.text)
    assert seen == []
    assert len(notices) == 1 and "burned into the pixels" in notices[0]
    _assert_no_secret(*notices)


def test_burned_in_annotation_is_a_notice_not_a_refusal():
    data = S.write(S.native(RGB, BurnedInAnnotation="YES"))
    got = read_image(data)
    assert np.array_equal(np.asarray(got.image), RGB)
    assert len(got.notices) == 1 and "burned into the pixels" in got.notices[0] and "\n" not in got.notices[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never a Python warning; BurnedInAnnotation NO or absent: no notice at all
        assert read_image(S.write(S.native(RGB, BurnedInAnnotation="NO"))).notices == ()
        assert read_image(_NATIVE).notices == ()
        assert read_image(data).notices == got.notices


def test_reads_only_image_tags(monkeypatch):
    """The header pass asks pydicom for the Image Pixel tags only; patient elements are never even parsed."""
    seen = []
    real = pydicom.dcmread

    def spy(*a, **kw):
        ds = real(*a, **kw)
        seen.append(ds)
        return ds

    monkeypatch.setattr(pydicom, "dcmread", spy)
    load(S.write(S.native(RGB)))
    assert seen and all(
        "PatientName" not in ds and "PatientID" not in ds and "PatientBirthDate" not in ds for ds in seen
    )
    assert all(not any(el.tag.is_private for el in ds) for ds in seen)


# ---------------------------------------------------------------- fuzz: mutated DICOM files

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SEEDS = [
    _NATIVE,
    _RLE,
    _JPEG,
    _native(uid.DeflatedExplicitVRLittleEndian),
    _native(uid.ImplicitVRLittleEndian),
    S.write(S.native(np.stack([RGB, RGB]), frames=2)),
    _compressed(uid.JPEGLSLossless),
    _palette(16)[0],
    _gdcm(uid.JPEGLosslessSV1),
    _htj2k(uid.HTJ2KLossless),
    _j2k_pillow_rct(),
    _compressed(uid.JPEG2000Lossless),
]


@st.composite
def _mutated(draw):
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(128, len(data) - 1))  # keep the preamble + DICM: exercise the DICOM path
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(132, len(data)))]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated(), st.integers(0, 2))
def test_fuzz_dicom_only_one_line_errors_without_patient_data(data, frame):
    try:
        got = read_image(data, max_pixels=4_000_000, frame=frame)
    except ImageError as e:
        assert "\n" not in str(e)
        _assert_no_secret(*_chain(e))
    else:
        assert got.image.mode == "RGB"
        _assert_no_secret(*got.notices)
