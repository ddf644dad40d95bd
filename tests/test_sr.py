"""DICOM Structured Reports through the Python API (skin_offline.sr): one for every kind of DICOM file the loader reads
(each transfer syntax, photometric interpretation and bit depth of test_dicom.py, lossy codecs, multi-frame with a
frame K), with the model's real answer; every report passes dciodvfy and is read back with pydicom and highdicom.
Also: structured answers, partial answers, UTF-8, sources a report cannot be made from, atomic writing, and patient
data that never reaches a warning, a log record or an exception.

The CLI and the server are in test_sr_cli.py."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import warnings

import numpy as np
import pydicom
import pytest
import test_dicom as D
from pydicom import uid
from sr_helpers import (
    MF_GREY_BYTE_SC,
    MF_TRUE_COLOUR_SC,
    assert_patient_study_copied,
    assert_references,
    assert_valid,
    dciodvfy,
    read_back,
    require_highdicom,
    stored,
    texts,
)

from skin_offline.errors import ImageError, SkinOfflineError, UsageError
from skin_offline.runtime.image import ImageSource, load_image

import dicom_samples as S

require_highdicom()
from skin_offline import sr  # noqa: E402

QUESTION = "What is this lesion? Describe its colour and border."
RGB = S.rgb_pixels()


def _frames():
    return np.stack([RGB, 255 - RGB, RGB[::-1].copy()])


def _multiframe(kind: str) -> bytes:
    """Three frames in a multi-frame SOP class (Multi-frame True Colour / Grayscale Byte Secondary Capture)."""
    frames = _frames()
    if kind == "jpeg":
        streams = [S.pillow_jpeg(f, 0, quality=100) for f in frames]
        ds = S.encapsulated(
            S.native(frames, frames=3, sop_class=MF_TRUE_COLOUR_SC), streams, uid.JPEGBaseline8Bit, "YBR_FULL"
        )
    elif kind == "grey-deflated":
        grey = np.stack([S.grey_pixels(seed=i) for i in range(3)])
        ds = S.native(
            grey, photometric="MONOCHROME2", frames=3, sop_class=MF_GREY_BYTE_SC, ts=uid.DeflatedExplicitVRLittleEndian
        )
    else:
        ds = S.native(frames, frames=3, sop_class=MF_TRUE_COLOUR_SC)
        if kind == "rle":
            ds = S.compressed(ds, uid.RLELossless)
    return S.write(ds)


LOSSY = {
    "jpeg-baseline-YBR_FULL_422": lambda: S.write(
        S.encapsulated(S.native(RGB), [S.pillow_jpeg(RGB, 1)], uid.JPEGBaseline8Bit, "YBR_FULL_422")
    ),
    "jpeg-baseline-grey": lambda: S.write(
        S.encapsulated(
            S.native(S.grey_pixels(), photometric="MONOCHROME2"),
            [S.pillow_jpeg(S.grey_pixels(), 0)],
            uid.JPEGBaseline8Bit,
        )
    ),
    "j2k-lossy-YBR_ICT": lambda: S.write(
        S.encapsulated(S.native(RGB), [S.pillow_j2k(RGB, lossless=False)], uid.JPEG2000, "YBR_ICT")
    ),
    "jpegls-near-lossless": lambda: S.write(S.compressed(S.native(RGB), uid.JPEGLSNearLossless, jls_error=3)),
    "vl-photographic": lambda: S.write(S.native(RGB, sop_class=S.VL_PHOTO)),
}
# name -> (source bytes without study UIDs, frame asked, expected Referenced Frame Number)
CASES = {
    **{name: (lambda b=build: b()[0], 0, None) for name, build in D.EXACT.items()},
    **{name: (build, 0, None) for name, build in LOSSY.items()},
    **{
        f"multiframe-{k}-frame-{f}": (lambda k=k: _multiframe(k), f, [f + 1])
        for k, f in (("native", 2), ("rle", 1), ("jpeg", 2), ("grey-deflated", 1), ("native", 0))
    },
}


@pytest.fixture(scope="module")
def model(llava_model):
    return llava_model.runtime


@pytest.mark.parametrize("case", list(CASES))
def test_report_for_every_kind_the_loader_reads(case, model, tmp_path):
    build, frame, frame_numbers = CASES[case]
    data = stored(build())
    load_image(ImageSource(data, frame))  # the loader reads it (the report is about an image it can answer on)
    answer = model.ask(ImageSource(data, frame), QUESTION, max_new_tokens=8)
    ds = sr.answer_report(model, ImageSource(data, frame), QUESTION, answer)
    path = sr.write_report(ds, tmp_path / "answer.dcm")
    assert_valid(path)
    back, doc, groups = read_back(path)
    assert back.SOPClassUID == uid.Comprehensive3DSRStorage and back.Modality == "SR"
    assert back.VerificationFlag == "UNVERIFIED" and back.PreliminaryFlag == "PRELIMINARY"
    assert back.CompletionFlag == ("PARTIAL" if str(answer.finish_reason) == "length" else "COMPLETE")
    assert len(groups) == 1
    assert texts(groups[0], "Question") == [QUESTION]
    assert texts(groups[0], "Answer") == [_dicom_text(answer.answer)]
    assert_references(back, groups, data, frame_numbers)
    assert_patient_study_copied(back, data)


def _dicom_text(s: str) -> str:
    """The rule written independently of the product: DICOM text allows LF, FF, CR and no other control character
    (dciodvfy refuses TAB as well), so TAB reads back as a space and each other C0 control (and DEL) as U+FFFD."""
    return "".join(
        " " if c == "\t" else "\ufffd" if (ord(c) < 32 and c not in "\n\f\r") or ord(c) == 127 else c for c in s
    )


def test_the_validator_catches_a_broken_report(model, tmp_path):
    """dciodvfy can fail: the same report without its Completion Flag, and with a frame number for a single-frame
    SOP class, is reported as errors."""
    data = stored(S.write(S.native(RGB)))
    ds = sr.answer_report(model, data, QUESTION, "a naevus")
    del ds.CompletionFlag
    ds.ContentSequence[-2].ContentSequence[0].ContentSequence[-3].ReferencedSOPSequence[0].ReferencedFrameNumber = 1
    sr.write_report(ds, tmp_path / "broken.dcm")
    errors, _ = dciodvfy(tmp_path / "broken.dcm")
    assert any("Completion Flag" in e or "CompletionFlag" in e for e in errors), errors
    assert any("ReferencedFrameNumber" in e for e in errors), errors


def _producer(**kw):
    base = dict(
        model_name="SkinVL-PubMM",
        precision="int4",
        bundle_fingerprint="ab" * 32,
        source_fingerprint="cd" * 8,
        random_weights=False,
    )
    return sr.Producer(**{**base, **kw})


def test_structured_answer_partial_answer_and_history(tmp_path):
    """A constrained answer's JSON value is one TEXT item (its JSON) plus one per top-level key; a conversation is
    one measurement group per turn; an answer cut by the length limit makes the document PARTIAL and says so."""
    data = stored(S.write(S.native(RGB)))
    structured = {
        "diagnosis": "melanoma",
        "confidence": 0.82,
        "features": ["asymmetry", "blue-white veil"],
        "benign": False,
    }
    turns = [
        sr.Turn("Is it symmetric?", "No.", None),
        sr.Turn(QUESTION, '{"diagnosis": "melanoma", ...}', "length", structured),
    ]
    ds = sr.structured_report(data, turns, _producer())
    path = sr.write_report(ds, tmp_path / "structured.dcm")
    assert_valid(path)
    back, _, groups = read_back(path)
    assert back.CompletionFlag == "PARTIAL"
    assert [texts(g, "Question") for g in groups] == [["Is it symmetric?"], [QUESTION]]
    assert texts(groups[0], "Comment") == []
    assert any("cut at the length limit" in c for c in texts(groups[1], "Comment"))
    [as_json] = texts(groups[1], "Structured answer (JSON)")
    assert json.loads(as_json) == structured
    fields = texts(groups[1], "Structured answer field")
    assert fields == [f"{k}: {json.dumps(v)}" for k, v in structured.items()]
    # identical turns, all complete: COMPLETE
    ds = sr.structured_report(data, [sr.Turn("q", "a", "stop")], _producer())
    assert ds.CompletionFlag == "COMPLETE"


def test_device_observer_and_algorithm_name_the_model(tmp_path):
    data = stored(S.write(S.native(RGB)))
    path = sr.write_report(
        sr.structured_report(data, [sr.Turn("q", "a", "stop")], _producer(random_weights=True)), tmp_path / "who.dcm"
    )
    back, doc, groups = read_back(path)
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in back.ContentSequence}
    assert items["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
    assert items["Device Observer Name"].TextValue == "SkinVL-PubMM"
    assert items["Device Observer Model Name"].TextValue == "SkinVL-PubMM int4"
    assert items["Device Observer Manufacturer"].TextValue == "skin-offline"
    assert (
        back.Manufacturer == "skin-offline"
        and back.SoftwareVersions == sr.Producer.__dataclass_fields__["software_version"].default
    )
    algo = {
        i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue
        for i in groups[0][0].ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeMeaning.startswith("Algorithm")
    }
    assert algo["Algorithm Name"] == "SkinVL-PubMM"
    params = [
        i.TextValue
        for i in groups[0][0].ContentSequence
        if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"
    ]
    assert params == [
        "precision=int4",
        f"bundle_sha256={'ab' * 32}",
        f"checkpoint_fingerprint={'cd' * 8}",
        "random_weights=yes",
    ]
    comments = [
        i.TextValue
        for c in back.ContentSequence
        if c.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"
        for i in c.ContentSequence
    ]
    assert any("not a diagnosis" in c for c in comments) and any("random weights" in c for c in comments)
    assert "not a diagnosis" in back.SeriesDescription


def test_producer_from_a_loaded_model(model, llava_model):
    from skin_offline.manifest import Manifest

    p = sr.Producer.from_model(model)
    m = Manifest.read(llava_model.bundle_dir)
    assert p.model_name == llava_model.ckpt.name and p.random_weights is True
    assert p.precision == model.bundle.picked["decoder"].precision.value
    assert len(p.bundle_fingerprint) == 64 and p.source_fingerprint == m.source["fingerprint"]
    assert sr.Producer.from_manifest(m, p.precision).bundle_fingerprint == p.bundle_fingerprint


def test_utf8_only_when_the_text_needs_it(tmp_path):
    """Source in Latin-1 with an umlaut in the name: the report says ISO_IR 192 and holds the same characters;
    an ASCII-only report states no character set (the default repertoire)."""
    latin = stored(S.write(S.native(RGB, SpecificCharacterSet="ISO_IR 100")), PatientName="Müller^Jürgen")
    for data, question, answer, want in (
        (latin, "q", "a", "ISO_IR 192"),
        (stored(S.write(S.native(RGB))), "Größe?", "5 mm – naevus", "ISO_IR 192"),
        (stored(S.write(S.native(RGB))), "q", "a", None),
    ):
        path = sr.write_report(
            sr.structured_report(data, [sr.Turn(question, answer, "stop")], _producer()),
            tmp_path / "cs.dcm",
            force=True,
        )
        assert_valid(path)
        back, _, groups = read_back(path)
        assert back.get("SpecificCharacterSet") == want
        assert texts(groups[0], "Question") == [question] and texts(groups[0], "Answer") == [answer]
        assert_patient_study_copied(back, data)
    assert str(pydicom.dcmread(path).PatientName) == S.PATIENT["PatientName"]
    back = pydicom.dcmread(io.BytesIO(latin))
    assert str(back.PatientName) == "Müller^Jürgen"


def test_control_characters_become_replacement_characters(tmp_path):
    data = stored(S.write(S.native(RGB)))
    path = sr.write_report(
        sr.structured_report(data, [sr.Turn("q\x07", "a\x00b\x1bc\td\ne", "stop")], _producer()), tmp_path / "ctl.dcm"
    )
    assert_valid(path)
    _, _, groups = read_back(path)
    assert texts(groups[0], "Answer") == ["a\ufffdb\ufffdc d\ne"] and texts(groups[0], "Question") == ["q\ufffd"]


def test_single_frame_sop_class_with_frames_says_which_frame_in_words(model, tmp_path):
    """Some devices write several frames into a single-frame SOP class (dermoscopy here): a reference may not name
    a frame there (dciodvfy errs), so the report references the instance and says which frame the model saw."""
    data = stored(S.write(S.native(_frames(), frames=3)))
    ds = sr.answer_report(model, ImageSource(data, 2), QUESTION, "a naevus")
    path = sr.write_report(ds, tmp_path / "frames.dcm")
    assert_valid(path)
    back, _, groups = read_back(path)
    assert_references(back, groups, data, None)
    assert "The model saw frame 3 of the image's 3 frames." in texts(groups[0], "Comment")


def test_source_defects_are_copied_exactly_not_fixed(tmp_path):
    """A report copies the patient/study modules exactly, defects included: the plain samples' invalid Study Date and
    incomplete Other Patient IDs item. dciodvfy then reports for the report only what it reports for the source in
    those modules; values highdicom itself would refuse (a Patient's Sex of 'U') are carried over too."""
    data = stored(
        S.write(S.native(RGB)),
        StudyDate=S.INVALID_DATE,
        PatientSex="U",
        OtherPatientIDsSequence=pydicom.dcmread(io.BytesIO(S.write(S.native(RGB)))).OtherPatientIDsSequence,
    )
    path = sr.write_report(sr.structured_report(data, [sr.Turn("q", "a", "stop")], _producer()), tmp_path / "d.dcm")
    (tmp_path / "src.dcm").write_bytes(data)
    errors, _ = dciodvfy(path)
    source_errors, _ = dciodvfy(tmp_path / "src.dcm")
    assert errors and all(
        ("Study Date" in e or "TypeOfPatientID" in e or "Patient's Sex" in e or "invalid data values" in e)
        for e in errors
    ), errors
    assert any("Study Date" in e for e in source_errors) and any("TypeOfPatientID" in e for e in source_errors)
    back, _, _ = read_back(path)
    assert back.StudyDate == S.INVALID_DATE and back.PatientSex == "U"
    assert_patient_study_copied(back, data)


# ---------------------------------------------------------------- sources a report cannot be made from


def test_refused_sources_one_line_without_patient_data(tmp_path):
    png = tmp_path / "lesion.png"
    from PIL import Image

    Image.fromarray(RGB).save(png)
    no_uids = S.write(S.native(RGB))  # the plain samples have no study / series UIDs
    cases = [
        (png, "is not a DICOM file"),
        (png.read_bytes(), "<image bytes> is not a DICOM file"),
        (no_uids, "no Study Instance UID, Series Instance UID"),
        (S.write_bare(S.native(RGB, ts=uid.ImplicitVRLittleEndian)), "is not a DICOM file"),
        (S.write(S.native(RGB))[:300], "has no SOP Class UID"),  # cut inside the header
        (tmp_path / "missing.dcm", "cannot read the image"),
    ]
    for src, needle in cases:
        with pytest.raises(ImageError) as e:
            sr.structured_report(src, [sr.Turn("q", "a")], _producer())
        msg = str(e.value)
        assert needle in msg and "\n" not in msg, msg
        D._assert_no_secret(*D._chain(e.value))
    with pytest.raises(ImageError, match="needs the DICOM file itself"):
        sr.read_source(np.zeros((4, 4, 3), np.uint8))


def test_highdicom_failure_is_our_one_line_error(monkeypatch):
    """Whatever highdicom raises (its messages may quote values) becomes a ReportError naming the file and the
    exception type only, without the original attached."""
    from skin_offline.sr import document

    def boom(*a, **k):
        raise ValueError(f"bad value {S.PATIENT['PatientName']}")

    monkeypatch.setattr(document, "build", boom)
    with pytest.raises(sr.ReportError) as e:
        sr.structured_report(stored(S.write(S.native(RGB))), [sr.Turn("q", "a")], _producer())
    assert "ValueError" in str(e.value) and e.value.exit_code == 3
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)
    D._assert_no_secret(str(e.value))


