"""How often a quantized bundle's greedy answers change when requests share a batch (issue 13's int4/int8 note).

    python benchmarks/batch_divergence.py BUNDLE [--requests 16] [--parallel 8] [--new-tokens 64] [--precision P]

onnxruntime's quantized kernels sum in an order that depends on the rows of a call (and a hybrid bundle runs
batched steps on its int8 GEMM graph, single rows on int4), so a request decoded next to others can round
differently from the same request alone. This runs every request alone (one slot) and then all at once
(`--parallel` slots) and reports the share of answers that are identical and, for the others, where they first
differ. fp32 bundles are the control: the tests require them identical.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from PIL import Image


def main() -> None:
    from skin_offline.runtime.pipeline import SkinVL

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--precision")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((120 + 7 * i, 160, 3)) * 255).astype(np.uint8)) for i in range(a.requests)]
    questions = [f"Describe lesion {i}: colour, border and size." for i in range(a.requests)]
    one = SkinVL.load(a.bundle, threads=a.threads, precision=a.precision, parallel=1)
    one.prompt_cache.max_entries = 0
    alone = [one.ask(im, q, max_new_tokens=a.new_tokens).token_ids for im, q in zip(images, questions)]
    one.close()
    many = SkinVL.load(a.bundle, threads=a.threads, precision=a.precision, parallel=a.parallel)
    many.prompt_cache.max_entries = 0
    streams = [many.engine.submit(many.prepare(im, q, max_new_tokens=a.new_tokens)) for im, q in zip(images, questions)]
    batched = [list(list(s)[-1].tokens) for s in streams]
    firsts = [
        next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q)))
        for p, q in zip(alone, batched)
        if p != q
    ]
    same = a.requests - len(firsts)
    print(
        f"{a.bundle} ({many.bundle.picked['decoder'].precision.value}, prefill "
        f"{'int8 qgemm' if many.bundle.picked.get('multi_row') else 'decoder'}): {same}/{a.requests} answers identical "
        f"alone vs {a.parallel} at once ({a.new_tokens} tokens)"
        + (
            f"; the others first differ at token {statistics.median(firsts):.0f} (median, range {min(firsts)}-{max(firsts)})"
            if firsts
            else ""
        )
    )


if __name__ == "__main__":
    main()
