"""DICOM test files generated on the fly with pydicom (and Pillow / imagecodecs for the codestreams pydicom cannot
encode itself): every transfer syntax and photometric interpretation the loader accepts, plus broken files.

Every file carries planted patient data (PATIENT below, some of it deliberately invalid so that pydicom's
validation would quote it in a warning) so tests can grep every output stream for it."""

from __future__ import annotations

import io
import os
import tempfile
import warnings

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

# Planted header values: none of these may appear in any output, log or error.
PATIENT = {
    "PatientName": "Qwertyuiop^Zanzibarina",
    "PatientID": "PID-88374651",
    "PatientBirthDate": "19410203",
    "AccessionNumber": "ACC-7733191",
    "InstitutionName": "Hospital Xylophonic",
}
# An invalid DA (validation would warn, quoting it) and a private tag: must not leak either.
INVALID_DATE = "1941-02-03 QWERTY"
SECRETS = [*PATIENT.values(), "Qwertyuiop", "Zanzibarina", "19410203", INVALID_DATE, "QWERTY", "Xylophonic"]

VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"  # VL Photographic Image Storage
DERMOSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.7"  # Dermoscopic Photography Image Storage


def rgb_pixels(w: int = 48, h: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus mild noise: [h, w, 3] uint8 (JPEG-friendly, so lossy errors stay small)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 255 / max(w + h - 2, 1)], -1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def grey_pixels(w: int = 64, h: int = 40, bits: int = 8, seed: int = 1) -> np.ndarray:
    """[h, w] values spanning [0, 2**bits - 1] (both ends present)."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    a = rng.integers(0, top + 1, size=(h, w), dtype=np.int64)
    a[0, 0], a[0, 1] = 0, top
    return a.astype(np.uint8 if bits <= 8 else np.uint16)


def _base(sop_class: str, ts: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "XC"
    for k, v in PATIENT.items():
        setattr(ds, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.StudyDate = INVALID_DATE  # invalid DA on purpose
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = PATIENT["PatientID"]
    block = ds.private_block(0x0011, "ACME Derm", create=True)
    block.add_new(0x01, "LO", PATIENT["PatientName"])
    return ds


def _image_module(ds: Dataset, arr: np.ndarray, photometric: str, bits_stored: int, frames: int) -> None:
    shape = arr.shape[1:] if frames > 1 else arr.shape
    ds.Rows, ds.Columns = shape[0], shape[1]
    ds.SamplesPerPixel = shape[2] if len(shape) == 3 else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if ds.SamplesPerPixel > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames


def write(ds: Dataset) -> bytes:
    """A Part 10 file (preamble + DICM + file meta + data set)."""
    buf = io.BytesIO()
    ts = ds.file_meta.TransferSyntaxUID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid date we planted
        ds.save_as(
            buf,
            enforce_file_format=True,
            implicit_vr=ts == uid.ImplicitVRLittleEndian,
            little_endian=ts != uid.ExplicitVRBigEndian,
        )
    return buf.getvalue()


def write_bare(ds: Dataset) -> bytes:
    """The data set alone, implicit VR little endian: no preamble, no 'DICM', no file meta (a raw PACS dump)."""
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = True, True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


def native(
    arr: np.ndarray,
    *,
    photometric: str = "RGB",
    bits_stored: int | None = None,
    ts: str = uid.ExplicitVRLittleEndian,
    frames: int = 1,
    planar: int = 0,
    sop_class: str = DERMOSCOPY,
    **extra,
) -> Dataset:
    """An uncompressed dataset holding `arr` ([h,w], [h,w,3], or with a leading frame axis when frames > 1)."""
    bits_stored = bits_stored or (8 if arr.dtype == np.uint8 else 16)
    ds = _base(sop_class, ts)
    _image_module(ds, arr, photometric, bits_stored, frames)
    if ds.SamplesPerPixel > 1:
        ds.PlanarConfiguration = planar
    a = arr
    if planar and ds.SamplesPerPixel > 1:
        a = np.moveaxis(arr, -1, -3)  # [..., 3, h, w]: colour-by-plane
    a = np.ascontiguousarray(a)
    if ts == uid.ExplicitVRBigEndian:
        a = a.astype(a.dtype.newbyteorder(">"))
    ds.PixelData = a.tobytes()
    if ds.BitsAllocated == 16:
        ds["PixelData"].VR = "OW"
    return with_attrs(ds, **extra)


def compressed(ds: Dataset, ts: str, **kw) -> Dataset:
    """Compress a native dataset with pydicom's own encoders (RLE; JPEG-LS through pyjpegls; J2K through openjpeg)."""
    ds.compress(ts, generate_instance_uid=False, **kw)
    return ds


def encapsulated(template: Dataset, frames: list[bytes], ts: str, photometric: str | None = None) -> Dataset:
    """Replace the pixel data of `template` by encapsulated codestreams (one per frame)."""
    ds = template
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if photometric:
        ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel > 1:
        ds.PlanarConfiguration = 0
    return ds


def pillow_jpeg(arr: np.ndarray, subsampling: int, quality: int = 95, keep_rgb: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, subsampling=subsampling, keep_rgb=keep_rgb)
    return buf.getvalue()


