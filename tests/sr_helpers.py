"""Shared by the SR tests: the independent validator (dciodvfy), stored-image sources, and reading a report back with
pydicom and highdicom."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom import uid

import dicom_samples as S

REQUIRE_ENV = "SKIN_OFFLINE_REQUIRE_DCIODVFY"  # .ci/run sets it: the validity tests fail, never skip, without it
MF_TRUE_COLOUR_SC = "1.2.840.10008.5.1.4.1.1.7.4"  # Multi-frame True Color Secondary Capture Image Storage
MF_GREY_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte Secondary Capture Image Storage
# dciodvfy's warnings that every report gets, and why they are fine: our private coding scheme (declared in the
# Coding Scheme Identification Sequence; Question/Answer have no standard code), and DICOMDIR hints about type 2
# study attributes the source leaves empty
ALLOWED_WARNINGS = (
    "Unrecognized defined term <99SKINOFFLINE> for value 1 of attribute <Coding Scheme Designator>",
    "Missing attribute or value that would be needed to build DICOMDIR",
)


def require_highdicom() -> None:
    """The `dicom-sr` extra: a skip on a developer's machine without it, a failure under CI (the Makefile installs
    it there)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        import highdicom  # noqa: F401  ImportError fails the module
    else:
        pytest.importorskip("highdicom")


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dciodvfy reports for a file."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail("dciodvfy is not installed (Debian package dicom3tools; .ci/run installs it)")
        pytest.skip("dciodvfy not installed: apt-get install dicom3tools")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (r.stdout + r.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def assert_valid(path: Path) -> list[str]:
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    assert all(any(a in w for a in ALLOWED_WARNINGS) for w in warnings), warnings
    return warnings


def stored(data: bytes, **attrs) -> bytes:
    """A test file as a PACS stores it: the same pixels and transfer syntax, plus study/series UIDs and a valid
    study date (dicom_samples.clinical) and any `attrs`."""
    ds = pydicom.dcmread(io.BytesIO(data))
    return S.write(S.with_attrs(ds, **{**S.clinical(), **attrs}))


def read_back(path_or_bytes):
    """(pydicom Dataset, highdicom Comprehensive3DSR, its TID 1500 measurement groups)."""
    import highdicom as hd

    raw = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    ds = pydicom.dcmread(io.BytesIO(raw))
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    return ds, sr, report.get_image_measurement_groups()


def texts(group, meaning: str) -> list[str]:
    """The TEXT items of a measurement group whose concept name means `meaning`."""
    return [
        item.TextValue
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def patient_study_keywords() -> list[str]:
    """Root attributes of the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study
    modules (the standard's tables as highdicom ships them)."""
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map

    attrs = get_module_attribute_map()
    modules = [m["key"] for m in get_iod_module_map()["comprehensive-3d-sr"] if m["ie"] in ("Patient", "Study")]
    return [str(a["keyword"]) for m in modules for a in attrs[m] if not a["path"]]


def assert_patient_study_copied(sr: pydicom.Dataset, source: bytes) -> None:
    """Every patient/study attribute the source has is in the report with the same value; the type 2 ones the
    source lacks are present and empty."""
    src = pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True)
    copied = 0
    for kw in patient_study_keywords():
        if kw in src:
            assert kw in sr and sr[kw].value == src[kw].value, kw
            copied += 1
    assert copied >= 8
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        assert kw in sr, kw
        if kw not in src:
            assert sr[kw].value in ("", None), kw


def assert_references(sr: pydicom.Dataset, groups, source: bytes, frame_numbers: list[int] | None) -> None:
    """The evidence and every IMAGE reference point at the source's SOP instance (and frame)."""
    src = pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True)
    ev = sr.CurrentRequestedProcedureEvidenceSequence
    assert len(ev) == 1 and ev[0].StudyInstanceUID == src.StudyInstanceUID == sr.StudyInstanceUID
    series = ev[0].ReferencedSeriesSequence
    assert len(series) == 1 and series[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in series[0].ReferencedSOPSequence] == [
        (src.SOPClassUID, src.SOPInstanceUID)
    ]
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID and sr.SOPInstanceUID != src.SOPInstanceUID
    images = list(_image_items(sr))
    assert len(images) == 1 + len(groups)  # the image library entry and each measurement group's source image
    for item in images:
        [ref] = item.ReferencedSOPSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
        got = ref.get("ReferencedFrameNumber")
        got = (
            None
            if got is None
            else [int(x) for x in (got if isinstance(got, (list, pydicom.multival.MultiValue)) else [got])]
        )
        assert got == frame_numbers, (got, frame_numbers)
    for g in groups:
        assert [(s.referenced_sop_class_uid, s.referenced_sop_instance_uid) for s in g.source_images] == [
            (src.SOPClassUID, src.SOPInstanceUID)
        ]


def _image_items(item):
    for child in item.get("ContentSequence", []):
        if child.ValueType == "IMAGE":
            yield child
        yield from _image_items(child)


__all__ = [
    "ALLOWED_WARNINGS",
    "require_highdicom",
    "MF_GREY_BYTE_SC",
    "MF_TRUE_COLOUR_SC",
    "assert_patient_study_copied",
    "assert_references",
    "assert_valid",
    "dciodvfy",
    "read_back",
    "stored",
    "texts",
    "uid",
]
