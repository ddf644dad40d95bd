"""DICOM SRs from the command line (`ask --sr`, `chat --sr`, real subprocesses) and the server (`"dicom_sr": true`,
raw HTTP and the official openai client): every report passes dciodvfy and says what `ask --json` printed; the
server's report has the CLI's content for the same request; refusals are one line and leave no file; the planted
patient data reaches the report and nothing else (stdout, stderr, error bodies, the server log)."""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from sr_helpers import (
    MF_GREY_BYTE_SC,
    MF_TRUE_COLOUR_SC,
    assert_patient_study_copied,
    assert_references,
    assert_valid,
    read_back,
    require_highdicom,
    stored,
    texts,
)
from test_image_formats import assert_clean, assert_one_line_error, cli
from test_serve_errors import check_error

import dicom_samples as S
from serve_helpers import Server, data_url, user

require_highdicom()

QUESTION = "What is this lesion?"
PX = S.rgb_pixels(64, 40, seed=7)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Stored images (study/series UIDs) with the planted patient data, in several kinds and transfer syntaxes."""
    d = tmp_path_factory.mktemp("sr-sources")
    frames = np.stack([255 - PX, PX, PX[::-1].copy()])
    grey = np.stack([S.grey_pixels(seed=i) for i in range(3)])
    kinds = {
        "IM000001": S.native(PX),  # dermoscopy, explicit VR little endian, no extension
        "photo-jpeg.dcm": S.encapsulated(
            S.native(PX, sop_class=S.VL_PHOTO), [S.pillow_jpeg(PX, 1)], uid.JPEGBaseline8Bit, "YBR_FULL_422"
        ),
        "rle.dcm": S.compressed(S.native(PX), uid.RLELossless),
        "multiframe.dcm": S.native(frames, frames=3, sop_class=MF_TRUE_COLOUR_SC),
        "grey-bigendian.dcm": S.native(
            S.grey_pixels(bits=12).astype(np.uint16),
            photometric="MONOCHROME1",
            bits_stored=12,
            ts=uid.ExplicitVRBigEndian,
        ),
        "grey-deflated-mf.dcm": S.native(
            grey, photometric="MONOCHROME2", frames=3, sop_class=MF_GREY_BYTE_SC, ts=uid.DeflatedExplicitVRLittleEndian
        ),
    }
    for name, ds in kinds.items():
        (d / name).write_bytes(stored(S.write(ds)))
    Image.fromarray(PX).save(d / "lesion.png")
    return d


def _ask(bundle, image, out, *extra):
    return cli("ask", image, QUESTION, "--bundle", bundle, "--max-new-tokens", 10, "--sr", out, *extra)


@pytest.mark.parametrize(
    "name,frame",
    [
        ("IM000001", 0),
        ("photo-jpeg.dcm", 0),
        ("rle.dcm", 0),
        ("multiframe.dcm", 2),
        ("grey-bigendian.dcm", 0),
        ("grey-deflated-mf.dcm", 1),
    ],
)
def test_ask_json_sr(llava_model, sources, tmp_path, name, frame):
    out = tmp_path / "answer-sr.dcm"
    r = _ask(llava_model.bundle_dir, sources / name, out, "--json", "--frame", frame)
    assert_clean(r)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert f"note: DICOM SR written to {out}" in r.stderr.splitlines()
    assert_valid(out)
    back, _, groups = read_back(out)
    assert texts(groups[0], "Question") == [QUESTION] and texts(groups[0], "Answer") == [printed["answer"]]
    assert back.CompletionFlag == ("PARTIAL" if printed["finish_reason"] == "length" else "COMPLETE")
    data = (sources / name).read_bytes()
    multi = name in ("multiframe.dcm", "grey-deflated-mf.dcm")
    assert_references(back, groups, data, [frame + 1] if multi else None)
    assert_patient_study_copied(back, data)
    assert S.PATIENT["PatientName"].encode() in out.read_bytes()  # the report is where patient data goes


def test_streamed_ask_and_chat_sr(llava_model, sources, tmp_path):
    """`ask --sr` while streaming writes the answer it printed; `chat --sr` writes one report for the conversation
    (one measurement group per turn, in order) when it ends."""
    b = llava_model.bundle_dir
    r = _ask(b, sources / "IM000001", tmp_path / "streamed.dcm")
    assert_clean(r)
    assert r.returncode == 0, r.stderr
    assert_valid(tmp_path / "streamed.dcm")
    _, _, groups = read_back(tmp_path / "streamed.dcm")
    assert texts(groups[0], "Answer") == [r.stdout[:-1]]  # the streamed text and its final newline
    questions = [QUESTION, "Is it benign?", "Größe in mm?"]
    r = cli(
        "chat",
        sources / "multiframe.dcm",
        "--frame",
        1,
        *sum((["-q", q] for q in questions), []),
        "--bundle",
        b,
        "--max-new-tokens",
        6,
        "--sr",
        tmp_path / "chat.dcm",
    )
    assert_clean(r)
    assert r.returncode == 0, r.stderr
    assert_valid(tmp_path / "chat.dcm")
    back, _, groups = read_back(tmp_path / "chat.dcm")
    assert [texts(g, "Question") for g in groups] == [[q] for q in questions]
    assert "".join(texts(g, "Answer")[0] + "\n" for g in groups) == r.stdout
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert_references(back, groups, (sources / "multiframe.dcm").read_bytes(), [2])
    # a chat that answered nothing writes nothing
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "skin_offline.cli",
            "chat",
            str(sources / "IM000001"),
            "--bundle",
            str(b),
            "--sr",
            str(tmp_path / "none.dcm"),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and not (tmp_path / "none.dcm").exists() and "no DICOM SR was written" in r.stderr


# ---------------------------------------------------------------- refusals: one line, no file, no patient data


def test_refusals_before_the_model_loads(llava_model, sources, tmp_path):
    b = llava_model.bundle_dir
    out = tmp_path / "x.dcm"
    assert_one_line_error(_ask(b, sources / "lesion.png", out), "lesion.png is not a DICOM file")
    no_uids = tmp_path / "IM000002"
    no_uids.write_bytes(S.write(S.native(PX)))  # no study / series UIDs
    assert_one_line_error(_ask(b, no_uids, out), "no Study Instance UID")
    assert not out.exists()
    out.write_bytes(b"keep me")
    r = _ask(b, sources / "IM000001", out)
    assert_clean(r)
    assert (
        r.returncode == 2
        and r.stderr.strip().splitlines()[-1].startswith("error: ")
        and "already exists; pass --force" in r.stderr
        and out.read_bytes() == b"keep me"
    )
    r = cli("chat", sources / "IM000001", "-q", QUESTION, "--bundle", b, "--sr", out)
    assert r.returncode == 2 and out.read_bytes() == b"keep me"
    r = _ask(b, sources / "IM000001", out, "--force")
    assert r.returncode == 0 and out.read_bytes()[128:132] == b"DICM"
    r = _ask(b, sources / "IM000001", tmp_path / "no" / "such" / "x.dcm")
    assert_clean(r)
    assert r.returncode == 1 and "folder" in r.stderr and "does not exist" in r.stderr
    assert "[" not in r.stderr  # refused before any answer


def _tmpfs(path: Path, size: str, readonly: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, f"mounting a test tmpfs failed (the CI machine runs as root and can): {r.stderr}"


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def test_unwritable_folder(llava_model, sources, tmp_path):
    """As root a read-only file system (root may write anywhere else); as a user, a folder without write permission."""
    folder = tmp_path / "ro"
    if os.geteuid() == 0:
        _tmpfs(folder, "1m", readonly=True)
    else:
        folder.mkdir()
        folder.chmod(0o555)
    try:
        r = _ask(llava_model.bundle_dir, sources / "IM000001", folder / "x.dcm")
        assert_clean(r)
        assert r.returncode == 1 and "is not writable" in r.stderr, r.stderr
        assert list(folder.iterdir()) == []
    finally:
        if os.geteuid() == 0:
            _umount(folder)


def test_disk_full_mid_write_leaves_no_file(llava_model, sources, tmp_path):
    """A real full disk (a 64 KiB tmpfs with one page left: the report is ~7 KB), as root; for everyone, a file-size
    limit (RLIMIT_FSIZE) that stops the write part-way. Either way: one line, exit 1, no report, no temporary file."""
    b = llava_model.bundle_dir
    folder = tmp_path / "small"
    folder.mkdir()

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "skin_offline.cli",
            "ask",
            str(sources / "IM000001"),
            QUESTION,
            "--bundle",
            str(b),
            "--max-new-tokens",
            "10",
            "--sr",
            str(folder / "x.dcm"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limited,
        env={k: v for k, v in os.environ.items() if k != "SKIN_OFFLINE_DEBUG"},
    )
    assert_clean(r)
    assert r.returncode == 1 and "nothing was written" in r.stderr and "x.dcm" in r.stderr, r.stderr
    assert list(folder.iterdir()) == []
    if os.geteuid() != 0:
        return  # mounting a tmpfs needs root (the CI machine runs as root)
    full = tmp_path / "full"
    _tmpfs(full, "64k")
    try:
        with open(full / "filler", "wb", buffering=0) as f:  # fill it, then free one 4 KiB page
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(full / "filler", os.path.getsize(full / "filler") - 4096)
        r = _ask(b, sources / "IM000001", full / "x.dcm")
        assert_clean(r)
        lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert r.returncode == 1 and len(lines) == 1 and "disk full while writing" in lines[0], r.stderr
        assert sorted(p.name for p in full.iterdir()) == ["filler"]
    finally:
        _umount(full)


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(llava_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("sr-server") / "server.log"
    s = Server(llava_model.bundle_dir, log=log)
    yield s
    assert s.stop() == 0


_VOLATILE = {"00080012", "00080013", "00080021", "00080023", "00080031", "00080033"}  # creation/series/content times


def _content(ds: pydicom.Dataset, keep: set[str]) -> dict:
    """The report's JSON model with new UIDs and creation times left out (UIDs of the source are kept)."""

    def strip(obj):
        if isinstance(obj, dict):
            out = {}
            for tag, el in obj.items():
                if tag in _VOLATILE or (isinstance(el, dict) and el.get("vr") == "DT"):  # DT: contribution times
                    continue
                if isinstance(el, dict) and el.get("vr") == "UI" and not set(el.get("Value", [])) <= keep:
                    continue
                out[tag] = strip(el)
            return out
        if isinstance(obj, list):
            return [strip(x) for x in obj]
        return obj

    return strip(ds.to_json_dict())


