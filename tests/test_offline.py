"""Offline by construction, and nothing written that the user did not ask for.

1. Audit hook (portable): `export` (with its transformers verification) and `ask` run in a subprocess
   whose `sys.addaudithook` fails and records every socket connect other than AF_UNIX and every name
   lookup; none may happen. HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are removed from the environment:
   being offline must not depend on them. A control run proves the hook catches a connect.
2. strace (where installed): the same at the system-call level, so native code (onnxruntime,
   tokenizers, torch) is covered too; and the file writes: `ask` opens no file for writing at all,
   `export` writes only inside the bundle's parent folder and the temp dir, which it leaves clean.
3. Privacy scan: after export + ask with HOME, XDG_* and TMPDIR pointed at fresh folders, no file
   anywhere under them, the bundle or the working folder holds the question, the answer or the image.
4. onnxruntime's device-ID file: a plain `import onnxruntime` writes
   $XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime/ (the control); skin-offline sets
   ORT_DISABLE_TELEMETRY=1 before importing it, so export and ask leave XDG_CACHE_HOME empty.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import random_image

MARKER = "zebra-quokka-7781 lesion on the left forearm?"

DRIVER = textwrap.dedent(r"""
    import json, socket, sys

    events = []
    LOOKUPS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
               "socket.getnameinfo"}

    def hook(event, args):
        if event == "socket.connect" and getattr(args[0], "family", None) != socket.AF_UNIX:
            events.append([event, repr(args[1])])
            raise OSError("network access attempted (blocked by test_offline)")
        if event in LOOKUPS or event == "socket.sendto":
            events.append([event, repr(args)])
            raise OSError("name lookup attempted (blocked by test_offline)")

    sys.addaudithook(hook)
    out, control, commands = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3])
    from skin_offline.cli import app

    codes = []
    for argv in commands:
        try:
            app(argv)
        except SystemExit as e:
            codes.append(e.code or 0)
    if control:  # TEST-NET-1 address: never routable
        for attempt in (lambda: socket.create_connection(("192.0.2.1", 9), timeout=0.5),
                        lambda: socket.socket().connect(("192.0.2.1", 9))):
            try:
                attempt()
            except OSError:
                pass
    json.dump({"events": events, "codes": codes}, open(out, "w"))
