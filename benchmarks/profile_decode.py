"""Where a decoded token's time goes: onnxruntime's per-node profile of the decode steps, per op type,
with the bytes each MatMul reads and the bandwidth it reaches, next to the machine's bandwidth probe.

    .venv/bin/python benchmarks/profile_decode.py BUNDLE [--precision int4] [--past 600] [--steps 32]
        [--threads 2] [--json OUT.json]

Runs the bundle's decoder (the graph the runtime would pick) through the runtime's own Decoder class with
onnxruntime profiling on: a prefill of `--past` random tokens, then `--steps` single-token steps. The
profile's node events inside each decode `model_run` are summed per op type. Reported per token:
- wall time of a decode step, time inside onnxruntime (`model_run`), and the Python time around it;
- per op type: microseconds, share, bytes of weights it reads, GB/s reached;
- the roofline (probe bandwidth / bytes per token) and the fraction of it reached.
A MatMul kernel that reaches well under the probe's GB/s on the same threads is compute (unpack/dot) bound,
not memory bound. `--kernel` adds the test that tells the two apart: one int4 MatMulNBits (the bundle's
block size and accuracy level 4) whose weights fit in the L2/L3 cache, run hot, against 16 copies of the
4096x14336 MLP weight (490 MB) run cold from DRAM. If the hot kernel moves far more bytes per second than
the cold one, decode is bound by DRAM bandwidth, not by the kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

_MATMULS = {"MatMulNBits", "MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "FusedMatMul"}
_BYTES = {
    1: 4,
    10: 2,
    2: 1,
    3: 1,
    7: 8,
    6: 4,
    16: 2,
}  # onnx TensorProto dtype -> bytes (float, fp16, u8, i8, i64, i32, bf16)


def initializer_bytes(graph_path: Path) -> dict[str, int]:
    """name -> bytes of every initializer (external data not loaded: only shapes and types are read)."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    return {t.name: int(np.prod(t.dims, dtype=np.int64)) * _BYTES.get(t.data_type, 4) for t in model.graph.initializer}


def node_weight_bytes(graph_path: Path) -> dict[str, tuple[str, int]]:
    """node name -> (op type, bytes of the initializers it reads)."""
    import onnx

    sizes = initializer_bytes(graph_path)
    model = onnx.load(str(graph_path), load_external_data=False)
    return {n.name: (n.op_type, sum(sizes.get(i, 0) for i in n.input)) for n in model.graph.node}


