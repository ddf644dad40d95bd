"""Concurrent streams through skin-offline's server and llama.cpp's own server, driven by the same client code.

    python benchmarks/concurrency.py [--streams 1 2 4 8] [--rounds 2] [--new-tokens 128] [--prompt-tokens 600]
        [--threads 2] [--stagger 0.5] [--targets skin llama-server] [--bundle B] [--gguf G] [--out results/]

Targets (each a server subprocess on loopback, restarted per stream count with that many slots):
- `skin`: `skin-offline serve --parallel N` on the bench preset's int4 bundle (CACHE/models/bundle-bench-int4:
  int4 decode graph + int8 GEMM prefill graph), requests with the image (576 image tokens + a question padded
  to --prompt-tokens), OpenAI chat completions, streamed;
- `llama-server`: llama.cpp's server built by `compare.py setup` from the same sdist (`-np N`, continuous
  batching, the same flags as the other llama.cpp peers: see CACHE/llama-cmake-flags.txt), Q4_0 GGUF of the
  same weights, text-only prompts of the same token count (its LLaVA path is wrong upstream), `/completion`
  streamed with `ignore_eos`.
Each of N clients sends one request, client i starting `i * --stagger` seconds after the first, so requests are
admitted while others decode. Figures per target and N, medians over interleaved rounds: aggregate decode
tokens/s (tokens after each stream's first / wall from the first first token to the last token), per-stream
decode tokens/s (median), TTFT p50 / p95 (client side, queueing included), the worst gap between two
consecutive tokens any stream saw, and the server's peak RSS.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import compare  # noqa: E402  (cache layout, prompt padding, llama.cpp build facts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; `post(path, body)` streams SSE `data:` objects with their arrival times."""

    def __init__(self, cmd: list[str], port: int, log: Path, ready):
        self.port, self.log = port, open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not ready(self):
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(
                    f"server {cmd[0]} did not start ({compare.describe_exit(self.proc.returncode or 0)}); see {log}"
                )
            time.sleep(0.5)
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._watch_rss, daemon=True).start()

    def _watch_rss(self) -> None:
        import psutil

        p = psutil.Process(self.proc.pid)
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def status(self, path: str) -> int:
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            c.request("GET", path)
            code = c.getresponse().status
            c.close()
            return code
        except OSError:
            return 0

    def post(self, path: str, body: dict):
        """-> (start, [arrival time of each chunk carrying text])"""
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise SystemExit(f"{path}: HTTP {r.status}: {r.read()[:300]!r}")
        times = []
        for raw in r:
            if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                continue
            obj = json.loads(raw[6:])
            text = (
                obj.get("content")
                if "content" in obj
                else (obj["choices"][0]["delta"].get("content") if obj.get("choices") else None)
            )
            if text:
                times.append(time.perf_counter())
        conn.close()
        return t0, times

    def close(self) -> None:
        self._stop.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def skin_target(a, n: int):
    bundle = Path(a.bundle)
    q, _, _ = compare._prompt(bundle, a.prompt_tokens)
    from skin_offline.bench.run import demo_image

    buf = io.BytesIO()
    demo_image().save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    port = free_port()
    srv = Server(
        [
            sys.executable,
            "-m",
            "skin_offline.cli",
            "serve",
            "--bundle",
            str(bundle),
            "--port",
            str(port),
            "--parallel",
            str(n),
            "--max-queue",
            str(4 * n),
            "--threads",
            str(a.threads),
        ],
        port,
        Path(a.out) / "skin-serve.log",
        lambda s: s.status("/health") == 200,
    )

    def request(i: int):  # a different image per client: no prompt-cache hits between streams
        from PIL import Image

        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).rotate(90 * (i % 4) + i)
        b = io.BytesIO()
        img.save(b, format="PNG")
        body = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()},
                        },
                        {"type": "text", "text": q},
                    ],
                }
            ],
            "max_tokens": a.new_tokens,
            "temperature": 0,
            "stream": True,
        }
        return srv.post("/v1/chat/completions", body)

    return srv, request