def test_missing_extra_names_it(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_highdicom(name, *a, **k):
        if name == "highdicom" or name.startswith("highdicom."):
            raise ImportError("hidden by the test")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_highdicom)
    with pytest.raises(UsageError, match=r"pip install 'skin-offline\[dicom-sr\]'"):
        sr.structured_report(b"", [sr.Turn("q", "a")], _producer())


def test_nothing_logged_or_warned_even_with_pydicom_debug(caplog, capfd, tmp_path):
    """With pydicom's debug logging on (it logs every element it reads, values included: the control shows it) and
    highdicom's loggers at DEBUG, building and writing a report logs nothing, warns nothing and prints nothing."""
    data = stored(S.write(S.native(RGB)), StudyDate=S.INVALID_DATE, PatientSex="U")
    pydicom.config.debug(True)
    try:
        with caplog.at_level(logging.DEBUG):
            logging.getLogger("highdicom").setLevel(logging.DEBUG)
            pydicom.dcmread(io.BytesIO(data))  # control
            control = caplog.text + capfd.readouterr().err
            assert any(s in control for s in S.SECRETS), control
            caplog.clear()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                ds = sr.structured_report(data, [sr.Turn("q", "a", "stop")], _producer())
                sr.write_report(ds, tmp_path / "quiet.dcm")
            logged = list(caplog.records)
    finally:
        pydicom.config.debug(False)
        logging.getLogger("highdicom").setLevel(logging.NOTSET)
    out = capfd.readouterr()
    assert logged == [] and seen == [], (caplog.text, [str(w.message) for w in seen])
    D._assert_no_secret(out.out, out.err)
    assert S.PATIENT["PatientName"].encode() in (tmp_path / "quiet.dcm").read_bytes()  # the report itself has them


