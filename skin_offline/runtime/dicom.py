"""DICOM images (dermoscopy, clinical photographs, PACS exports) -> 8-bit pixels, without echoing patient data.

Only called by image.load_image, which recognises DICOM by content (Part 10: the 128-byte preamble + "DICM"),
never by extension: PACS exports are often named IM000001.

Privacy: a DICOM header carries the patient's name, ID, birth date, accession number... None of it may reach a
message, a log line or a warning. So:
- pydicom reads only the Image Pixel tags it needs (`specific_tags`); every other element is skipped unread;
- its reading validation is off (its warnings quote element values, e.g. an invalid birth date), its warnings are
  silenced and its log records dropped while we read;
- no pydicom or codec exception text is passed on: every failure becomes our own one-line ImageError, built only
  from the transfer syntax name, photometric interpretation (both from a fixed list), size and frame count.

Decoding (pydicom 3 `pixel_array`, one frame read): uncompressed little/big endian, deflated and RLE by pydicom;
JPEG baseline and JPEG 2000 through Pillow; JPEG-LS (pyjpegls), lossless JPEG (python-gdcm) and HTJ2K (pylibjpeg +
pylibjpeg-openjpeg) through the optional `dicom-codecs` extra. The decoder for each transfer syntax is fixed
(`_PLUGINS`), so installing the extra never changes how a core syntax is decoded.

Pixels -> 8 bits: pydicom converts YBR_FULL / YBR_FULL_422 to RGB (once: JPEG baseline comes back as YCbCr from
Pillow and pydicom converts it); JPEG 2000's YBR_ICT / YBR_RCT come back as RGB from the decoders; PALETTE COLOR goes
through its lookup table; MONOCHROME1 is inverted. Values are scaled from BitsStored to 8 bits with
round(v * 255 / (2**BitsStored - 1)), the 16-bit PNG path's round(v / 257) for BitsStored 16; signed grey is shifted
by 2**(BitsStored-1) first. No VOI window or modality LUT is applied (a photograph has none; for grey images this is
the full stored range, like the PNG path).
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import pydicom
from pydicom import config, uid
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, get_decoder, pixel_array
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from ..errors import ImageError
from .pixel_limit import MAX_PIXELS_ENV

CODECS_EXTRA = "pip install 'skin-offline[dicom-codecs]'"

# Validation warnings quote element values (a birth date, a name): never validate what we read.
config.settings.reading_validation_mode = config.IGNORE

_PALETTE = [f"{c}PaletteColorLookupTable{kind}" for c in ("Red", "Green", "Blue") for kind in ("Descriptor", "Data")]
_SEGMENTED = [f"Segmented{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue")]
# Everything we read from the data set; every other element (patient, study, private...) is skipped unread.
HEADER_TAGS = [
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "BurnedInAnnotation",
    "PaletteColorLookupTableUID",
    *_PALETTE,
    *_SEGMENTED,
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
]

_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
_GREY = {"MONOCHROME1", "MONOCHROME2"}
_PHOTOMETRICS = _COLOUR | _GREY | {"PALETTE COLOR"}

# Decoder plugin per transfer syntax, in order of preference (pydicom's names). Fixed so that the core syntaxes
# decode the same whether or not the codec extra is installed (pydicom's own default would try gdcm first).
_J2K = ("pillow", "pylibjpeg")
_PLUGINS: dict[str, tuple[str, ...]] = {
    uid.JPEGBaseline8Bit: ("pillow",),
    uid.JPEGExtended12Bit: ("pillow",),
    uid.JPEGLossless: ("gdcm",),
    uid.JPEGLosslessSV1: ("gdcm",),
    uid.JPEGLSLossless: ("pyjpegls",),
    uid.JPEGLSNearLossless: ("pyjpegls",),
    uid.JPEG2000Lossless: _J2K,
    uid.JPEG2000: _J2K,
    uid.HTJ2KLossless: ("pylibjpeg",),
    uid.HTJ2KLosslessRPCL: ("pylibjpeg",),
    uid.HTJ2K: ("pylibjpeg",),
    uid.RLELossless: ("pydicom",),
}
_J2K_FAMILY = {uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K}
_NATIVE = {
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
}
_VIDEO = set(uid.MPEGTransferSyntaxes)
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


class _DropWhileReading(logging.Filter):
    """Drops the records pydicom and the codecs log while this thread reads an image (some quote element values).

    A logger's filters do not see records propagated from its children, so the filter sits on every logger of
    these packages (`_hush`, before each read, also catches loggers created since)."""

    PACKAGES = ("pydicom", "openjpeg", "pylibjpeg", "jpeg_ls", "gdcm", "highdicom")

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "reading", False)


_quiet = _DropWhileReading()


def _hush() -> None:
    names = set(_quiet.PACKAGES) | {
        n for n in list(logging.Logger.manager.loggerDict) if n.split(".")[0] in _quiet.PACKAGES
    }
    for n in names:
        logger = logging.getLogger(n)
        if _quiet not in logger.filters:
            logger.addFilter(_quiet)


_hush()


@dataclass(frozen=True)
class DicomImage:
    """A decoded frame: [H, W, 3] or [H, W] uint8 pixels, and the one notice a header may call for."""

    pixels: np.ndarray
    burned_in_annotation: bool


@dataclass(frozen=True)
class _Header:
    """What we print or decide on; only values from fixed vocabularies or numbers (never free header text)."""

    ts: str  # transfer syntax UID
    photometric: str  # one of _PHOTOMETRICS (checked)
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    frames: int
    burned_in: bool

    @property
    def ts_name(self) -> str:
        return _ts_name(self.ts)

    def describe(self) -> str:
        return f"{self.ts_name}, {self.photometric}, {self.columns}x{self.rows}, {self.frames} frame(s)"


def _ts_name(ts: str) -> str:
    name = uid.UID(ts).name if ts else ""
    if name and name != ts:
        return name
    # Not in pydicom's dictionary: show the UID only if it is one (digits and dots), never other text.
    return (
        f"unknown transfer syntax {ts}"
        if ts and len(ts) <= 64 and _UID_RE.fullmatch(ts)
        else "an unrecognised transfer syntax"
    )


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_FAILED = object()


def _attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), or _FAILED if it raised anything but our own error or MemoryError.

    pydicom and the codecs raise a dozen exception types, and some messages quote element values; the caller raises
    its own ImageError *after* this returns, so the original is not even kept as a suppressed __context__."""
    try:
        return fn(*args, **kwargs)
    except (ImageError, MemoryError):
        raise
    except Exception:  # noqa: BLE001  see above: dropped on purpose, never shown
        return _FAILED