def profile(bundle: Path, precision: str | None, past: int, steps: int, threads: int) -> dict:
    import onnxruntime as ort

    from skin_offline import names
    from skin_offline.bench.machine import probe_bandwidth
    from skin_offline.manifest import Flavor
    from skin_offline.runtime.bundle import Bundle
    from skin_offline.runtime.decoder import make_decoder
    from skin_offline.runtime.sessions import SessionFactory

    b = Bundle.load(bundle, threads=threads, precision=precision, device="cpu")
    share = type(b.decoder).__name__ == "FastDecoder"  # the runtime's pick: contrib (GQA) graph on the CPU
    graph = bundle / b.manifest.pick(names.ROLE_DECODER, precision, Flavor.CONTRIB if share else Flavor.STANDARD).file
    del b.decoder
    so = SessionFactory(threads=threads).options()
    prof_dir = Path(tempfile.mkdtemp(prefix="skin-profile-"))
    so.enable_profiling = True
    so.profile_file_prefix = str(prof_dir / "decode")
    session = ort.InferenceSession(str(graph), sess_options=so, providers=["CPUExecutionProvider"])
    dec = make_decoder(session, b.manifest.model, share_buffer=share)
    rng = np.random.default_rng(0)
    _, cache = dec.forward(b.embed(rng.integers(3, b.manifest.model.vocab_size, past))[None], dec.empty_cache())
    walls = []
    for t in rng.integers(3, b.manifest.model.vocab_size, steps):
        e = b.embed([int(t)])[None]
        t0 = time.perf_counter()
        _, cache = dec.forward(e, cache)
        walls.append(time.perf_counter() - t0)
    trace = json.loads(Path(session.end_profiling()).read_text())

    runs = sorted(
        (e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    decode_runs = runs[1 + 2 :]  # the prefill, then 2 warm-up steps left out
    nodes = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    weights = node_weight_bytes(graph)
    per_op_us: dict[str, float] = defaultdict(float)
    per_op_bytes: dict[str, int] = defaultdict(int)
    runs = []  # (model_run us, its nodes' us) per decode step: nodes run one after another inside their run
    for r in decode_runs:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        inside = 0
        for e in nodes:
            if lo <= e["ts"] <= hi:
                node = e["name"][: -len("_kernel_time")]
                op = e.get("args", {}).get("op_name") or weights.get(node, ("?", 0))[0]
                per_op_us[op] += e["dur"]
                per_op_bytes[op] += weights.get(node, ("?", 0))[1]
                inside += e["dur"]
        runs.append((r["dur"], inside))
    n = max(1, len(decode_runs))
    run_us = statistics.median(r["dur"] for r in decode_runs)
    wall_ms = statistics.median(walls[2:]) * 1e3
    bw = probe_bandwidth(threads)
    # weights read per token: the MatMuls' (RoPE's cos/sin tables are initializers too, but one row is read)
    bytes_token = sum(
        v for o, v in per_op_bytes.items() if o in _MATMULS
    ) / n + 2 * b.manifest.model.num_layers * b.manifest.model.num_kv_heads * b.manifest.model.head_dim * 4 * (
        past + steps / 2
    )  # weights + the K and V read by attention
    ops = sorted(per_op_us, key=lambda o: -per_op_us[o])
    return {
        "graph": graph.name,
        "threads": threads,
        "past": past,
        "steps": len(decode_runs),
        "wall_ms_per_token": wall_ms,
        "onnxruntime_ms_per_token": run_us / 1e3,
        "python_ms_per_token": wall_ms - run_us / 1e3,
        "nodes_ms_per_token": statistics.median(x for _, x in runs) / 1e3,
        "runs_us": runs,  # medians, like Run's
        "bytes_per_token": bytes_token,
        "probe_gb_s": bw.gb_per_s,
        "probe_kernels": bw.kernels,
        "roofline_tok_s": bw.gb_per_s * 1e9 / bytes_token,
        "measured_tok_s": 1e3 / wall_ms,
        "ops": [
            {
                "op": o,
                "us_per_token": per_op_us[o] / n,
                "share": per_op_us[o] / sum(per_op_us.values()),
                "weight_mb_per_token": per_op_bytes[o] / n / 1e6,
                "gb_s": (per_op_bytes[o] / (per_op_us[o] * 1e-6) / 1e9) if per_op_bytes[o] else None,
            }
            for o in ops
        ],
    }


def _matmul_nbits_model(k: int, n: int, copies: int, block: int):
    """One input [1,K] feeding `copies` int4 MatMulNBits of [K,N] (random packed weights: speed only)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    for c in range(copies):
        packed = np.random.default_rng(c).integers(0, 255, (n, k // block, block // 2), dtype=np.uint8)  # [N, K/b, b/2]
        scales = np.full(n * (k // block), 0.01, np.float32)
        inits += [numpy_helper.from_array(packed, f"B{c}"), numpy_helper.from_array(scales, f"S{c}")]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["x", f"B{c}", f"S{c}"],
                [f"y{c}"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block,
                accuracy_level=4,
            )
        )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, [1, n]) for c in range(copies)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return model.SerializeToString(), (packed.nbytes + scales.nbytes) * copies


def kernel_ceiling(threads: int, block: int = 128, reps: int = 30) -> dict:
    """GB/s of the int4 MatMulNBits kernel with its weights hot in cache vs cold from DRAM (see the docstring)."""
    import onnxruntime as ort

    from skin_offline.runtime.sessions import SessionFactory

    out = {}
    for label, k, n, copies in (
        ("hot 4096x4096 (9 MB, cache)", 4096, 4096, 1),
        ("cold 16 x 4096x14336 (490 MB, DRAM)", 4096, 14336, 16),
    ):
        model, nbytes = _matmul_nbits_model(k, n, copies, block)
        s = ort.InferenceSession(model, SessionFactory(threads=threads).options(), providers=["CPUExecutionProvider"])
        x = {"x": np.random.default_rng(0).random((1, k), np.float32)}
        for _ in range(3):
            s.run(None, x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            s.run(None, x)
            times.append(time.perf_counter() - t)
        out[label] = nbytes / statistics.median(times) / 1e9
    return out


def report(r: dict) -> str:
    lines = [
        f"{r['graph']}: past {r['past']}, {r['steps']} decode steps, {r['threads']} threads",
        f"per token: wall {r['wall_ms_per_token']:.2f} ms ({r['measured_tok_s']:.1f} tok/s) = onnxruntime "
        f"{r['onnxruntime_ms_per_token']:.2f} ms + Python {r['python_ms_per_token']:.3f} ms; nodes {r['nodes_ms_per_token']:.2f} ms",
        f"bytes/token {r['bytes_per_token'] / 1e6:.0f} MB, probe {r['probe_gb_s']:.1f} GB/s -> roofline "
        f"{r['roofline_tok_s']:.1f} tok/s; reached {r['measured_tok_s'] / r['roofline_tok_s']:.0%}",
        "",
        "| op | us/token | share | weights MB/token | GB/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in r["ops"]:
        gbs = f"{o['gb_s']:.1f}" if o["gb_s"] else "-"
        lines.append(
            f"| {o['op']} | {o['us_per_token']:.0f} | {o['share']:.1%} | {o['weight_mb_per_token']:.1f} | {gbs} |"
        )
    if r.get("kernel_ceiling"):
        lines += ["", "int4 MatMulNBits kernel alone (accuracy level 4):"]
        lines += [f"  {k}: {v:.1f} GB/s" for k, v in r["kernel_ceiling"].items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision")
    p.add_argument("--past", type=int, default=600)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--kernel", action="store_true", help="also time the int4 kernel hot (cache) vs cold (DRAM)")
    a = p.parse_args()
    r = profile(a.bundle, a.precision, a.past, a.steps, a.threads)
    if a.kernel:
        r["kernel_ceiling"] = kernel_ceiling(a.threads)
    print(report(r))
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