""")


def _env(root: Path) -> dict:
    dirs = {
        k: root / k.lower()
        for k in ("HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "TMPDIR")
    }
    for d in dirs.values():
        d.mkdir(parents=True)
    drop = {
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "ORT_DISABLE_TELEMETRY",
        "SKIN_OFFLINE_BUNDLE",
    }
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({k: str(v) for k, v in dirs.items()}, PYTHONDONTWRITEBYTECODE="1")
    return env


def _private_dirs(env: dict) -> list[Path]:
    return [
        Path(env[k]) for k in ("HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "TMPDIR")
    ]


HAVE_STRACE = shutil.which("strace") is not None


@pytest.fixture(scope="module")
def run(tmp_path_factory, llava_model):
    """export (with verification), then ask, each under the audit hook (and strace where installed), in fresh
    private dirs."""
    root = tmp_path_factory.mktemp("offline")
    env = _env(root)
    work = root / "work"
    work.mkdir()
    image = root / "inputs" / "patient.png"
    image.parent.mkdir()
    random_image(11, size=(64, 48)).save(image)
    bundle = root / "out" / "bundle"
    steps = {
        "export": ["export", str(llava_model.ckpt), str(bundle)],
        "ask": ["ask", str(image), MARKER, "--bundle", str(bundle), "--max-new-tokens", "12", "--json"],
    }
    out = dict(root=root, env=env, work=work, image=image, bundle=bundle, events=[], codes=[], logs={}, stderr="")
    for name, argv in steps.items():
        events = root / f"{name}.events.json"
        cmd = [sys.executable, "-c", DRIVER, str(events), "0", json.dumps([argv])]
        if HAVE_STRACE:
            out["logs"][name] = root / f"{name}.strace"
            cmd = _strace_cmd(out["logs"][name]) + cmd
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        out["stderr"] += r.stderr
        if r.returncode != 0 and "ptrace" in r.stderr.lower():  # strace not permitted here: run without it
            out["logs"].pop(name)
            r = subprocess.run(
                cmd[cmd.index(sys.executable) :], cwd=work, env=env, capture_output=True, text=True, timeout=300
            )
        res = json.loads(events.read_text())
        out["events"] += res["events"]
        out["codes"] += res["codes"]
        if name == "ask" and r.stdout.strip():
            out["answer"] = json.loads(r.stdout.strip().splitlines()[-1]).get("answer")
    return out


def test_no_network_under_audit_hook(run):
    assert run["codes"] == [0, 0], run["stderr"]
    assert run["events"] == []


def test_audit_hook_control(tmp_path):
    """The hook is not blind: a deliberate connect is caught and recorded."""
    env = _env(tmp_path)
    out = tmp_path / "events.json"
    subprocess.run([sys.executable, "-c", DRIVER, str(out), "1", "[]"], env=env, check=True, timeout=120)
    events = json.loads(out.read_text())["events"]
    assert [e[0] for e in events] == ["socket.getaddrinfo", "socket.connect"]
    assert all("192.0.2.1" in e[1] for e in events)


def _files(folder: Path):
    return [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def test_nothing_private_written(run):
    answer = run.get("answer")
    assert answer is not None and len(answer) >= 8, run["stderr"]
    image_bytes = run["image"].read_bytes()
    needles = [MARKER.encode(), MARKER.encode("utf-16-le"), answer.encode(), image_bytes[len(image_bytes) // 2 :][:64]]
    # the private dirs stay empty: no caches, device ids, logs or temp files
    for d in _private_dirs(run["env"]):
        assert _files(d) == [], (d, _files(d))
    for f in _files(run["bundle"]) + _files(run["work"]):
        data = f.read_bytes()
        assert not any(n in data for n in needles), f


def test_onnxruntime_device_id_file(tmp_path, run):
    cache = Path(run["env"]["XDG_CACHE_HOME"])
    assert not (cache / "Microsoft").exists()  # export + ask above: nothing there
    # control: a plain import without our setting writes it (so the check above can fail)
    env = _env(tmp_path)
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True, timeout=120)
    written = _files(Path(env["XDG_CACHE_HOME"]))
    if not written:
        pytest.skip("this onnxruntime writes no device-ID file on import; nothing to prevent")
    assert any("DeveloperTools" in str(p) for p in written), written
    # and importing our runtime first keeps it away
    env = _env(tmp_path / "ours")
    subprocess.run(
        [sys.executable, "-c", "import skin_offline.runtime.sessions, onnxruntime"], env=env, check=True, timeout=120
    )
    assert _files(Path(env["XDG_CACHE_HOME"])) == []


# ------------------------------------------------------------------------- system-call level

_CALL = re.compile(r"^(?P<pid>\d+)\s+(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+|\?)")
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT")


def _strace_cmd(log: Path) -> list[str]:
    # --seccomp-bpf: only the traced calls stop the process (torch's import is otherwise 5x slower)
    return [
        "strace",
        "-f",
        "--seccomp-bpf",
        "-qq",
        "-o",
        str(log),
        "-e",
        "trace=%network,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,link,symlink",
    ]


def _strace(cmd: list[str], env: dict, cwd: Path, log: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_strace_cmd(log) + cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def _parse(log: Path):
    """(non-AF_UNIX socket calls, paths opened/created for writing) from an strace log."""
    net, writes = [], []
    for line in log.read_text().splitlines():
        m = _CALL.match(line)
        if not m:
            continue
        name, args = m["name"], m["args"]
        if (
            name in ("socket", "connect", "sendto", "sendmsg", "bind")
            and "AF_UNIX" not in args
            and "AF_NETLINK" not in args
        ):
            net.append(line)
        elif name == "openat" and any(f in args for f in _WRITE_FLAGS) and m["ret"] != "-1":
            writes.append(args.split('"')[1])
        elif name in ("creat", "mkdir", "mkdirat", "link", "symlink") and m["ret"] != "-1":
            writes.append(args.split('"')[1])
        elif name.startswith("rename") and m["ret"] != "-1":
            writes.append(args.split('"')[-2])  # the target
    return net, writes


needs_strace = pytest.mark.skipif(not HAVE_STRACE, reason="strace not installed")


def test_syscalls_export_and_ask(run):
    if set(run["logs"]) != {"export", "ask"}:
        pytest.skip("strace is not installed or cannot trace here")
    env, bundle = run["env"], run["bundle"]
    driver_out = {str(run["root"] / f"{n}.events.json") for n in ("export", "ask")}  # the test's own record
    net, writes = _parse(run["logs"]["export"])
    writes = [w for w in writes if w not in driver_out]
    assert net == []
    allowed = (str(bundle.parent) + "/", env["TMPDIR"] + "/", "/dev/")
    assert writes and all(w.startswith(allowed) or w == str(bundle.parent) for w in writes), writes
    assert _files(Path(env["TMPDIR"])) == []  # temp files (torch's) are gone
    net, writes = _parse(run["logs"]["ask"])
    writes = [w for w in writes if w not in driver_out]
    assert net == [] and [w for w in writes if not w.startswith("/dev/")] == []  # ask writes no file at all


@needs_strace
def test_strace_parser_control(tmp_path):
    """The parser sees a real TCP connect and a real file write (so the empty lists above mean something)."""
    code = (
        "import socket\ntry: socket.create_connection(('127.0.0.1', 9), timeout=0.5)\nexcept OSError: pass\n"
        f"open({str(tmp_path / 'w.txt')!r}, 'w').write('x')\n"
    )
    r = _strace([sys.executable, "-c", code], _env(tmp_path / "e"), tmp_path, tmp_path / "c.log")
    if r.returncode != 0:
        pytest.skip(f"strace cannot trace here: {r.stderr.strip()[:200]}")
    net, writes = _parse(tmp_path / "c.log")
    assert any("AF_INET" in n and "connect" in n for n in net), net
    assert str(tmp_path / "w.txt") in writes
