"""Decode speed with a clinic-form JSON schema vs unconstrained, 1 and 8 streams, and the mask's cost per token.

    .venv/bin/python benchmarks/constrained_decode.py --bundle bundles/bench-int4 [--threads 2] [--rounds 3]
        [--new-tokens 64] [--streams 1 8] [--json]

Each round runs, alternating which goes first, N concurrent requests (different images, one prompt each) with the
clinic form of tests/constraint_cases.py and the same N unconstrained. Decode tokens/s is every generated token after
each request's first one over the wall time from the first token to the last (the prefills are excluded: both sides
prefill the same prompts); medians over rounds and the constrained/unconstrained ratio. Mask cost per token: the
time llguidance spent computing a row's mask (in a worker thread, while the decoder runs) and the time the engine
waited for it before sampling (what lands on the decode path), p50 / p99 over every constrained token.
The form ends with a free-text note (maxLength 2000), so a random-weight model's constrained answers run to
--new-tokens like the unconstrained ones: both sides decode the same number of tokens per request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def instrument():
    """Wrap Matcher's mask computation and the engine's wait for it with timers (seconds per call)."""
    from skin_offline.runtime import constraints

    fill, allowed = constraints.Matcher._fill, constraints.Matcher.allowed
    times = {"compute": [], "wait": []}
    lock = threading.Lock()

    def timed_fill(self):
        t = time.perf_counter()
        fill(self)
        with lock:
            times["compute"].append(time.perf_counter() - t)

    def timed_allowed(self):
        t = time.perf_counter()
        pending = self._pending
        if pending is not None:
            pending.result()
        waited = time.perf_counter() - t
        out = allowed(self)
        with lock:
            times["wait"].append(waited if pending is not None else time.perf_counter() - t)
        return out

    constraints.Matcher._fill, constraints.Matcher.allowed = timed_fill, timed_allowed
    return times


def run(model, n: int, constraint, new_tokens: int, rng_seed: int) -> tuple[float, int]:
    """n requests at once -> (decode tokens/s, tokens)."""
    from PIL import Image

    rng = np.random.default_rng(rng_seed)
    images = [Image.fromarray((rng.random((160 + 9 * i, 200, 3)) * 255).astype(np.uint8)) for i in range(n)]
    reqs = [
        model.prepare(img, "Fill in the clinic form for this lesion.", max_new_tokens=new_tokens, constraint=constraint)
        for img in images
    ]
    firsts, lasts, counts = [], [], []

    def consume(stream):
        first = None
        for r in stream:
            if first is None and (r.text or r.finish_reason is not None):
                first = time.perf_counter()
        firsts.append(first)
        lasts.append(time.perf_counter())
        counts.append(r.timings.new_tokens)

    streams = [model.engine.submit(r) for r in reqs]
    ts = [threading.Thread(target=consume, args=(s,)) for s in streams]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    tokens = sum(c - 1 for c in counts)
    return tokens / max(1e-9, max(lasts) - min(firsts)), sum(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from skin_offline.runtime.constraints import JsonSchema
    from skin_offline.runtime.pipeline import SkinVL

    from constraint_cases import CLINIC_FORM

    times = instrument()
    model = SkinVL.load(a.bundle, threads=a.threads, parallel=max(a.streams))
    model.prompt_cache.max_entries = 0  # every request prefills its own prompt, both sides alike
    # the clinic form and a free-text note after it, long enough that both sides generate exactly --new-tokens
    # (a random-weight model fills the note until the limit): the same tokens per request, per-token cost compared
    form = JsonSchema(
        {
            **CLINIC_FORM,
            "properties": {**CLINIC_FORM["properties"], "notes": {"type": "string", "maxLength": 2000}},
            "required": [*CLINIC_FORM["required"], "notes"],
        }
    )
    from PIL import Image

    model.ask(Image.new("RGB", (64, 64)), "warm-up", max_new_tokens=4, constraint=form)  # tokenizer, sessions
    times["compute"].clear()
    times["wait"].clear()
    res: dict = {n: {"constrained": [], "free": [], "tokens": {"constrained": [], "free": []}} for n in a.streams}
    for i in range(a.rounds):
        for n in a.streams:
            order = [("constrained", form), ("free", None)]
            for side, c in order if i % 2 == 0 else order[::-1]:
                rate, tokens = run(model, n, c, a.new_tokens, 100 * i + n)
                res[n][side].append(rate)
                res[n]["tokens"][side].append(tokens)
                print(f"round {i + 1}, {n} stream(s), {side}: {rate:.1f} tok/s ({tokens} tokens)", file=sys.stderr)
    model.close()
    pct = {k: (float(np.percentile(v, 50)) * 1e3, float(np.percentile(v, 99)) * 1e3) for k, v in times.items() if v}
    if a.json:
        print(json.dumps({"results": res, "mask_ms_p50_p99": pct}))
        return
    print(f"{a.bundle.name}, {a.threads} threads, {a.rounds} interleaved rounds (medians), clinic-form JSON schema")
    print("| streams | unconstrained tok/s | constrained tok/s | ratio |")
    print("| --- | --- | --- | --- |")
    for n in a.streams:
        f, c = statistics.median(res[n]["free"]), statistics.median(res[n]["constrained"])
        print(f"| {n} | {f:.1f} | {c:.1f} | {c / f:.2f}x |")
    for k, (p50, p99) in pct.items():
        print(f"mask {k} per token: p50 {p50:.3f} ms, p99 {p99:.3f} ms")


if __name__ == "__main__":
    main()
