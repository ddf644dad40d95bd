"""SmoothQuant's alpha for the int8 prefill graph, on the real-weights proxy: the prefill gate's own measurement
(export/prefill_gate.py: probe turns teacher-forced, top-1 agreement and mean KL against fp32) of the prefill graph
without smoothing and smoothed at each alpha, next to the calibrated int4 decode graph it would stand in for.

One calibrated pass: the fp32 bundle is quantized to int4 with `--prefill int8` (the pass's activation statistics
are kept from it), then each candidate prefill graph is encoded one layer at a time in memory and measured, as the
gate does at export. The probe turns are calibration.json pairs the pass does not use (prefill_gate.PAIR_OFFSET).

    python benchmarks/prefill_smoothing.py FP32_BUNDLE OUT [--alphas 0.5 0.65 0.8 0.9] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32_bundle", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.65, 0.8, 0.9])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import shutil
    from dataclasses import replace

    from skin_offline import names
    from skin_offline.export import prefill_gate as pg
    from skin_offline.export.codecs import QGemm
    from skin_offline.export.layerstream import GraphStack
    from skin_offline.export.quantize import QuantConfig, encode_cut, quantize_bundle
    from skin_offline.manifest import Flavor, Kernel, Manifest, Precision

    seen = {}
    real = pg.smoothed

    def keep(plan, act_absmax, alpha=None):  # what the export hands the gate: the plan and the pass's statistics
        seen["plan"], seen["act_absmax"] = plan, act_absmax
        return real(plan, act_absmax, alpha)

    pg.smoothed = keep
    shutil.rmtree(a.out, ignore_errors=True)
    t0 = time.perf_counter()
    quantize_bundle(a.fp32_bundle, a.out, QuantConfig("int4", prefill="int8"), quality=False, log=print)
    print(f"calibrated export: {time.perf_counter() - t0:.0f} s")
    src, s, m = a.fp32_bundle, Manifest.read(a.fp32_bundle), Manifest.read(a.out)
    dec32 = s.pick(names.ROLE_DECODER, Precision.FP32, Flavor.CONTRIB)
    decode = next(g for g in m.variants(names.ROLE_DECODER) if g.kernel != Kernel.QGEMM)
    groups = _groups(src, s, a.threads)
    plain = replace(
        seen["plan"], codecs={w: QGemm() if isinstance(c, QGemm) else c for w, c in seen["plan"].codecs.items()}
    )
    rows = []
    for alpha in [None, *a.alphas]:
        plan = plain if alpha is None else real(seen["plan"], seen["act_absmax"], alpha)
        t = time.perf_counter()
        cand = GraphStack(
            a.out / plan.dst_name, a.threads, model=plan.source.model, fill=lambda c, p=plan: encode_cut(p, c)
        )
        chk = pg.measure_prefill(
            GraphStack(src / dec32.file, a.threads), GraphStack(a.out / decode.file, a.threads), cand, groups
        )
        rows.append((alpha, chk))
        print(f"alpha {alpha}: {chk.describe()} ({time.perf_counter() - t:.0f} s)", flush=True)
    first = rows[0][1]
    print("\n| prefill graph | top-1 agreement | mean KL (nats) | passes the gate |\n| --- | --- | --- | --- |")
    print(
        f"| calibrated int4 decode graph (what it stands in for) | {first.decode_top1:.1%} | {first.decode_kl:.3f} | - |"
    )
    for alpha, chk in rows:
        what = "int8, no smoothing" if alpha is None else f"int8, smoothed, alpha {alpha}"
        print(f"| {what} | {chk.prefill_top1:.1%} | {chk.prefill_kl:.3f} | {chk.passed} |")


def _groups(src, s, threads):
    import numpy as np

    from skin_offline import names
    from skin_offline.export.prefill_gate import probe_groups
    from skin_offline.manifest import Precision
    from skin_offline.runtime.bundle import _load_table
    from skin_offline.runtime.tokenizer import TextTokenizer

    table, _ = _load_table(src, s, s.pick(names.ROLE_EMBEDDINGS, Precision.FP32))
    return probe_groups(
        TextTokenizer.from_file(src / names.TOKENIZER, s.tokens),
        lambda ids: np.asarray(table[np.asarray(ids, np.int64)], np.float32),
        src / s.pick(names.ROLE_VISION, Precision.FP32).file,
        s.preprocess,
        threads,
    )


if __name__ == "__main__":
    main()
