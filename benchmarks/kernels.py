"""One weight matrix through each of onnxruntime's CPU kernels, by rows per call: where the int8 GEMM graph pays.

    python benchmarks/kernels.py [--rows 1 2 4 8 16 32 64 256 600] [--threads 2] [--rounds 5] [--json F]

A one-node graph per kernel over the same 4096x14336 weight (Mistral-7B's MLP shape): MatMulNBits int4 and int8
(block 128, accuracy level 4, packed by onnxruntime's own packer), DynamicQuantizeMatMul int8 per column (the
QGEMM graph's op, export/codecs.py), the same after the smoothing Div (a calibrated bundle's prefill graph) and fp32
MatMul. Rounds are interleaved (every kernel at every row count,
then again), each cell a median of its runs, and the report gives medians over rounds, each kernel's time
relative to int4 at the same rows, and the crossover: the fewest rows where QGEMM beats int4 (what
runtime/kernels/policy.py's gemm_min_rows should be on this machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N, BLOCK = 4096, 14336, 128


def _session(nodes, inits, threads: int):
    g = helper.make_graph(
        nodes,
        "k",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.enable_cpu_mem_arena = threads, 1, False
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def sessions(threads: int) -> dict:
    from skin_offline.export.codecs import NBits, QGemm

    w = np.random.default_rng(0).standard_normal((K, N), dtype=np.float32) * 0.02  # [K,N]
    out = {}
    absmax = np.abs(np.random.default_rng(1).standard_normal(K)).astype(np.float32) + 1  # any statistics: same ops
    codecs = (
        ("int4 nbits", NBits(4, BLOCK)),
        ("int8 nbits", NBits(8, BLOCK)),
        ("int8 qgemm", QGemm()),
        ("int8 qgemm smoothed", QGemm(absmax)),
    )
    for name, codec in codecs:
        tensors = codec.encode("W", w)
        out[name] = _session(
            codec.nodes("A", "Y", "n", tensors, K, N),
            [numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in tensors],
            threads,
        )
    out["fp32"] = _session([helper.make_node("MatMul", ["A", "W"], ["Y"])], [numpy_helper.from_array(w, "W")], threads)
    return out


def measure(rows: list[int], threads: int, rounds: int) -> dict:
    ss = sessions(threads)
    x = {m: np.random.default_rng(m).standard_normal((m, K), dtype=np.float32) for m in rows}
    ms = {k: {m: [] for m in rows} for k in ss}
    for _ in range(rounds):
        for m in rows:
            for k, s in ss.items():
                s.run(None, {"A": x[m]})  # warm
                times = []
                for _ in range(3 if m >= 256 else 15):
                    t0 = time.perf_counter()
                    s.run(None, {"A": x[m]})
                    times.append(time.perf_counter() - t0)
                ms[k][m].append(1e3 * statistics.median(times))
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in ms.items()}
    cross = next((m for m in rows if med["int8 qgemm"][m] < med["int4 nbits"][m]), None)
    return {
        "rows": rows,
        "threads": threads,
        "rounds": rounds,
        "ms": med,
        "ms_range": {k: {m: (min(v), max(v)) for m, v in d.items()} for k, d in ms.items()},
        "qgemm_crossover_rows": cross,
    }


def table(r: dict) -> str:
    ks = list(r["ms"])
    out = [
        f"{K}x{N} weight, {r['threads']} threads, {r['rounds']} interleaved rounds, median ms (x int4 at the same rows)",
        "",
        "| rows | " + " | ".join(ks) + " |",
        "| --- |" + " --- |" * len(ks),
    ]
    for m in r["rows"]:
        base = r["ms"]["int4 nbits"][m]
        out.append(f"| {m} | " + " | ".join(f"{r['ms'][k][m]:.2f} ({r['ms'][k][m] / base:.2f}x)" for k in ks) + " |")
    out.append("")
    out.append(
        f"QGEMM beats int4 from {r['qgemm_crossover_rows']} rows"
        if r["qgemm_crossover_rows"]
        else "QGEMM never beats int4 at these rows"
    )
    return "\n".join(out)


def main() -> None:
    from skin_offline.bench.machine import cpu_features, cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 256, 600])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    r = measure(a.rows, a.threads, a.rounds)
    r["cpu"], r["cpu_features"] = cpu_model(), cpu_features()
    print(f"{r['cpu']} ({', '.join(r['cpu_features'])})")
    print(table(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