def test_server_returns_the_cli_report(server, llava_model, sources, tmp_path):
    """Same image, question and limit: the server's `dicom_sr` (raw HTTP and the openai client) has the content of
    the CLI's report, UIDs and times aside; it passes dciodvfy."""
    import openai

    name = "multiframe.dcm"
    data = (sources / name).read_bytes()
    r = cli(
        "ask",
        sources / name,
        QUESTION,
        "--bundle",
        llava_model.bundle_dir,
        "--max-new-tokens",
        10,
        "--json",
        "--sr",
        tmp_path / "cli.dcm",
    )
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    body = {"messages": [user(QUESTION, data_url(data, "application/dicom"))], "max_tokens": 10, "dicom_sr": True}
    reply = server.post(body)
    assert reply.status == 200, reply
    got = reply.json()
    assert got["choices"][0]["message"]["content"] == printed["answer"]
    (tmp_path / "server.dcm").write_bytes(base64.b64decode(got["dicom_sr"]))
    assert_valid(tmp_path / "server.dcm")
    src = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    keep = {
        src.SOPClassUID,
        src.SOPInstanceUID,
        src.StudyInstanceUID,
        src.SeriesInstanceUID,
        uid.Comprehensive3DSRStorage,
    }
    cli_ds, server_ds = pydicom.dcmread(tmp_path / "cli.dcm"), pydicom.dcmread(tmp_path / "server.dcm")
    assert _content(server_ds, keep) == _content(cli_ds, keep)
    # the frame: the server reads frame 0 of a multi-frame file; the CLI's default too
    _, _, groups = read_back(tmp_path / "server.dcm")
    assert_references(server_ds, groups, data, [1])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model_id = server.request("GET", "/v1/models").json()["data"][0]["id"]
    c = client.chat.completions.create(
        model=model_id, messages=body["messages"], max_tokens=10, extra_body={"dicom_sr": True}
    )
    sr_b64 = (c.model_extra or {})["dicom_sr"]
    assert _content(pydicom.dcmread(io.BytesIO(base64.b64decode(sr_b64))), keep) == _content(cli_ds, keep)
    # without the flag: no such field
    assert "dicom_sr" not in server.post({**body, "dicom_sr": False}).json()