# ---------------------------------------------------------------- writing


def test_write_is_atomic_and_keeps_existing_files(tmp_path):
    data = stored(S.write(S.native(RGB)))
    ds = sr.structured_report(data, [sr.Turn("q", "a", "stop")], _producer())
    path = sr.write_report(ds, tmp_path / "a.dcm")
    first = path.read_bytes()
    assert (path.stat().st_mode & 0o777) == 0o600  # patient data: the owner's only
    with pytest.raises(sr.ReportExists, match="already exists; pass --force") as e:
        sr.write_report(sr.structured_report(data, [sr.Turn("q", "b", "stop")], _producer()), path)
    assert e.value.exit_code == 2 and path.read_bytes() == first
    sr.write_report(sr.structured_report(data, [sr.Turn("q", "b", "stop")], _producer()), path, force=True)
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dcm"]  # no temporary file left
    with pytest.raises(sr.ReportWriteError, match="is a folder"):
        sr.write_report(ds, tmp_path)
    with pytest.raises(sr.ReportWriteError, match="does not exist"):
        sr.write_report(ds, tmp_path / "nope" / "a.dcm")


def test_a_write_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC after part of the bytes: no report file and no temporary file; the error says disk full."""
    from skin_offline.sr import atomic

    real = os.fdopen

    class Filling(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def write(self, b):
            self.f.write(bytes(b)[: len(b) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: Filling(real(fd, mode)))
    data = stored(S.write(S.native(RGB)))
    with pytest.raises(sr.ReportWriteError, match="disk full while writing .*nothing was written") as e:
        sr.write_report(sr.structured_report(data, [sr.Turn("q", "a")], _producer()), tmp_path / "full.dcm")
    assert isinstance(e.value, SkinOfflineError) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
