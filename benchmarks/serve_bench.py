"""Throughput and time to first token through `skin-offline serve` (HTTP, SSE) vs the same engine in-process.

    .venv/bin/python benchmarks/serve_bench.py --bundle BUNDLE [--clients 1 4 8] [--requests 3] [--max-tokens 64]
        [--parallel 8] [--threads 2] [--rounds 1] [--overhead-requests 30] [--json results/serve_bench.json]

One process loads the bundle and runs an `Engine` (the in-process baseline); a `skin-offline serve` subprocess
serves the same bundle with the same --parallel / --threads. For each client count, both paths run the same
requests (client k asks about its own image, each request a different question, greedy, streamed), in
alternating order per round (the machine is shared: compare within one run). Figures, medians over rounds:
- aggregate tokens/s: completion tokens of all requests / wall time of the run;
- TTFT p50 / p95: client-side, from the request leaving the client (in-process: before `prepare`, which
  decodes the image) to the first text delta;
- overhead per request: median latency of sequential one-token requests (same image: prefix cached),
  HTTP minus in-process: JSON, base64, admission, SSE / JSON framing and loopback TCP.
Random weights may emit EOS early: tokens actually generated are counted, not assumed.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, size: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def question(client: int, i: int) -> str:
    return f"Describe the lesion, its border and colour (client {client}, question {i})."


class Http:
    def __init__(self, bundle: Path, parallel: int, threads: int, log: Path):
        cmd = [
            sys.executable,
            "-m",
            "skin_offline.cli",
            "serve",
            "--bundle",
            str(bundle),
            "--port",
            "0",
            "--parallel",
            str(parallel),
            "--max-queue",
            str(8 * parallel),
            "--threads",
            str(threads),
        ]
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log)
        for raw in self.proc.stdout:
            line = raw.decode()
            if m := re.search(r"listening on \S+:(\d+)", line):
                self.port = int(m.group(1))
            if line.startswith("ready in"):
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stream(self, img: bytes, q: str, max_tokens: int) -> tuple[float, float | None, int]:
        """-> (start, first-delta time, completion tokens)"""
        body = json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64," + base64.b64encode(img).decode()},
                            },
                            {"type": "text", "text": q},
                        ],
                    }
                ],
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        first, tokens = None, 0
        for raw in r:
            if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                continue
            obj = json.loads(raw[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif first is None and obj["choices"] and obj["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
        conn.close()
        return t0, first, tokens

    def tiny(self, img: bytes) -> float:
        body = json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64," + base64.b64encode(img).decode()},
                            },
                            {"type": "text", "text": "Hi?"},
                        ],
                    }
                ],
                "max_tokens": 1,
            }
        )
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        conn.close()
        assert r.status == 200, r.status
        return time.perf_counter() - t0

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.log.close()


class InProcess:
    def __init__(self, bundle: Path, parallel: int, threads: int):
        from skin_offline.runtime.engine import Engine
        from skin_offline.runtime.pipeline import SkinVL

        self.model = m = SkinVL.load(bundle, threads=threads)
        self.engine = Engine.for_bundle(
            m.bundle, m.tokenizer, m.vision, parallel=parallel, max_queue=8 * parallel, prompt_cache=m.prompt_cache
        )

    def stream(self, img: bytes, q: str, max_tokens: int):
        t0 = time.perf_counter()
        s = self.engine.submit(self.model.prepare(img, q, max_new_tokens=max_tokens))
        first, last = None, None
        for r in s:
            if first is None and r.text:
                first = time.perf_counter()
            last = r
        return t0, first, last.timings.new_tokens

    def tiny(self, img: bytes) -> float:
        t0 = time.perf_counter()
        for _ in self.engine.submit(self.model.prepare(img, "Hi?", max_new_tokens=1)):
            pass
        return time.perf_counter() - t0

    def close(self):
        self.engine.close(cancel=True, timeout=30)


def run(path, clients: int, requests: int, max_tokens: int, images: list[bytes]) -> dict:
    def client(k):
        return [path.stream(images[k], question(k, i), max_tokens) for i in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ttft = sorted(f - s for s, f, _ in rows if f is not None)
    tokens = sum(n for _, _, n in rows)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))],
        "requests": len(rows),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=3, help="requests per client per run")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=None, help="engine slots (default: the largest --clients)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=336)
    ap.add_argument("--overhead-requests", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    parallel = a.parallel or max(a.clients)
    images = [image_bytes(k, a.image_size) for k in range(max(a.clients))]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "serve_bench_server.log"
    local, remote = InProcess(a.bundle, parallel, a.threads), Http(a.bundle, parallel, a.threads, log)
    out = {"bundle": str(a.bundle), "parallel": parallel, "threads": a.threads, "max_tokens": a.max_tokens, "rows": []}
    try:
        for path in (local, remote):  # warm-up: sessions, caches, thread pools
            path.stream(images[0], "Warm up?", 4)
            path.tiny(images[0])
        for c in a.clients:
            res = {"in-process": [], "http": []}
            for rnd in range(a.rounds):
                order = [("in-process", local), ("http", remote)]
                for name, path in order if rnd % 2 == 0 else order[::-1]:
                    res[name].append(run(path, c, a.requests, a.max_tokens, images))
            row = {"clients": c}
            for name, runs in res.items():
                row[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            out["rows"].append(row)
            print(_fmt(row), flush=True)
        lat = {"in-process": [], "http": []}
        for i in range(a.overhead_requests):
            for name, path in (
                (("in-process", local), ("http", remote)) if i % 2 == 0 else (("http", remote), ("in-process", local))
            ):
                lat[name].append(path.tiny(images[0]))
        out["overhead"] = {k: statistics.median(v) for k, v in lat.items()}
        o = out["overhead"]
        print(
            f"overhead per request (one-token requests, median of {a.overhead_requests}): in-process "
            f"{o['in-process'] * 1e3:.1f} ms, http {o['http'] * 1e3:.1f} ms, +{(o['http'] - o['in-process']) * 1e3:.1f} ms"
        )
    finally:
        remote.close()
        local.close()
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))
    return 0


def _fmt(row) -> str:
    i, h = row["in-process"], row["http"]
    return (
        f"{row['clients']} client(s): tokens/s in-process {i['tok_s']:.1f} http {h['tok_s']:.1f} "
        f"({h['tok_s'] / i['tok_s']:.2f}x); TTFT p50 {i['ttft_p50']:.3f} / {h['ttft_p50']:.3f} s, "
        f"p95 {i['ttft_p95']:.3f} / {h['ttft_p95']:.3f} s; tokens {i['tokens']} / {h['tokens']}"
    )


if __name__ == "__main__":
    sys.exit(main())
