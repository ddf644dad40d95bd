"""Phone and lab formats through the one image loader (HEIC via the optional pillow-heif, AVIF, JPEG 2000, tiled and
BigTIFF, 16-bit colour TIFF/PNG), then every new format at the real command line: DICOM and HEIC answered, patient
data in no stream of any command, each bad file one line and exit 3, lossless DICOM token-identical to the PNG.

Every file is generated here (Pillow, pillow-heif, tifffile, pydicom); nothing is downloaded."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import uid

from skin_offline.commands.options import RANDOM_WEIGHTS_WARNING
from skin_offline.errors import ImageError
from skin_offline.runtime.image import load_image

import dicom_samples as S

tifffile = pytest.importorskip("tifffile")  # a test dependency (make install); never the runtime's

RGB = S.rgb_pixels(64, 40)


def load(data, **kw) -> np.ndarray:
    return np.asarray(load_image(data, **kw))


def halves(w=40, h=20) -> np.ndarray:
    """Left half red, right half blue: which way an image was turned is visible from two pixels."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return a


def red(px) -> bool:
    return px[0] > 200 and px[2] < 60


def exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


# Where the red half ends up once the orientation is applied exactly once (applying it twice, or not at all,
# moves it): 6 = rotate 90 clockwise to display, 8 = 90 counter-clockwise, 3 = 180.
ORIENTED = {None: ((20, 40), "left"), 6: ((40, 20), "top"), 8: ((40, 20), "bottom"), 3: ((20, 40), "right")}