def test_server_conversation_refusals_and_patient_data(server, sources):
    data = (sources / "IM000001").read_bytes()
    seen = []
    convo = [
        user("Is it benign?", data_url(data, "application/dicom")),
        {"role": "assistant", "content": "Probably."},
        user(QUESTION),
    ]
    reply = server.post({"messages": convo, "max_tokens": 6, "dicom_sr": True})
    assert reply.status == 200, reply
    body = reply.json()
    _, _, groups = read_back(base64.b64decode(body.pop("dicom_sr")))
    assert [texts(g, "Question") for g in groups] == [["Is it benign?"], [QUESTION]]
    assert texts(groups[0], "Answer") == ["Probably."]
    assert texts(groups[1], "Answer") == [body["choices"][0]["message"]["content"]]
    seen.append(json.dumps(body))
    png = io.BytesIO()
    Image.fromarray(PX).save(png, "PNG")
    r = server.post({"messages": [user(QUESTION, data_url(png.getvalue()))], "max_tokens": 6, "dicom_sr": True})
    e = check_error(r, 400, "invalid_image", "dicom_sr", "is not a DICOM file")
    assert e["message"].startswith("the request's image is not a DICOM file")
    seen.append(r.body.decode())
    no_uids = S.write(S.native(PX))
    r = server.post(
        {"messages": [user(QUESTION, data_url(no_uids, "application/dicom"))], "max_tokens": 6, "dicom_sr": True}
    )
    check_error(r, 400, "invalid_image", "dicom_sr", "no Study Instance UID")
    seen.append(r.body.decode())
    r = server.post(
        {"messages": [user(QUESTION, data_url(data, "application/dicom"))], "dicom_sr": True, "stream": True}
    )
    check_error(r, 400, "unsupported_parameter", "dicom_sr", "stream: false")
    r = server.post({"messages": [user(QUESTION, data_url(data, "application/dicom"))], "dicom_sr": "yes"})
    assert r.status == 400
    # still serving, nothing leaked in any body or the log
    assert (
        server.post({"messages": [user(QUESTION, data_url(data, "application/dicom"))], "max_tokens": 4}).status == 200
    )
    text = ("".join(seen) + server.log()).lower()
    for secret in S.SECRETS:
        assert secret.lower() not in text, secret