def pillow_j2k(arr: np.ndarray, lossless: bool) -> bytes:
    """A raw JPEG 2000 codestream (what DICOM encapsulates); RGB uses the colour transform (RCT/ICT)."""
    buf = io.BytesIO()
    kw = {} if lossless else {"quality_mode": "rates", "quality_layers": [8], "irreversible": True}
    Image.fromarray(arr).save(buf, "JPEG2000", no_jp2=True, mct=1 if arr.ndim == 3 else 0, **kw)
    return buf.getvalue()


def palette_lut(bits: int = 16, entries: int = 256, seed: int = 3) -> tuple[np.ndarray, list[int]]:
    """[entries, 3] LUT values (uint16 when bits == 16) and the descriptor."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    lut = rng.integers(0, top + 1, size=(entries, 3), dtype=np.int64)
    lut[0] = 0
    lut[1] = top
    return lut.astype(np.uint16), [entries, 0, bits]


def with_palette(ds: Dataset, lut: np.ndarray, desc: list[int]) -> Dataset:
    for i, c in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{c}PaletteColorLookupTableDescriptor", desc)
        setattr(ds, f"{c}PaletteColorLookupTableData", lut[:, i].astype("<u2").tobytes())
        ds[f"{c}PaletteColorLookupTableDescriptor"].VR = "US"
    return ds


def scale_to_8(a: np.ndarray, bits: int) -> np.ndarray:
    """Reference scaling: round(v * 255 / (2**bits - 1)) computed in float64 (no ties occur: see image.py)."""
    return np.rint(a.astype(np.float64) * 255.0 / ((1 << bits) - 1)).astype(np.uint8)


def grey_rgb(a8: np.ndarray) -> np.ndarray:
    return np.repeat(a8[..., None], 3, axis=-1)


def gdcm_compress(data: bytes, ts: str) -> bytes:
    """Re-encode a Part 10 file with GDCM (lossless JPEG, Process 14: the one codec here that writes it)."""
    import gdcm

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.dcm"), os.path.join(d, "out.dcm")
        with open(src, "wb") as f:
            f.write(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(src)
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(ts)))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(dst)
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        with open(dst, "rb") as f:
            return f.read()


def htj2k(arr: np.ndarray, lossless: bool = True) -> bytes:
    """An HTJ2K codestream (imagecodecs' OpenJPH encoder; a test-only dependency)."""
    import imagecodecs

    return imagecodecs.htj2k_encode(arr, level=0 if lossless else 90)


YBR_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])  # PS3.3 C.7.6.3.1.2


def rgb_to_ybr_full(rgb: np.ndarray) -> np.ndarray:
    m = np.linalg.inv(YBR_TO_RGB)
    ybr = rgb.astype(np.float64) @ m.T + np.array([0.0, 128.0, 128.0])
    return np.clip(np.rint(ybr), 0, 255).astype(np.uint8)


def ybr_full_to_rgb(ybr: np.ndarray) -> np.ndarray:
    """The standard's equations, written here independently of pydicom."""
    rgb = (ybr.astype(np.float64) - np.array([0.0, 128.0, 128.0])) @ YBR_TO_RGB.T
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def ybr_422_bytes(ybr: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Native YBR_FULL_422 (per pixel pair: Y1 Y2 Cb Cr, chroma averaged) and the full-resolution YBR it means."""
    h, w, _ = ybr.shape
    assert w % 2 == 0
    y = ybr[..., 0]
    cb = ybr[..., 1].reshape(h, w // 2, 2).astype(np.int64).mean(-1).round().astype(np.uint8)
    cr = ybr[..., 2].reshape(h, w // 2, 2).astype(np.int64).mean(-1).round().astype(np.uint8)
    packed = np.stack([y[:, 0::2], y[:, 1::2], cb, cr], -1)  # [h, w/2, 4]
    full = np.stack([y, np.repeat(cb, 2, 1), np.repeat(cr, 2, 1)], -1)
    return packed.tobytes(), full


def clinical(**extra) -> dict:
    """Header values an image stored in a PACS has (study and series UIDs, valid study date/time, a complete Other
    Patient IDs item), besides the planted PATIENT data: `native(arr, **clinical())`. The plain samples keep an
    invalid date and an incomplete Other Patient IDs item on purpose (leak tests); a report copies those exactly."""
    other = Dataset()
    other.PatientID = PATIENT["PatientID"]
    other.TypeOfPatientID = "TEXT"
    return {
        "StudyInstanceUID": uid.generate_uid(),
        "SeriesInstanceUID": uid.generate_uid(),
        "StudyDate": "20260105",
        "StudyTime": "101500",
        "StudyID": "S-4471",
        "PatientSex": "F",
        "ReferringPhysicianName": "Grey^Meredith",
        "OtherPatientIDsSequence": Sequence([other]),
        "SeriesNumber": 3,
        "InstanceNumber": 1,
        **extra,
    }


def with_attrs(ds: Dataset, **attrs) -> Dataset:
    """Set header values, including invalid ones, without pydicom's validation warning (it would quote them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, v in attrs.items():
            setattr(ds, k, v)
    return ds
