"""Helpers for the server tests: a real `skin-offline serve` subprocess, raw HTTP, data URLs."""

from __future__ import annotations

import atexit
import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import random_image

START_TIMEOUT_S = 120  # a bound for a hung start on a loaded 2-core machine, not a performance figure
_STARTED: list = []  # every server a test started: killed at exit if a failed test left one running


@atexit.register
def _kill_leftovers():
    for s in _STARTED:
        s.kill()


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_url(seed: int, size=(97, 61)) -> str:
    return data_url(png_bytes(random_image(seed, size=size)))


def user(question: str, url: str | None = None) -> dict:
    if url is None:
        return {"role": "user", "content": question}
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
    }


class Server:
    """`python -m skin_offline.cli serve --port 0 ...` with stdout parsed for the URL and stderr in a log file."""

    def __init__(self, bundle: Path, *args, log: Path, env: dict | None = None, wait_ready: bool = True):
        self.log_path = log
        cmd = [
            sys.executable,
            "-m",
            "skin_offline.cli",
            "serve",
            "--bundle",
            str(bundle),
            "--port",
            "0",
            "--threads",
            "1",
            *map(str, args),
        ]
        e = {k: v for k, v in os.environ.items() if k != "SKIN_OFFLINE_API_KEY"}
        e.update(env or {})
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=e)
        _STARTED.append(self)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._url = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._url.wait(START_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"server printed no URL; stdout {self.lines}, log {self.log()}")
        if wait_ready:
            self.wait_ready()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            m = re.search(r"listening on (\S+):(\d+)", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                self._url.set()
            if line.startswith("ready in"):
                self._ready.set()
        self._url.set()

    def wait_ready(self):
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"server never ready; stdout {self.lines}, log {self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60):
        return request(self.port, method, path, body, headers, timeout)

    def post(self, body, headers=None, timeout: float = 60):
        return self.request("POST", "/v1/chat/completions", body, headers, timeout)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()  # a server that did not stop in time is killed, never left running

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._log.closed:
            self._log.close()


class Reply:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, {k.lower(): v for k, v in headers}, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"Reply({self.status}, {self.body[:300]!r})"


def request(port: int, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        h = {"content-type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return Reply(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


def sse_events(resp) -> list:
    """Read an SSE response (http.client) to its end: ("data", obj | "[DONE]") and ("comment", text) events."""
    out = []
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("data: "):
            payload = line[6:]
            out.append(("data", payload if payload == "[DONE]" else json.loads(payload)))
        elif line.startswith(":"):
            out.append(("comment", line[1:].strip()))
    return out


def open_stream(port: int, body: dict, timeout: float = 60, headers: dict | None = None):
    """POST a streaming request; returns (connection, response) for the caller to read or drop."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps({**body, "stream": True}),
        headers={"content-type": "application/json", **(headers or {})},
    )
    return conn, conn.getresponse()


def drop(conn) -> None:
    """Close the client's socket at once (a client that goes away)."""
    try:
        conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


def wait_for(pred, timeout: float = 30, every: float = 0.02):
    """Poll `pred` until truthy (returns it) or the bound passes (returns the last value)."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(every)


def log_line(server: Server, request_id: str, timeout: float = 30) -> str | None:
    def find():
        for line in server.log().splitlines():
            if f" {request_id} " in line:
                return line
        return None

    return wait_for(find, timeout)


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total
