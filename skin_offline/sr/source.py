"""The source image of a report: its DICOM header (patient, study, series, SOP instance, frame), read without
echoing any of it.

A DICOM SR is filed in the PACS beside the image it is about, so it needs that image's patient and study modules
and its SOP Class / Instance UIDs: only a DICOM source (Part 10) has them. Everything here is refused in one line
that names the file and never a header value (the values themselves go only into the report)."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from ..errors import ImageError

# What highdicom reads from the evidence by attribute (so a sparse file would fail there): the type 2 attributes of
# the Patient and General Study modules. The SR keeps them empty where the source has none (type 2: present, empty).
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
# Type 1 in every stored image: without them the report cannot point at the image nor join its study.
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_LABELS = {
    "SOPClassUID": "SOP Class UID",
    "SOPInstanceUID": "SOP Instance UID",
    "StudyInstanceUID": "Study Instance UID",
    "SeriesInstanceUID": "Series Instance UID",
}


@dataclass(frozen=True)
class SourceImage:
    """The image a report is about: its header (patient/study data: never logged) and the frame the model saw."""

    header: Dataset  # every element before the pixel data
    frame: int  # 0-based, as --frame
    name: str  # the file name for messages ('<image bytes>' for uploads)

    @property
    def multi_frame(self) -> bool:
        """The image's SOP class is a multi-frame one: only then may a reference name frames (PS3.3 C.17.3.2.1,
        checked by dciodvfy)."""
        from highdicom._standard_utils import is_multiframe_image  # the standard's IOD tables as highdicom ships them

        try:
            return bool(is_multiframe_image(self.header))
        except Exception:  # noqa: BLE001  a SOP class the tables do not know (private, retired)
            return "NumberOfFrames" in self.header

    @property
    def frame_numbers(self) -> list[int] | None:
        """DICOM's 1-based Referenced Frame Number for a multi-frame image; None for a single-frame one."""
        return [self.frame + 1] if self.multi_frame else None

    @property
    def frame_note(self) -> str | None:
        """Which frame the model saw, in words, when the reference cannot say it: several frames in an image whose
        SOP class is single-frame (some devices write such files)."""
        try:
            frames = int(self.header.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        if frames > 1 and not self.multi_frame:
            return f"The model saw frame {self.frame + 1} of the image's {frames} frames."
        return None

    def evidence(self) -> Dataset:
        """What highdicom's SR constructor reads from its evidence: the UIDs, and the type 2 patient/study attributes
        as empty placeholders. highdicom validates those it parses (a PatientSex 'U' or a malformed date from a real
        device would stop it); the exact values are copied afterwards by `patient_and_study`."""
        ev = Dataset()
        for kw in REQUIRED_UIDS:
            setattr(ev, kw, self.header[kw].value)
        for kw in TYPE2:
            setattr(ev, kw, "")
        return ev

    def patient_and_study(self, sr_sop_class_uid: str) -> Dataset:
        """A copy of the header labelled with the SR's SOP class, so that highdicom's
        `copy_patient_and_study_information` copies every root attribute of the modules the SR IOD has (Patient,
        Clinical Trial Subject, General Study, Patient Study, Clinical Trial Study) exactly as in the source,
        whatever the source's own IOD (even one highdicom does not know)."""
        ds = copy.deepcopy(self.header)
        ds.SOPClassUID = sr_sop_class_uid
        return ds


def _describe(src) -> str:
    return "<image bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)


def read_source(src, frame: int = 0, *, max_pixels: int | None = None) -> SourceImage:
    """A path / bytes / ImageSource -> its DICOM header, or a one-line ImageError (not DICOM, unreadable, no UIDs)."""
    from ..runtime.image import ImageSource
    from ..runtime.pixel_limit import max_pixels_from_env  # the loader's own limit (its env variable)

    if isinstance(src, ImageSource):
        src, frame = src.src, src.frame
    name = _describe(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _read(io.BytesIO(bytes(src)), name, frame, max_pixels or max_pixels_from_env())
    if not isinstance(src, (str, Path)):
        raise ImageError(
            f"a DICOM Structured Report needs the DICOM file itself (a path or its bytes), not a {type(src).__name__}"
        )
    try:
        with open(src, "rb") as fp:
            return _read(fp, name, frame, max_pixels or max_pixels_from_env())
    except OSError as e:
        raise ImageError(f"{name}: cannot read the image ({e.strerror or type(e).__name__})") from None


def _read(fp, name: str, frame: int, max_pixels: int) -> SourceImage:
    from ..runtime import dicom

    head = fp.read(132)
    fp.seek(0)
    if head[128:132] != b"DICM":
        raise ImageError(
            f"{name} is not a DICOM file: a DICOM Structured Report is filed with the patient and study "
            "of a DICOM image, so it can only be written about one; ask about the DICOM image itself"
        )
    header = dicom.read_header_dataset(fp, name, max_pixels=max_pixels)
    with dicom.quietly():
        header.decode()  # text values to str with the file's own character set: the SR re-encodes them (UTF-8)
        missing = [_LABELS[k] for k in REQUIRED_UIDS if not str(header.get(k, "") or "").strip()]
    if missing:
        raise ImageError(
            f"{name}: the DICOM file has no {', '.join(missing)}, so a report cannot reference it or "
            "join its study; export the image from the PACS or the device again"
        )
    return SourceImage(header=header, frame=frame, name=name)