def _parse_header(fp: BinaryIO) -> tuple[_Header, Dataset, bool | None]:
    fp.seek(0)
    ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    has_pixels: bool | None = None
    if ts and ts != uid.DeflatedExplicitVRLittleEndian:
        tag = fp.read(4)  # dcmread stopped at the pixel data tag, or at the end of the data set
        has_pixels = len(tag) == 4 and struct.unpack(">HH" if ts == uid.ExplicitVRBigEndian else "<HH", tag) in (
            (0x7FE0, 0x0010),
            (0x7FE0, 0x0008),
            (0x7FE0, 0x0009),
        )
        if len(tag) == 4 and not has_pixels:
            raise ValueError("stopped before the end, not at pixel data")
        fp.seek(-len(tag), io.SEEK_CUR)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    bits_allocated = _int(ds, "BitsAllocated")
    frames = _int(ds, "NumberOfFrames", 1)
    header = _Header(
        ts=ts,
        photometric=photometric if photometric in _PHOTOMETRICS else "",
        rows=_int(ds, "Rows") or 0,
        columns=_int(ds, "Columns") or 0,
        samples=_int(ds, "SamplesPerPixel", 1) or 0,
        bits_allocated=bits_allocated or 0,
        bits_stored=_int(ds, "BitsStored", bits_allocated) or 0,
        signed=_int(ds, "PixelRepresentation", 0) == 1,
        frames=max(frames, 1) if frames is not None else 0,
        burned_in=str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES",
    )
    return header, ds, has_pixels


# Explicit-VR elements whose length field is 4 bytes (pydicom's own list), as the bytes found in a file.
_LONG_VRS = {str(vr).encode() for vr in EXPLICIT_VR_LENGTH_32}


