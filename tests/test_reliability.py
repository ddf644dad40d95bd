"""Reliability matrix at the command line: bad images, bad questions, broken or hostile bundles.

Every case runs the real `skin-offline` in a subprocess (argv bytes included) and checks the
documented exit code (2 usage, 3 input, 4 bundle, 130 interrupted), exactly one `error:` line on
stderr and no traceback. The bad files are made here. API-level checks (cancellation, the
hash-at-load contract, a bundle replaced by a concurrent export) follow the matrix.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skin_offline import names
from skin_offline.commands.options import RANDOM_WEIGHTS_WARNING
from skin_offline.errors import BundleError
from skin_offline.manifest import file_entry

from conftest import random_image

QUESTION = "What is this lesion?"


# ------------------------------------------------------------------------------------ helpers


def _env(home: Path, extra: dict | None) -> dict:
    e = {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_DATA_HOME": str(home / "data"),
        "SKIN_OFFLINE_BUNDLE": None,
        "SKIN_OFFLINE_DEBUG": None,
    }
    e.update(extra or {})
    return e


def cli(*args, env: dict | None = None, home: Path, proc: bool = False) -> subprocess.CompletedProcess:
    """Run `skin-offline ARGS` with HOME / XDG dirs inside `home`.

    proc=True: a real `python -m skin_offline.cli` subprocess (argv bytes, signals, the real entry point).
    Default: in-process through typer's CliRunner (same command code, exit codes and stderr; no 1-2 s of
    interpreter start per case on a 2-core machine); an exception escaping the CLI counts as a traceback.
    """
    if proc:
        e = {k: v for k, v in {**os.environ, **_env(home, env)}.items() if v is not None}
        return subprocess.run(
            [sys.executable, "-m", "skin_offline.cli", *map(os.fsencode, args)], capture_output=True, env=e, timeout=120
        )
    from typer.testing import CliRunner

    from skin_offline.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env=_env(home, env))
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        err += "Traceback (escaped the CLI):\n" + "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout.encode(), err.encode())


def assert_one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == code, f"exit {r.returncode}, expected {code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    # one error line, and it is the last thing printed; before it may come the warning every front end prints for
    # the fixtures' random-weight bundles and progress lines of the work done until the failure (`verify` hashing)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert all(line == RANDOM_WEIGHTS_WARNING or ": " in line for line in lines[:-1]), err
    for n in needles:
        assert n.lower() in errors[0].lower(), (n, errors[0])
    return errors[0]


def clone(src: Path, dst: Path) -> Path:
    """Copy a bundle with hard links (cheap); use `rewrite` to change a file without touching `src`."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def rewrite(path: Path, data: bytes) -> None:
    path.unlink()  # break the hard link first
    path.write_bytes(data)


def edit_manifest(folder: Path, fn) -> None:
    m = json.loads((folder / names.MANIFEST).read_text())
    fn(m)
    rewrite(folder / names.MANIFEST, json.dumps(m).encode())


def relist(folder: Path, name: str) -> None:
    """Record a changed file's size and sha256 in the manifest, so only the check under test can object."""
    entry = file_entry(folder / name)
    edit_manifest(folder, lambda m: m[names.K_FILES].__setitem__(name, {"size": entry.size, "sha256": entry.sha256}))