def check_orientation(img: np.ndarray, orientation) -> None:
    shape, side = ORIENTED[orientation]
    assert img.shape[:2] == shape, (img.shape, orientation)
    h, w = shape
    probe = {"left": img[h // 2, 2], "right": img[h // 2, w - 3], "top": img[2, w // 2], "bottom": img[h - 3, w // 2]}
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[side]
    assert red(probe[side]) and not red(probe[opposite]), (orientation, probe)


# ---------------------------------------------------------------- HEIC / HEIF (pillow-heif, the heif extra)

pillow_heif = pytest.importorskip("pillow_heif")  # make install puts the heif extra in the test environment


def heic(arr: np.ndarray, orientation=None, **kw) -> bytes:
    buf = io.BytesIO()
    extra = {"exif": exif(orientation)} if orientation else {}
    pillow_heif.from_pillow(Image.fromarray(arr)).save(buf, quality=-1, **extra, **kw)  # -1: lossless
    return buf.getvalue()


def test_heic_pixels():
    data = heic(RGB)
    assert data[4:12] == b"ftypheic"
    got = load(data)
    ref = np.asarray(pillow_heif.open_heif(io.BytesIO(data)).to_pillow().convert("RGB"))  # pillow-heif directly
    assert np.array_equal(got, ref)
    assert np.abs(got.astype(np.int64) - RGB).mean() < 8  # HEVC at "lossless" quality still subsamples chroma


@pytest.mark.parametrize("orientation", [None, 6, 8, 3])
def test_heic_exif_orientation_applied_exactly_once(orientation, tmp_path):
    data = heic(halves(), orientation)
    check_orientation(load(data), orientation)
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(data)
    check_orientation(np.asarray(load_image(path)), orientation)


def test_heif_image_sequence_frames():
    seq = pillow_heif.from_pillow(Image.fromarray(RGB))
    seq.add_from_pillow(Image.fromarray(255 - RGB))
    buf = io.BytesIO()
    seq.save(buf, quality=-1)
    data = buf.getvalue()
    ref = pillow_heif.open_heif(io.BytesIO(data))
    assert len(ref) == 2
    assert np.array_equal(load(data), np.asarray(ref[0].to_pillow().convert("RGB")))
    assert np.array_equal(load(data, frame=1), np.asarray(ref[1].to_pillow().convert("RGB")))
    assert np.abs(load(data, frame=1).astype(np.int64) - (255 - RGB)).mean() < 8
    with pytest.raises(ImageError, match="frame 2 does not exist: the image has 2 frame"):
        load_image(data, frame=2)


def test_truncated_heic_is_one_line():
    data = heic(RGB)
    with pytest.raises(ImageError) as info:
        load_image(data[: len(data) // 2])
    assert "\n" not in str(info.value) and "<image bytes>" in str(info.value)


def _run_python(code: str, tmp_path: Path, hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; each package in `hide` fails to import (as if not installed)."""
    env = dict(os.environ)
    if hide:
        stubs = tmp_path / "hidden"
        for name in hide:
            (stubs / name).mkdir(parents=True, exist_ok=True)
            (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} hidden by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(stubs), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )


def test_optional_modules_load_only_when_their_format_arrives(tmp_path):
    """A JPEG/PNG never imports pillow-heif (GPL-licensed wheels) or pydicom; a HEIC / a DICOM file does."""
    Image.fromarray(RGB).save(tmp_path / "a.jpg")
    (tmp_path / "a.heic").write_bytes(heic(RGB))
    (tmp_path / "IM000001").write_bytes(S.write(S.native(RGB)))
    r = _run_python(
        f"""
        import sys
        from skin_offline.runtime.image import load_image
        load_image({str(tmp_path / "a.jpg")!r})
        print('pillow_heif' in sys.modules, 'pydicom' in sys.modules)
        load_image({str(tmp_path / "a.heic")!r}); load_image({str(tmp_path / "IM000001")!r})
        print('pillow_heif' in sys.modules, 'pydicom' in sys.modules)
    """,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "True", "True"]


def test_heic_without_the_extra_names_it(tmp_path):
    (tmp_path / "IMG_0001.HEIC").write_bytes(heic(RGB))
    r = _run_python(
        f"""
        from skin_offline.errors import ImageError
        from skin_offline.runtime.image import load_image
        try:
            load_image({str(tmp_path / "IMG_0001.HEIC")!r})
        except ImageError as e:
            print(e)
    """,
        tmp_path,
        hide=("pillow_heif",),
    )
    assert r.returncode == 0, r.stderr
    assert "HEIC/HEIF photos need the optional heif extra: pip install 'skin-offline[heif]'" in r.stdout
    assert len(r.stdout.strip().splitlines()) == 1


# ---------------------------------------------------------------- AVIF, JPEG 2000, tiled / BigTIFF (Pillow)


def test_avif_read_natively():
    buf = io.BytesIO()
    Image.fromarray(RGB).save(buf, "AVIF", quality=100)
    assert buf.getvalue()[4:12] == b"ftypavif"
    got = load(buf.getvalue())
    assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    assert np.abs(got.astype(np.int64) - RGB).mean() < 8


@pytest.mark.parametrize("orientation", [6, 8])
def test_avif_orientation_applied_exactly_once(orientation):
    buf = io.BytesIO()
    Image.fromarray(halves()).save(buf, "AVIF", quality=100, exif=exif(orientation))
    check_orientation(load(buf.getvalue()), orientation)


@pytest.mark.parametrize(
    "fmt,kw", [("JPEG2000", {}), ("JPEG2000", {"no_jp2": True}), ("TIFF", {"tiffinfo": {}, "compression": "tiff_lzw"})]
)
def test_pillow_formats_lossless(fmt, kw):
    buf = io.BytesIO()
    Image.fromarray(RGB).save(buf, fmt, **kw)
    assert np.array_equal(load(buf.getvalue()), RGB)


@pytest.mark.parametrize(
    "kw", [{"tile": (16, 16)}, {"bigtiff": True}, {"bigtiff": True, "tile": (16, 16), "compression": "zlib"}]
)
def test_tiled_and_bigtiff_8bit(kw):
    buf = io.BytesIO()
    tifffile.imwrite(buf, RGB, photometric="rgb", **kw)
    assert np.array_equal(load(buf.getvalue()), RGB)


# ---------------------------------------------------------------- 16-bit colour: both bytes, rounded like grey

WIDE = np.random.default_rng(5).integers(0, 65536, size=(37, 53, 3), dtype=np.uint16)
WIDE[0, :8, 0] = [0, 257, 32896, 65535, 1000, 65280, 0x80FF, 448]  # 1000 -> 4 and 448 -> 2, where truncating gives 3, 1


def rounded(a: np.ndarray) -> np.ndarray:
    return np.rint(a.astype(np.float64) / 257).astype(np.uint8)  # the grey path's round(v / 257)


TIFF16 = {
    "uncompressed": {},
    "deflate": {"compression": "zlib"},
    "lzw": {"compression": "lzw"},
    "tiled": {"compression": "zlib", "tile": (16, 16)},
    "bigtiff": {"bigtiff": True},
    "big_endian": {"byteorder": ">"},
    "big_endian_deflate": {"byteorder": ">", "compression": "zlib"},
    "predictor": {"compression": "zlib", "predictor": True},
}


@pytest.mark.parametrize("case", list(TIFF16))
def test_16bit_rgb_tiff_rounded(case):
    buf = io.BytesIO()
    tifffile.imwrite(buf, WIDE, photometric="rgb", **TIFF16[case])
    got = load(buf.getvalue())
    assert np.array_equal(got, rounded(WIDE))
    assert got[0, :8, 0].tolist() == [0, 1, 128, 255, 4, 254, 128, 2]
    # control: Pillow alone keeps the high byte, so without our second pass this test fails
    assert np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))[0, 4, 0] == 1000 >> 8


def test_16bit_rgba_tiff_pages_and_orientation():
    rgba = np.concatenate([WIDE, np.full(WIDE.shape[:2] + (1,), 65535, np.uint16)], -1)
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert np.array_equal(load(buf.getvalue()), rounded(WIDE))  # alpha dropped, as for every mode
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.stack([WIDE, 65535 - WIDE]), photometric="rgb")
    assert np.array_equal(load(buf.getvalue(), frame=1), rounded(65535 - WIDE))
    buf = io.BytesIO()
    tifffile.imwrite(buf, WIDE, photometric="rgb", extratags=[(274, "H", 1, 6, True)])  # EXIF/TIFF orientation 6
    assert np.array_equal(load(buf.getvalue()), np.rot90(rounded(WIDE), -1))


def test_16bit_rgb_png_rounded(tmp_path):
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    h, w, _ = WIDE.shape
    raw = b"".join(b"\x00" + WIDE[y].astype(">u2").tobytes() for y in range(h))
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    assert np.array_equal(load(png), rounded(WIDE))


def test_pixel_limit_before_decoding_tiff():
    buf = io.BytesIO()
    tifffile.imwrite(buf, WIDE, photometric="rgb")
    cut = buf.getvalue()[:1000]  # truncated: decoding would fail, the size check must come first
    with pytest.raises(ImageError, match=r"too large \(53x37 = 1961 pixels > limit 1000\)"):
        load_image(cut, max_pixels=1000)
    with pytest.raises(ImageError, match="truncated"):
        load_image(cut)


# ---------------------------------------------------------------- the command line (real subprocesses)

QUESTION = "What is this lesion?"


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    e.pop("SKIN_OFFLINE_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "skin_offline.cli", *map(str, args)], capture_output=True, text=True, env=e, timeout=300
    )


def assert_clean(r: subprocess.CompletedProcess) -> None:
    """No planted header value in any stream; no traceback."""
    for stream in (r.stdout, r.stderr):
        assert "Traceback" not in stream, stream
        for secret in S.SECRETS:
            assert secret.lower() not in stream.lower(), (secret, stream)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert_clean(r)
    assert r.returncode == 3, (r.returncode, r.stderr)
    # the fixture bundles are random-weight ones: the warning every front end prints for them is not the error
    lines = [x for x in r.stderr.splitlines() if x.strip() and x != RANDOM_WEIGHTS_WARNING]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same pixels as a PNG, an uncompressed DICOM with no extension (burned-in flag set), an RLE DICOM; a JPEG
    YBR_FULL_422 DICOM, a 3-frame DICOM whose frame 1 is the PNG's pixels, and a HEIC. All carry patient data."""
    d = tmp_path_factory.mktemp("formats")
    px = S.rgb_pixels(64, 40, seed=7)
    Image.fromarray(px).save(d / "lesion.png")
    (d / "IM000001").write_bytes(S.write(S.native(px, BurnedInAnnotation="YES")))
    (d / "rle.dcm").write_bytes(S.write(S.compressed(S.native(px), uid.RLELossless)))
    jpeg = S.pillow_jpeg(px, 1)
    (d / "jpeg422.dcm").write_bytes(S.write(S.encapsulated(S.native(px), [jpeg], uid.JPEGBaseline8Bit, "YBR_FULL_422")))
    frames = np.stack([255 - px, px, px[::-1].copy()])
    (d / "IM000003").write_bytes(S.write(S.native(frames, frames=3)))
    (d / "IM000004").write_bytes(S.write(S.native(frames, frames=3, BurnedInAnnotation="YES")))
    (d / "photo.heic").write_bytes(heic(px, 6))
    return d


def ask_json(bundle, image, *extra) -> dict:
    r = cli("ask", image, QUESTION, "--bundle", bundle, "--max-new-tokens", 12, "--json", *extra)
    assert_clean(r)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_lossless_dicom_same_tokens_as_png(llava_model, files):
    """Separate processes (no feature cache shared): uncompressed (no extension) and RLE DICOM answer with exactly
    the PNG's greedy tokens, and frame 1 of a multi-frame DICOM too; the burned-in flag is one stderr notice."""
    b = llava_model.bundle_dir
    png = ask_json(b, files / "lesion.png")["token_ids"]
    assert len(png) > 0
    r = cli("ask", files / "IM000001", QUESTION, "--bundle", b, "--max-new-tokens", 12, "--json")
    assert_clean(r)
    assert r.returncode == 0 and json.loads(r.stdout)["token_ids"] == png
    notices = [x for x in r.stderr.splitlines() if x.startswith("warning:") and x != RANDOM_WEIGHTS_WARNING]
    assert len(notices) == 1 and "burned into the pixels" in notices[0], r.stderr
    assert ask_json(b, files / "rle.dcm")["token_ids"] == png
    assert ask_json(b, files / "IM000003", "--frame", 1)["token_ids"] == png
    assert ask_json(b, files / "IM000003")["token_ids"] != png  # frame 0 is another image


def test_every_command_answers_without_patient_data(llava_model, files):
    b = llava_model.bundle_dir
    r = cli("ask", files / "jpeg422.dcm", QUESTION, "--bundle", b, "--max-new-tokens", 8)  # streamed text
    assert_clean(r)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = cli(
        "chat",
        files / "IM000004",
        "--frame",
        2,
        "-q",
        QUESTION,
        "-q",
        "Is it benign?",
        "--bundle",
        b,
        "--max-new-tokens",
        6,
    )
    assert_clean(r)
    assert r.returncode == 0, r.stderr
    assert len([x for x in r.stderr.splitlines() if "burned into the pixels" in x]) == 1, r.stderr  # once, 2 turns
    assert len([x for x in r.stderr.splitlines() if x.startswith("[")]) == 2, r.stderr  # two answers' stats lines
    r = cli("classify", files / "IM000003", "--frame", 1, "--bundle", b, "--labels", "melanoma,nevus", "--json")
    assert_clean(r)
    assert r.returncode == 0 and json.loads(r.stdout), r.stderr
    r = cli("ask", files / "photo.heic", QUESTION, "--bundle", b, "--max-new-tokens", 4)
    assert r.returncode == 0, r.stderr
    r = cli("info", b)
    assert_clean(r)
    assert r.returncode == 0


BAD = {
    "no_pixel_data": (lambda: _without_pixels(), ["has no pixel data"]),
    "truncated_pixel_data": (lambda: S.write(S.native(RGB))[:-500], ["truncated"]),
    "unsupported_ts": (
        lambda: S.write(S.encapsulated(S.native(RGB), [b"\x00" * 64], uid.MPEG4HP41)),
        ["video", "H.264"],
    ),
    "header_only": (lambda: S.write(S.native(RGB))[:132], ["DICOM", "corrupt"]),
    "not_dicom": (lambda: b"\x00" * 128 + b"DICX" + os.urandom(300), ["not a recognised image"]),
    "photometric_is_a_name": (
        lambda: _claims(PhotometricInterpretation=S.PATIENT["PatientName"][:16]),
        ["unsupported photometric interpretation"],
    ),
}


def _without_pixels() -> bytes:
    ds = S.native(RGB)
    del ds.PixelData
    return S.write(ds)


def _claims(**attrs) -> bytes:
    return S.write(S.with_attrs(S.native(RGB), **attrs))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_dicom_one_line_exit_3(llava_model, tmp_path, case):
    build, needles = BAD[case]
    path = tmp_path / "IM000009"
    path.write_bytes(build())
    assert_one_line_error(
        cli("ask", path, QUESTION, "--bundle", llava_model.bundle_dir, "--json"), "IM000009", *needles
    )


def test_frame_out_of_range_and_missing_codec(llava_model, files, tmp_path):
    b = llava_model.bundle_dir
    assert_one_line_error(
        cli("ask", files / "IM000003", QUESTION, "--bundle", b, "--frame", 3), "frame 3 does not exist", "3 frame(s)"
    )
    path = tmp_path / "IM000010"
    path.write_bytes(S.write(S.compressed(S.native(RGB), uid.JPEGLSLossless)))
    stubs = tmp_path / "hidden"  # the codec extra "not installed": its packages fail to import
    for name in ("jpeg_ls", "gdcm", "pylibjpeg", "openjpeg"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    r = cli(
        "ask",
        path,
        QUESTION,
        "--bundle",
        b,
        env={"PYTHONPATH": os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")])},
    )
    assert_one_line_error(r, "JPEG-LS Lossless", "pip install 'skin-offline[dicom-codecs]'")


def test_decoding_opens_no_connection_and_writes_no_file(tmp_path):
    """Every DICOM decoder (pydicom, Pillow, pyjpegls, OpenJPEG, GDCM with its network library) and pillow-heif,
    under an audit hook that fails any socket connect / name lookup and any open for writing; a control shows the
    hook catches a real connect."""
    px = S.rgb_pixels()
    files = {
        "IM_native": S.write(S.native(px)),
        "IM_rle": S.write(S.compressed(S.native(px), uid.RLELossless)),
        "IM_jpeg": S.write(S.encapsulated(S.native(px), [S.pillow_jpeg(px, 1)], uid.JPEGBaseline8Bit, "YBR_FULL_422")),
        "IM_jls": S.write(S.compressed(S.native(px), uid.JPEGLSLossless)),
        "IM_j2k": S.write(S.compressed(S.native(px), uid.JPEG2000Lossless)),
        "IM_htj2k": S.write(S.encapsulated(S.native(px), [S.htj2k(px)], uid.HTJ2KLossless)),
        "IM_ljpeg": S.gdcm_compress(S.write(S.native(px, sop_class=S.VL_PHOTO)), uid.JPEGLosslessSV1),
        "photo.heic": heic(px),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    r = _run_python(
        f"""
        import os, socket, sys
        def hook(event, args):
            if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
                raise RuntimeError("network: " + event)
            if event == "open" and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
                raise RuntimeError("write: " + str(args[0]))
        sys.addaudithook(hook)
        from skin_offline.runtime.image import load_image
        for name in {sorted(files)!r}:
            img = load_image(os.path.join({str(tmp_path)!r}, name))
            print(name, img.size)
        try:
            socket.create_connection(("127.0.0.1", 9))
        except RuntimeError as e:
            print("control:", e)
    """,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [x.split()[0] for x in lines[:-1]] == sorted(files) and all("(48, 32)" in x for x in lines[:-1]), r.stdout
    assert lines[-1].startswith("control: network: socket."), r.stdout