def _deflated_data_set_offset(fp: BinaryIO) -> int | None:
    """Where a deflated data set starts, or None when the file meta names another transfer syntax.

    Walks the file meta (group 0002, always explicit VR little endian) by hand: pydicom's public reader of the
    meta alone takes only a path, and dcmread goes on into the data set, which for a deflated file means
    inflating all of it."""
    pos, ts = 132, b""  # after the preamble + "DICM" (checked by the loader)
    while pos < (1 << 20):  # a file meta is a few hundred bytes
        fp.seek(pos)
        head = fp.read(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            break
        if head[4:6] in _LONG_VRS:
            more = fp.read(4)
            if len(more) < 4:
                break
            size, length = 12, struct.unpack("<I", more)[0]
        else:
            size, length = 8, struct.unpack("<H", head[6:8])[0]
        if struct.unpack("<H", head[2:4])[0] == 0x0010:  # TransferSyntaxUID
            ts = fp.read(min(length, 64)).rstrip(b"\x00 ")
        pos += size + length
    return pos if ts == uid.DeflatedExplicitVRLittleEndian.encode() else None


def inflated_size_cap(max_pixels: int) -> int:
    """Bytes a deflated data set may inflate to: the largest image the pixel limit lets through at 16 bits x 3
    samples, with room for a few frames or tables (8 bytes a pixel), plus 1 MiB for the header."""
    return 8 * max_pixels + (1 << 20)


def _check_inflated_size(fp: BinaryIO, name: str, max_pixels: int) -> None:
    """Refuse a deflate bomb before pydicom sees it.

    pydicom inflates a deflated data set whole, into memory, before a single tag can be checked: a 20 MB upload of
    zeros would inflate to ~20 GB. So inflate it here first, streaming and counting, keeping none of the output;
    zlib's `max_length` bounds each step's output whatever the ratio."""
    start = _deflated_data_set_offset(fp)
    if start is None:
        return
    cap = inflated_size_cap(max_pixels)
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    fp.seek(start)
    try:
        while not inflater.eof and (chunk := fp.read(1 << 20)):
            while chunk and not inflater.eof:
                total += len(inflater.decompress(chunk, 1 << 22))
                if total > cap:
                    raise ImageError(
                        f"{name}: deflated DICOM data set inflates to more than {cap >> 20} MiB, more "
                        f"than any image within the pixel limit needs; export the image uncompressed, "
                        f"or raise {MAX_PIXELS_ENV} if it is a genuine very large image"
                    )
                chunk = inflater.unconsumed_tail
    except zlib.error:
        raise ImageError(f"{name}: corrupt deflated DICOM data set; export or copy the file again") from None
    finally:
        fp.seek(0)


def _read_header(fp: BinaryIO, name: str) -> tuple[_Header, Dataset, bool | None]:
    """Header pass: file meta + the Image Pixel tags, stopping before the pixel data.

    Returns the header, the tags read (for the palette) and whether pixel data follows (None: not known yet,
    for a deflated data set whose position we cannot see)."""
    got = _attempt(_parse_header, fp)
    if got is _FAILED:
        raise ImageError(f"{name}: corrupt or truncated DICOM header; export or copy the file again")
    if not got[0].ts:
        raise ImageError(f"{name}: DICOM file without a transfer syntax (corrupt file meta); export it again")
    return got


def _no_pixels(name: str) -> str:
    return (
        f"{name}: DICOM file has no pixel data (a report, a DICOMDIR, a header only or a truncated file); "
        "export the image itself, or copy the file again"
    )


def _check(h: _Header, name: str, frame: int, max_pixels: int, has_pixels: bool | None) -> None:
    """Everything refused before any pixel is decoded."""
    if h.ts in _VIDEO:
        raise ImageError(f"{name}: DICOM video ({h.ts_name}) is not supported; export a still image from the device")
    if h.ts not in _NATIVE and h.ts not in _PLUGINS:
        raise ImageError(
            f"{name}: DICOM pixel data in {h.ts_name} is not supported; "
            "export the image uncompressed, as JPEG or as JPEG 2000"
        )
    if has_pixels is False:
        raise ImageError(_no_pixels(name))
    if not h.photometric:
        raise ImageError(
            f"{name}: DICOM image with an unsupported photometric interpretation ({h.ts_name}); "
            "supported: RGB, YBR_FULL(_422), YBR_ICT/RCT, PALETTE COLOR, MONOCHROME1/2"
        )
    ok_samples = 3 if h.photometric in _COLOUR else 1
    if h.samples != ok_samples or h.rows <= 0 or h.columns <= 0 or h.frames <= 0:
        raise ImageError(
            f"{name}: corrupt DICOM image description ({h.photometric}, {h.samples} samples per pixel, "
            f"{h.columns}x{h.rows}, {h.frames} frame(s)); export the file again"
        )
    if h.bits_allocated not in (1, 8, 16) or not 1 <= h.bits_stored <= h.bits_allocated:
        raise ImageError(
            f"{name}: DICOM image with {h.bits_stored} of {h.bits_allocated} bits per sample is not "
            "supported (1 to 16 bits); export it as an 8- or 16-bit image"
        )
    if h.rows * h.columns > max_pixels:
        raise ImageError(
            f"{name}: image too large ({h.columns}x{h.rows} = {h.rows * h.columns} pixels > limit "
            f"{max_pixels}); downscale it or raise {MAX_PIXELS_ENV}"
        )
    if frame >= h.frames:
        raise ImageError(
            f"{name}: frame {frame} does not exist: the image has {h.frames} frame(s), numbered 0 to {h.frames - 1}"
        )
    if h.ts == uid.JPEGExtended12Bit and h.bits_stored > 8:
        raise ImageError(
            f"{name}: 12-bit JPEG Extended DICOM is not supported (its only decoder is GPL-licensed); "
            "export the image uncompressed or as JPEG 2000"
        )


def _plugin(h: _Header, name: str) -> str:
    """The decoder plugin for this transfer syntax, or a one-line error naming the extra to install."""
    prefs = _PLUGINS.get(h.ts)
    if prefs is None:
        return ""  # native: pydicom itself
    if prefs is _J2K and h.samples > 1 and h.bits_stored > 8:
        prefs = ("pylibjpeg",)  # Pillow cannot decode > 8-bit colour JPEG 2000 (it cuts it to 8 bits)
    available = get_decoder(h.ts).available_plugins
    for p in prefs:
        if p in available:
            if p == "gdcm":
                _silence_gdcm()
            return p
    raise ImageError(f"{name}: DICOM {h.ts_name} needs an optional decoder; install it with {CODECS_EXTRA}")


def _silence_gdcm() -> None:
    import gdcm  # only imported when present (the plugin said so)

    gdcm.Trace.WarningOff()  # GDCM prints its warnings and errors straight to stderr
    gdcm.Trace.ErrorOff()
    gdcm.Trace.DebugOff()


def _codestream_size(frame: bytes, j2k: bool) -> tuple[int, int] | None:
    """(width, height) declared by a JPEG / JPEG-LS / JPEG 2000 codestream, read from its SOF / SIZ marker.

    pydicom hands the codestream to the codec without comparing its size with Rows/Columns, and the optional
    codecs allocate whatever the stream declares, so a hostile file could claim 10x10 and decode 60000x60000.
    Hand-written: a few bytes of two well-specified markers, and no library exposes just this."""
    if j2k:
        at = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC + SIZ (raw codestream, or inside a JP2 box)
        if at < 0 or len(frame) < at + 24:
            return None
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[at + 8 : at + 24])
        return xsiz - xo, ysiz - yo
    if not frame.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 4 <= len(frame):
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", frame[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            if i + 9 > len(frame):
                return None
            height, width = struct.unpack(">HH", frame[i + 5 : i + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any SOF: corrupt
            return None
        i += 2 + length
    return None


def _check_codestream(fp: BinaryIO, h: _Header, name: str, frame: int) -> None:
    """The encapsulated frame must be complete and declare the size the header does (see _codestream_size)."""
    if h.ts not in _PLUGINS or h.ts == uid.RLELossless:
        return  # native and RLE: pydicom decodes into the size the header gives
    start = fp.tell()

    def encoded_frame() -> bytes:
        fp.read(12)  # tag, VR, reserved, undefined length: encapsulated data is always explicit VR little endian
        return pydicom.encaps.get_frame(fp, frame, number_of_frames=h.frames)

    data = _attempt(encoded_frame)
    fp.seek(start)
    if data is _FAILED:
        raise ImageError(
            f"{name}: DICOM pixel data is truncated or corrupt ({h.describe()}); export or copy the file again"
        )
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        # JPEG's EOI and JPEG 2000's EOC are both FFD9 (fragments may add one padding byte). Checked here because
        # CharLS spends ~10 s on a truncated JPEG-LS stream before failing (measured: 48x32 to 128x128 alike)
        raise ImageError(
            f"{name}: DICOM pixel data is truncated ({h.describe()}): its compressed frame has no end "
            "marker; export or copy the file again"
        )
    size = _codestream_size(data, j2k=h.ts in _J2K_FAMILY)
    if size != (h.columns, h.rows):
        got = f"{size[0]}x{size[1]}" if size else "no readable size"
        raise ImageError(
            f"{name}: corrupt DICOM image: its compressed frame declares {got} but the header says "
            f"{h.columns}x{h.rows}; export the file again"
        )


def _to_8bit(a: np.ndarray, h: _Header, tags: Dataset) -> np.ndarray:
    """Decoded frame ([H,W] or [H,W,3], any integer dtype) -> uint8 (see the module docstring)."""
    if h.photometric == "PALETTE COLOR":
        rgb = apply_color_lut(a, tags)  # [H,W,3], 8- or 16-bit entries
        bits = (
            int(tags.RedPaletteColorLookupTableDescriptor[2]) if "RedPaletteColorLookupTableDescriptor" in tags else 16
        )
        return _scale(rgb.astype(np.int64), 16 if bits > 8 else 8)
    v = a.astype(np.int64)
    if h.signed and h.photometric in _GREY:
        v = v + (1 << (h.bits_stored - 1))  # [-2^(b-1), 2^(b-1)) -> [0, 2^b)
    top = (1 << h.bits_stored) - 1
    v = np.clip(v, 0, top)  # bits above BitsStored (garbage in some files) cannot wrap around
    if h.photometric == "MONOCHROME1":
        v = top - v  # MONOCHROME1: 0 is white
    return _scale(v, h.bits_stored)


def _scale(v: np.ndarray, bits: int) -> np.ndarray:
    """[0, 2^bits - 1] -> [0, 255] as round(v * 255 / (2^bits - 1)), in integers.

    Never a tie: 510 * v is even and (2k + 1) * (2^bits - 1) is odd, so round-half-up is plain rounding."""
    if bits == 8:
        return v.astype(np.uint8)
    top = (1 << bits) - 1
    return ((v * 510 + top) // (2 * top)).astype(np.uint8)


def _decode(fp: BinaryIO, h: _Header, tags: Dataset, name: str, frame: int, plugin: str) -> np.ndarray:
    if h.ts == uid.DeflatedExplicitVRLittleEndian:
        # pydicom reads a deflated data set only as a whole (it inflates it first)
        fp.seek(0)
        ds = pydicom.dcmread(fp, specific_tags=[*HEADER_TAGS, "PixelData"])
        if "PixelData" not in ds:
            raise ImageError(_no_pixels(name))
        a = pixel_array(ds, index=frame)
    else:
        a = pixel_array(fp, index=frame, decoding_plugin=plugin)  # reads this frame only
    want = (h.rows, h.columns, 3) if h.samples == 3 else (h.rows, h.columns)
    if a.shape != want:
        raise ImageError(f"{name}: DICOM pixel data does not match its header ({h.describe()}); export the file again")
    return _to_8bit(a, h, tags)


def read_dicom(fp: BinaryIO, name: str, *, frame: int, max_pixels: int) -> DicomImage:
    """Decode frame `frame` of a Part 10 file (seekable binary stream) to 8-bit pixels."""
    _hush()
    _quiet.local.reading = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's and the codecs' warnings may quote values
            _check_inflated_size(fp, name, max_pixels)
            header, tags, has_pixels = _read_header(fp, name)
            _check(header, name, frame, max_pixels, has_pixels)
            plugin = _plugin(header, name)
            _check_codestream(fp, header, name, frame)
            pixels = _attempt(_decode, fp, header, tags, name, frame, plugin)
            if pixels is _FAILED:
                raise ImageError(
                    f"{name}: DICOM pixel data is truncated or corrupt ({header.describe()}); "
                    "export or copy the file again"
                )
            return DicomImage(pixels, header.burned_in)
    finally:
        _quiet.local.reading = False


@contextmanager
def quietly() -> Iterator[None]:
    """No warning and no log record from pydicom, highdicom or the codecs while this thread works on a header
    (both may quote element values): for callers outside this module that read or write DICOM (skin_offline.sr)."""
    _hush()
    was = getattr(_quiet.local, "reading", False)
    _quiet.local.reading = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _quiet.local.reading = was


def read_header_dataset(fp: BinaryIO, name: str, *, max_pixels: int) -> Dataset:
    """Every element of a Part 10 file before its pixel data (patient, study, series, SOP...), read as quietly and
    as guarded as the pixels: for a DICOM SR about this image, the one place that copies patient data (skin_offline.sr).
    Any failure is a one-line ImageError without header values."""
    with quietly():
        _check_inflated_size(fp, name, max_pixels)
        fp.seek(0)
        ds = _attempt(pydicom.dcmread, fp, stop_before_pixels=True)
        if ds is _FAILED:
            raise ImageError(f"{name}: corrupt or truncated DICOM header; export or copy the file again")
        return ds