def test_constrained_answer_files_its_structured_value(llava_model, sources, tmp_path):
    """`ask --json-schema ... --sr`: the SR holds the answer and its parsed JSON (one item per key), as printed; a
    choice answer's text is its structured value; the server path carries the same."""
    schema = {
        "type": "object",
        "properties": {
            "next": {"enum": ["urgent", "routine", "no action"]},
            "size_mm": {"type": "integer", "minimum": 0, "maximum": 40},
        },
        "required": ["next", "size_mm"],
        "additionalProperties": False,
    }
    (tmp_path / "form.json").write_text(json.dumps(schema))
    out = tmp_path / "form-sr.dcm"
    r = cli(
        "ask",
        sources / "IM000001",
        QUESTION,
        "--bundle",
        llava_model.bundle_dir,
        "--max-new-tokens",
        40,
        "--sr",
        out,
        "--json-schema",
        tmp_path / "form.json",
        "--json",
    )
    assert_clean(r)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed["finish_reason"] == "stop" and printed["structured"] == json.loads(printed["answer"])
    assert_valid(out)
    _, _, groups = read_back(out)
    assert texts(groups[0], "Answer") == [printed["answer"]]
    [as_json] = texts(groups[0], "Structured answer (JSON)")
    assert json.loads(as_json) == printed["structured"]
    assert texts(groups[0], "Structured answer field") == [
        f"{k}: {json.dumps(v)}" for k, v in printed["structured"].items()
    ]
    out2 = tmp_path / "choice-sr.dcm"
    r = cli(
        "ask",
        sources / "IM000001",
        QUESTION,
        "--bundle",
        llava_model.bundle_dir,
        "--sr",
        out2,
        "--choice",
        "urgent",
        "--choice",
        "routine",
    )
    assert r.returncode == 0, r.stderr
    _, _, groups = read_back(out2)
    answer = r.stdout.strip()
    assert answer in ("urgent", "routine") and texts(groups[0], "Structured answer (JSON)") == [json.dumps(answer)]