def llama_target(a, n: int):
    binary = compare.llama_server_binary(Path(a.cache))
    if not binary.exists():
        raise SystemExit(f"{binary} missing: run `python benchmarks/compare.py setup`")
    ids = compare._text_only_ids(Path(a.bundle), a.prompt_tokens)
    port = free_port()
    ctx = n * (a.prompt_tokens + a.new_tokens + 64)  # -np slots share -c: each slot gets ctx / n
    srv = Server(
        [
            str(binary),
            "-m",
            a.gguf,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-np",
            str(n),
            "-c",
            str(ctx),
            "-t",
            str(a.threads),
            "-tb",
            str(a.threads),
            "--no-webui",
        ],
        port,
        Path(a.out) / "llama-server.log",
        lambda s: s.status("/health") == 200,
    )

    def request(i: int):  # a different first token per client: no shared prompt-cache prefix
        body = {
            "prompt": [ids[0], 100 + i, *ids[2:]],
            "n_predict": a.new_tokens,
            "ignore_eos": True,
            "stream": True,
            "temperature": 0,
            "cache_prompt": False,
        }
        return srv.post("/completion", body)

    return srv, request


TARGETS = {"skin": skin_target, "llama-server": llama_target}


def run_once(a, target: str, n: int) -> dict:
    srv, request = TARGETS[target](a, n)
    try:
        request(99)  # warm up: one full request (prefill + decode shapes)
        srv.peak_rss = 0
        out: list = [None] * n
        t_base = time.perf_counter()

        def client(i):
            time.sleep(max(0.0, t_base + i * a.stagger - time.perf_counter()))
            out[i] = request(i)

        ts = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        rss = srv.peak_rss
    finally:
        srv.close()
    firsts = [times[0] for _, times in out if times]
    ends = [times[-1] for _, times in out if times]
    ttft = sorted(times[0] - t0 for t0, times in out if times)
    decoded = sum(len(times) - 1 for _, times in out)
    gaps = [max((b - x for x, b in zip(times, times[1:])), default=0.0) for _, times in out]
    per = [(len(times) - 1) / (times[-1] - times[0]) for _, times in out if len(times) > 1]
    return {
        "target": target,
        "streams": n,
        "tokens": [len(t) for _, t in out],
        "aggregate_decode_tok_s": decoded / (max(ends) - min(firsts)) if decoded else 0.0,
        "per_stream_decode_tok_s": statistics.median(per) if per else 0.0,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p95_s": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
        "worst_gap_s": max(gaps),
        "peak_rss_bytes": rss,
    }


def main() -> None:
    cache = compare.DEFAULT_CACHE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(cache))
    ap.add_argument("--bundle", default=str(cache / "models" / "bundle-bench-int4"))
    ap.add_argument("--gguf", default=str(cache / "models" / "mistral-q4_0.gguf"))
    ap.add_argument("--streams", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--targets", nargs="*", default=list(TARGETS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--stagger", type=float, default=0.5, help="seconds between two clients' starts")
    ap.add_argument("--out", default="results/concurrency")
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for rnd in range(a.rounds):
        for n in a.streams:
            for t in a.targets if rnd % 2 == 0 else a.targets[::-1]:
                r = run_once(a, t, n)
                rows.append(r)
                print(
                    f"round {rnd + 1} {t} x{n}: aggregate {r['aggregate_decode_tok_s']:.1f} tok/s, per stream "
                    f"{r['per_stream_decode_tok_s']:.1f}, TTFT p50 {r['ttft_p50_s']:.2f} s p95 {r['ttft_p95_s']:.2f} s, "
                    f"worst gap {r['worst_gap_s']:.2f} s, RSS {r['peak_rss_bytes'] / 1e9:.2f} GB, tokens {r['tokens']}",
                    flush=True,
                )
    table = [
        "| target | streams | aggregate decode tok/s | per-stream tok/s | TTFT p50 s | TTFT p95 s | worst gap s | peak RSS GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in a.targets:
        for n in a.streams:
            rs = [r for r in rows if r["target"] == t and r["streams"] == n]
            med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731, B023 (used within this iteration)
            table.append(
                f"| {t} | {n} | {med('aggregate_decode_tok_s'):.1f} | {med('per_stream_decode_tok_s'):.1f} | "
                f"{med('ttft_p50_s'):.2f} | {med('ttft_p95_s'):.2f} | {med('worst_gap_s'):.2f} | "
                f"{med('peak_rss_bytes') / 1e9:.2f} |"
            )
    meta = {
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "threads": a.threads,
        "rounds": a.rounds,
        "stagger_s": a.stagger,
        "llama_cmake_flags": compare.llama_flags(Path(a.cache)),
    }
    text = (
        f"{a.prompt_tokens}-token prompts, {a.new_tokens} new tokens, {a.threads} threads, {a.rounds} interleaved "
        f"rounds (medians), clients {a.stagger} s apart; llama.cpp flags {meta['llama_cmake_flags']}\n\n"
        + "\n".join(table)
    )
    print(text)
    Path(a.out, "concurrency.md").write_text(text + "\n")
    Path(a.out, "concurrency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