def set_external_location(graph: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    n = 0
    for t in onnx.external_data_helper._get_all_tensors(model):
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = location
                n += 1
    assert n > 0
    graph.unlink()
    onnx.save(model, str(graph))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels (a decompression bomb's header) with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good_image(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "lesion.png"
    random_image(3, size=(40, 30)).save(p)
    return p


# ------------------------------------------------------------------------------ bad images: 3

IMAGES = {
    # name: (file name, bytes maker, needle in the message)
    "corrupt-jpeg": ("a.jpg", lambda: encoded(random_image(1), "JPEG")[:40] + bytes(range(256)) * 8, "a.jpg"),
    "truncated-png": ("a.png", lambda: encoded(random_image(2), "PNG")[:300], "a.png"),
    "zero-byte": ("empty.jpg", lambda: b"", "empty"),
    "text-as-jpg": ("notes.jpg", lambda: b"patient notes, not an image\n" * 3, "notes.jpg"),
    "heic": ("p.heic", lambda: b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "HEIC"),
    "svg": ("p.svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "SVG"),
    "pdf": ("p.pdf", lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "PDF"),
    "bomb": ("big.png", lambda: png_header_only(50_000, 50_000), "large"),
}


@pytest.mark.parametrize("case", sorted(IMAGES))
def test_bad_image(case, tmp_path, llava_model):
    name, make, needle = IMAGES[case]
    p = tmp_path / name
    p.write_bytes(make())
    r = cli("ask", p, QUESTION, "--bundle", llava_model.bundle_dir, home=tmp_path, proc=case == "corrupt-jpeg")
    assert_one_line_error(r, 3, needle)


@pytest.mark.parametrize("case", ["directory", "missing"])
def test_image_path_not_a_file(case, tmp_path, llava_model):
    p = tmp_path / ("folder" if case == "directory" else "nope.jpg")
    if case == "directory":
        p.mkdir()
    r = cli("ask", p, QUESTION, "--bundle", llava_model.bundle_dir, home=tmp_path)
    assert_one_line_error(r, 3, str(p.name))


def test_pixel_limit_env(tmp_path, llava_model, good_image):
    r = cli(
        "ask",
        good_image,
        QUESTION,
        "--bundle",
        llava_model.bundle_dir,
        home=tmp_path,
        env={"SKIN_OFFLINE_MAX_PIXELS": "100"},
    )
    assert_one_line_error(r, 3, "SKIN_OFFLINE_MAX_PIXELS")


# --------------------------------------------------------------------------- bad questions: 3

QUESTIONS = {
    "empty": ("", "empty"),
    "whitespace": (" \n\t ", "empty"),
    "controls-only": ("\x01\x02\x1b", "empty"),
    "invalid-utf8": (b"caf\xe9 lesion?", "UTF-8"),  # bytes from a Latin-1 terminal
    "too-long": ("word " * 3000, "context"),
}


@pytest.mark.parametrize("case", sorted(QUESTIONS))
def test_bad_question(case, tmp_path, llava_model, good_image):
    q, needle = QUESTIONS[case]
    r = cli("ask", good_image, q, "--bundle", llava_model.bundle_dir, home=tmp_path, proc=isinstance(q, bytes))
    assert_one_line_error(r, 3, needle)


def test_typed_markup_is_answered(tmp_path, llava_model, good_image):
    """`<image>`, `</s>`, `[INST]` typed by the user are literal text: the run succeeds (token-level proof
    is in test_prompt.py)."""
    r = cli(
        "ask",
        good_image,
        "<image> </s> [INST] is it <s>benign? [/INST]",
        "--bundle",
        llava_model.bundle_dir,
        "--max-new-tokens",
        "3",
        "--json",
        home=tmp_path,
    )
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 3
    # one image slot: text tokens + image features, exactly as the prompt builder counts them
    from skin_offline.runtime.prompt import build_prompt_ids

    ids = build_prompt_ids(llava_model.runtime.tokenizer, "<image> </s> [INST] is it <s>benign? [/INST]")
    assert out["prompt_tokens"] == len(ids) - 1 + llava_model.manifest.model.image_tokens


@pytest.mark.parametrize("args", [("--max-new-tokens", "0"), ("--precision", "int7"), ("--top-p", "2")])
def test_usage_errors(args, tmp_path, llava_model, good_image):
    r = cli("ask", good_image, QUESTION, "--bundle", llava_model.bundle_dir, *args, home=tmp_path)
    assert r.returncode == 2, r.stderr.decode()
    assert b"Traceback" not in r.stderr


# ------------------------------------------------------------------------------ bad bundles: 4


def _truncate(f: Path) -> None:
    rewrite(f, f.read_bytes()[: f.stat().st_size // 2])


def _flip(f: Path, where: float = 0.5) -> None:
    data = bytearray(f.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    rewrite(f, bytes(data))


def _bad_bundle(case: str, b: Path, outside: Path) -> None:
    dec, data = b / names.DECODER_GRAPH, b / names.external_data_name(names.DECODER_GRAPH)
    if case == "manifest-missing":
        (b / names.MANIFEST).unlink()
    elif case == "manifest-not-json":
        rewrite(b / names.MANIFEST, b"{ not json")
    elif case == "newer-schema":
        edit_manifest(b, lambda m: m.__setitem__(names.K_SCHEMA, names.SCHEMA_VERSION + 1))
    elif case == "missing-file":
        (b / names.TOKENIZER).unlink()
    elif case == "truncated-weights":
        _truncate(data)
    elif case == "truncated-graph-relisted":  # sizes/hashes agree, the protobuf itself is cut
        _truncate(dec)
        relist(b, names.DECODER_GRAPH)
    elif case == "bitflip-graph":
        _flip(dec)
    elif case == "traversal-file-name":
        edit_manifest(b, lambda m: m[names.K_FILES].__setitem__("../secret.txt", {"size": 1, "sha256": "0" * 64}))
    elif case == "traversal-graph-file":
        edit_manifest(b, lambda m: m[names.K_GRAPHS][1].__setitem__("file", "../other/decoder.onnx"))
    elif case == "traversal-external-data":  # weights read from a sibling folder (the file really exists)
        set_external_location(dec, f"../{outside.name}/{data.name}")
        relist(b, names.DECODER_GRAPH)
    elif case == "absolute-external-data":
        set_external_location(dec, str(outside / data.name))
        relist(b, names.DECODER_GRAPH)
    elif case == "symlink-outside":
        data.unlink()
        data.symlink_to(outside / data.name)
    else:
        raise AssertionError(case)


BUNDLE_CASES = {
    "manifest-missing": "not found",
    "manifest-not-json": "not valid JSON",
    "newer-schema": "upgrade skin-offline",
    "missing-file": "missing",
    "truncated-weights": "truncated",
    "truncated-graph-relisted": "not a valid ONNX",
    "bitflip-graph": "sha256",
    "traversal-file-name": "outside the bundle",
    "traversal-graph-file": "outside the bundle",
    "traversal-external-data": "refusing",
    "absolute-external-data": "refusing",
    "symlink-outside": "outside the bundle",
}


@pytest.mark.parametrize("case", sorted(BUNDLE_CASES))
def test_bad_bundle(case, tmp_path, llava_model, good_image):
    outside = clone(llava_model.bundle_dir, tmp_path / "elsewhere")
    b = clone(llava_model.bundle_dir, tmp_path / "bundle")
    _bad_bundle(case, b, outside)
    r = cli("ask", good_image, QUESTION, "--bundle", b, home=tmp_path, proc=case == "bitflip-graph")
    assert_one_line_error(r, 4, BUNDLE_CASES[case])


def test_missing_bundle_paths(tmp_path, llava_model, good_image):
    r = cli("ask", good_image, QUESTION, "--bundle", tmp_path / "nowhere", home=tmp_path, proc=True)
    assert_one_line_error(r, 4, "no bundle at", "skin-offline export")
    # no --bundle, no $SKIN_OFFLINE_BUNDLE: the default location under XDG_DATA_HOME is named
    r = cli("ask", good_image, QUESTION, home=tmp_path)
    assert_one_line_error(r, 4, str(tmp_path / "data" / "skin-offline" / "bundle"))
    r = cli("ask", good_image, QUESTION, "--bundle", good_image, home=tmp_path)  # a file, not a folder
    assert_one_line_error(r, 4, "not a folder")


@pytest.mark.parametrize(
    "target", [names.DECODER_GRAPH, names.external_data_name(names.DECODER_GRAPH), names.EMBEDDINGS, names.TOKENIZER]
)
def test_verify_catches_bitflip(target, tmp_path, llava_model):
    b = clone(llava_model.bundle_dir, tmp_path / "bundle")
    r = cli("verify", b, home=tmp_path)
    assert r.returncode == 0 and b"ok:" in r.stdout, r.stderr.decode()
    _flip(b / target, 0.7)
    r = cli("verify", b, home=tmp_path, proc=target == names.DECODER_GRAPH)
    assert_one_line_error(r, 4, target, "sha256")


def test_big_files_hashed_only_by_verify(tmp_path, llava_model, monkeypatch):
    """The documented contract: at load, files above HASH_AT_LOAD_MAX_BYTES get a size check only;
    `verify_bundle` hashes everything."""
    from skin_offline.runtime import bundle as bundle_mod

    b = clone(llava_model.bundle_dir, tmp_path / "bundle")
    _flip(b / names.external_data_name(names.DECODER_GRAPH))
    with pytest.raises(BundleError, match="sha256"):
        bundle_mod.Bundle.load(b, threads=1)  # the tiny bundle is under the threshold: hashed at load
    monkeypatch.setattr(bundle_mod, "HASH_AT_LOAD_MAX_BYTES", 1 << 20)  # now the 8 MB weights count as big
    bundle_mod.Bundle.load(b, threads=1)
    with pytest.raises(BundleError, match="sha256"):
        bundle_mod.verify_bundle(b)


def test_external_data_scan_matches_onnx(llava_model):
    """The runtime's protobuf scan lists the same external-data locations as the onnx package."""
    import onnx

    from skin_offline.runtime.external_data import external_locations

    for g in (names.VISION_GRAPH, names.DECODER_GRAPH):
        path = llava_model.bundle_dir / g
        model = onnx.load(str(path), load_external_data=False)
        want = [
            dict((kv.key, kv.value) for kv in t.external_data)["location"]
            for t in onnx.external_data_helper._get_all_tensors(model)
            if onnx.external_data_helper.uses_external_data(t)
        ]
        assert want and external_locations(path) == want


# ------------------------------------------------------------------ no code runs from a bundle/checkpoint


class _Payload:
    """Unpickling this runs a shell command that creates `marker`: proof if anything unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_embeddings_never_unpickled(tmp_path, llava_model, good_image):
    b = clone(llava_model.bundle_dir, tmp_path / "bundle")
    marker = tmp_path / "PWNED"
    arr = np.empty(2, dtype=object)
    arr[0] = _Payload(marker)
    (b / names.EMBEDDINGS).unlink()
    np.save(b / names.EMBEDDINGS, arr, allow_pickle=True)
    relist(b, names.EMBEDDINGS)
    r = cli("ask", good_image, QUESTION, "--bundle", b, home=tmp_path)
    assert_one_line_error(r, 4, "embedding table")
    assert not marker.exists()


def test_pickled_checkpoint_never_unpickled(tmp_path, llava_model):
    import torch

    ck = tmp_path / "ckpt"
    ck.mkdir()
    for f in llava_model.ckpt.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, ck / f.name)
    marker = tmp_path / "PWNED"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, ck / "pytorch_model.bin")
    r = cli("export", ck, tmp_path / "out", "--no-verify", home=tmp_path)
    assert_one_line_error(r, 4, "pytorch_model.bin")
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- cancellation: 130


def _terminal_sigint() -> None:
    """In the child before exec: SIGINT as a terminal user's shell leaves it (default action, not blocked), whatever
    this test process inherited (a test runner's worker may ignore or block it, and a child inherits both)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_prints_partial_answer(tmp_path, llava_model, good_image):
    import fcntl

    pipe = 4096  # the smallest pipe Linux makes (a page)
    n = 1800
    full = llava_model.runtime.ask(good_image, QUESTION, max_new_tokens=n)
    # more text than the pipe holds twice over: once this test stops reading, the child blocks writing, so the
    # interrupt always lands mid-answer, however fast the machine
    assert full.finish_reason == "length" and len(full.answer.encode()) > 2 * pipe
    e = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "c"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "skin_offline.cli", "ask", str(good_image), QUESTION]
    cmd += ["--bundle", str(llava_model.bundle_dir), "--max-new-tokens", str(n), "--threads", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, preexec_fn=_terminal_sigint)
    fcntl.fcntl(p.stdout.fileno(), fcntl.F_SETPIPE_SZ, pipe)  # before the child has printed anything (it is loading)
    first = p.stdout.read1(1 << 16)  # blocks until the first token is printed; then nothing is read until SIGINT
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    text = (first + out).decode()
    sig = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(("SigBlk", "SigIgn"))]
    assert p.returncode == 130, f"{err.decode()} (this process: {sig})"
    assert b"Traceback" not in err and b"[interrupted]" in err
    got = text.rstrip("\n")
    assert got and full.answer.startswith(got) and len(got) < len(full.answer)


def test_stdout_closed_early(tmp_path, llava_model, good_image):
    """`skin-offline ask ... | head -c 1`: the reader leaves; the CLI stops quietly (141), no traceback."""
    e = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "c")}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "skin_offline.cli",
            "ask",
            str(good_image),
            QUESTION,
            "--bundle",
            str(llava_model.bundle_dir),
            "--max-new-tokens",
            "600",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=e,
    )
    assert p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141, err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()


def test_cancel_event_and_closing_the_stream(llava_model, good_image):
    model = llava_model.runtime
    full = model.ask(good_image, QUESTION, max_new_tokens=40)
    assert full.finish_reason == "length"

    slots = model.engine.slots
    calls = []
    decode = slots.decode

    def counting(*a, **kw):
        calls.append(1)
        return decode(*a, **kw)

    slots.decode = counting  # the engine's decode steps
    try:
        # closing the generator cancels the request: at most the step already under way runs after close()
        s = model.stream(good_image, QUESTION, max_new_tokens=40)
        next(s)
        next(s)
        assert calls  # it is decoding
        s.close()
        n_calls = len(calls)
        deadline = time.monotonic() + 60
        while model.engine.stats().active and time.monotonic() < deadline:  # the row leaves its slot
            time.sleep(0.01)
        assert model.engine.stats().active == 0
        assert len(calls) <= n_calls + 1 < 40  # uncancelled, it would have decoded all 40 tokens first
        # the cancel Event: generation stops at the next token with finish_reason "cancelled"
        cancel = threading.Event()
        texts, last = [], None
        for i, r in enumerate(model.stream(good_image, QUESTION, max_new_tokens=40, cancel=cancel)):
            texts.append(r.text)
            last = r
            if i == 4:
                cancel.set()
        assert last.finish_reason == "cancelled"
        assert 5 <= last.timings.new_tokens < 40
        assert full.answer.startswith("".join(texts))
    finally:
        del slots.decode  # back to the class method


# ------------------------------------------------------------------ concurrent export vs reader


def _snapshot_ok(dest: Path) -> bool | None:
    """Read a bundle through one directory fd (an atomic view of whichever bundle sat at `dest` when it was
    opened). True: complete and consistent. None: that bundle was replaced and deleted while being read."""
    import hashlib

    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            with open(os.open(names.MANIFEST, os.O_RDONLY, dir_fd=fd), "rb") as f:
                manifest = json.loads(f.read())
            for name, entry in manifest[names.K_FILES].items():
                with open(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as f:
                    h = hashlib.sha256(f.read()).hexdigest()
                if h != entry["sha256"]:
                    return False
            return True
        except FileNotFoundError:
            return None if os.stat(dest).st_ino != os.fstat(fd).st_ino else False
    finally:
        os.close(fd)


def test_concurrent_export_never_half_written(tmp_path, llava_model):
    from skin_offline.export.factory import make_checkpoint
    from skin_offline.export.to_onnx import export_bundle

    other = tmp_path / "ckpt-b"
    make_checkpoint(other, layout="llava", preset_name="tiny", seed=1)
    dest = tmp_path / "live" / "bundle"
    export_bundle(llava_model.ckpt, dest, verify=False, log=lambda m: None)
    errors: list[BaseException] = []

    def writer():
        try:
            for i in range(4):
                export_bundle(other if i % 2 == 0 else llava_model.ckpt, dest, verify=False, log=lambda m: None)
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    seen = {True: 0, None: 0, False: 0}
    while t.is_alive():
        assert dest.is_dir()  # the swap is an exchange: the folder never disappears
        seen[_snapshot_ok(dest)] += 1
    t.join()
    assert not errors, errors
    assert seen[False] == 0 and seen[True] > 0, seen
    assert _snapshot_ok(dest) is True
    leftovers = [p.name for p in dest.parent.iterdir() if p.name != dest.name]
    assert leftovers == []
    # the last export (the first checkpoint) is what is there now, byte for byte
    want = json.loads((llava_model.bundle_dir / names.MANIFEST).read_text())[names.K_FILES]
    got = json.loads((dest / names.MANIFEST).read_text())[names.K_FILES]
    assert {k: v["sha256"] for k, v in got.items() if k != names.MANIFEST} == {
        k: v["sha256"] for k, v in want.items() if k != names.MANIFEST
    }
