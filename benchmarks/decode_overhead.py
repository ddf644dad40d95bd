"""Decode ms/token of the standard vs the contrib (GQA, share-buffer) decoder, and the Python time per token.

    .venv/bin/python benchmarks/decode_overhead.py [--layers 2] [--past 600] [--steps 16] [--rounds 5]
        [--threads 2] [--preset bench] [--precision fp32|int4|int8] [--folder /tmp/skin-decode-bench] [--json]

Builds both decoder graphs once (random weights, the preset's exact widths, `--layers` layers; the same
weights in both) with the exporter's own graph builders (and, with --precision int4/int8, quantizes both
with export/quantize.py's streaming MatMulNBits pass at its defaults), fills a KV cache of `--past` tokens, then decodes
`--steps` tokens per round with each decoder, alternating within every round (the machine is shared and
noisy: compare within one run). Disk: the bench preset at 2 layers writes 4.6 GB of fp32 graphs (+1.6 GB
with --precision int4) under --folder; delete it when done. Reports medians:
- ms/token of each decoder and their ratio;
- Python overhead per token: the decoder's forward() time outside session.run / run_with_iobinding;
- loop overhead per token: the rest of a generation step (embedding lookup + greedy sampling).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import numpy as np


class TimedSession:
    """Forwards to an onnxruntime session and adds up the seconds spent inside Run."""

    def __init__(self, session):
        self._s, self.inside = session, 0.0

    def run(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self._s.run(*a, **kw)
        finally:
            self.inside += time.perf_counter() - t

    def run_with_iobinding(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self._s.run_with_iobinding(*a, **kw)
        finally:
            self.inside += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self._s, name)


def _random_tensor_fn(spec, seed: int = 0):
    """Deterministic per-name random weights, so both graphs get identical tensors without holding them."""
    D = spec.head_dim
    shapes = {
        "q_proj": (spec.heads * D, spec.hidden),
        "k_proj": (spec.kv_heads * D, spec.hidden),
        "v_proj": (spec.kv_heads * D, spec.hidden),
        "o_proj": (spec.hidden, spec.heads * D),
        "gate_proj": (spec.mlp, spec.hidden),
        "up_proj": (spec.mlp, spec.hidden),
        "down_proj": (spec.hidden, spec.mlp),
        "lm_head": (spec.vocab, spec.hidden),
    }

    def tensor(name: str) -> np.ndarray:
        rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")])
        if name.endswith("norm.weight"):
            return rng.uniform(0.5, 1.5, spec.hidden).astype(np.float32)
        shape = next(v for k, v in shapes.items() if k in name)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    return tensor


def build(preset: str, layers: int, folder: Path, **widths):
    """Both decoder graphs of `preset` widths (overridden by `widths`: hidden, heads, kv_heads, mlp) with `layers`
    layers in `folder` (reused when present)."""
    from skin_offline import names
    from skin_offline.export.checkpoint import TextSpec
    from skin_offline.export.decoder_graph import build_decoder
    from skin_offline.export.decoder_graph_fast import build_decoder_fast
    from skin_offline.export.factory import preset as get_preset
    from skin_offline.manifest import ModelDims

    p = get_preset(preset, **{k: v for k, v in widths.items() if v})
    spec = TextSpec(
        vocab=p.vocab,
        hidden=p.hidden,
        layers=layers,
        heads=p.heads,
        kv_heads=p.kv_heads,
        head_dim=p.hidden // p.heads,
        mlp=p.mlp,
        rms_norm_eps=p.rms_norm_eps,
        rope_theta=p.rope_theta,
        max_context=p.max_context,
    )
    folder = folder / f"{preset}-{layers}l-{p.hidden}h-{p.heads}q-{p.kv_heads}kv-{p.mlp}i"
    folder.mkdir(parents=True, exist_ok=True)
    tensor = _random_tensor_fn(spec)
    if not (folder / names.DECODER_GRAPH).exists():
        build_decoder(spec, tensor, folder)
    if not (folder / names.DECODER_CONTRIB_GRAPH).exists():
        build_decoder_fast(spec, tensor, folder)
    dims = ModelDims(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        num_layers=layers,
        num_heads=spec.heads,
        num_kv_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        intermediate_size=spec.mlp,
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
        max_context=spec.max_context,
        image_tokens=576,
        vision_hidden_size=1024,
    )
    return folder, dims


def quantized(folder: Path, graph: str, precision: str) -> Path:
    """`graph` in `folder` rewritten by the bundle quantizer (MatMul -> MatMulNBits), reused when present."""
    from skin_offline.export.quantize import GraphSource, QuantConfig, plan_graph, quantize_graph
    from skin_offline.manifest import Precision

    dst = f"{precision}_{graph}"
    if not (folder / dst).exists():
        cfg = QuantConfig(Precision(precision))
        quantize_graph(
            plan_graph(GraphSource.from_file(folder / graph), dst, cfg.precision, cfg, cfg.lm_head), folder, cfg
        )
    return folder / dst


def filled_cache(dec, past: int, rng):
    """A cache of `past` random keys/values (decode cost does not depend on their values; skips a prefill)."""
    from skin_offline.runtime.decoder import FastDecoder
    from skin_offline.runtime.kv import HostCache, StoreCache

    d = dec.dims
    shape = (1, d.num_kv_heads, past, d.head_dim)
    mask = np.ones((1, past), np.int64)
    if isinstance(dec, FastDecoder):
        cache = dec.empty_cache(1)
        for buf in cache.store.keys + cache.store.values:
            buf[:, :, :past] = rng.standard_normal(shape, dtype=np.float32).astype(dec.kv_dtype)
        cache.store.frontier = past
        return StoreCache(cache.store, mask)
    kv = [rng.standard_normal(shape, dtype=np.float32).astype(dec.kv_dtype) for _ in range(2 * d.num_layers)]
    return HostCache(kv[0::2], kv[1::2], mask)


def decode_round(dec, table: np.ndarray, past: int, steps: int, rng) -> dict:
    """`steps` greedy tokens from a `past`-token cache; per-token wall, session and Python times."""
    from skin_offline.runtime.sampling import SamplingConfig, make_sampler

    sampler = make_sampler(SamplingConfig())
    cache = filled_cache(dec, past, rng)
    token = int(rng.integers(3, table.shape[0]))
    walls, forwards, insides = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        x = np.asarray(table[[token]], np.float32)[None]  # [1,1,H] (the runtime's bundle.embed)
        before = dec.session.inside
        t1 = time.perf_counter()
        logits, cache = dec.forward(x, cache)
        t2 = time.perf_counter()
        token = sampler(logits[0, -1])
        t3 = time.perf_counter()
        walls.append(t3 - t0)
        forwards.append(t2 - t1)
        insides.append(dec.session.inside - before)
    return {"wall": walls, "forward": forwards, "inside": insides}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, help="override the preset's hidden size (and --heads, --kv-heads, --mlp)")
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--mlp", type=int)
    ap.add_argument("--past", type=int, default=600)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4"])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/skin-decode-bench"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    from skin_offline import names
    from skin_offline.runtime.decoder import Decoder, FastDecoder
    from skin_offline.runtime.sessions import SessionFactory

    t = time.perf_counter()
    folder, dims = build(a.preset, a.layers, a.folder, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, mlp=a.mlp)
    built_s = time.perf_counter() - t
    sf = SessionFactory(threads=a.threads)
    files = {k: folder / g for k, g in (("standard", names.DECODER_GRAPH), ("contrib", names.DECODER_CONTRIB_GRAPH))}
    if a.precision != "fp32":
        files = {k: quantized(folder, f.name, a.precision) for k, f in files.items()}
    decs = {
        "standard": Decoder(TimedSession(sf.create(files["standard"])), dims),
        "contrib": FastDecoder(TimedSession(sf.create(files["contrib"])), dims),
    }
    table = np.random.default_rng(1).standard_normal((dims.vocab_size, dims.hidden_size), dtype=np.float32)
    rng = np.random.default_rng(2)
    for dec in decs.values():  # warm-up: first runs allocate and prepack
        decode_round(dec, table, a.past, 2, rng)
    per = {k: {"wall": [], "forward": [], "inside": []} for k in decs}
    ratios = []
    for r in range(a.rounds):  # interleaved; alternate who goes first
        order = list(decs) if r % 2 == 0 else list(decs)[::-1]
        med = {}
        for k in order:
            res = decode_round(decs[k], table, a.past, a.steps, rng)
            for m, v in res.items():
                per[k][m] += v
            med[k] = statistics.median(res["wall"])
        ratios.append(med["standard"] / med["contrib"])

    def ms(v):
        return round(1e3 * statistics.median(v), 3)

    def us(v):
        return round(1e6 * statistics.median(v), 1)

    report = {
        "preset": a.preset,
        "layers": a.layers,
        "hidden": dims.hidden_size,
        "heads": dims.num_heads,
        "kv_heads": dims.num_kv_heads,
        "mlp": dims.intermediate_size,
        "past": a.past,
        "steps": a.steps,
        "rounds": a.rounds,
        "threads": a.threads,
        "precision": a.precision,
        "build_s": round(built_s, 1),
        "decoders": {
            k: {
                "ms_per_token": ms(p["wall"]),
                "tokens_per_s": round(1 / statistics.median(p["wall"]), 2),
                "session_ms": ms(p["inside"]),
                "python_forward_overhead_us": us([f - i for f, i in zip(p["forward"], p["inside"])]),
                "loop_overhead_us": us([w - f for w, f in zip(p["wall"], p["forward"])]),
            }
            for k, p in per.items()
        },
        "speedup_contrib_vs_standard_per_round": [round(x, 3) for x in ratios],
        "speedup_contrib_vs_standard_median": round(statistics.median(ratios), 3),
    }
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{a.preset} preset, hidden {dims.hidden_size}, mlp {dims.intermediate_size}, heads "
            f"{dims.num_heads}/{dims.num_kv_heads}, {a.layers} layers, {a.precision}, past {a.past}, {a.threads} threads, "
            f"{a.rounds} interleaved rounds x {a.steps} tokens (medians)"
        )
        print(f"{'decoder':10} {'ms/token':>9} {'tok/s':>8} {'in Run ms':>10} {'py fwd us':>10} {'loop us':>8}")
        for k, d in report["decoders"].items():
            print(
                f"{k:10} {d['ms_per_token']:9.2f} {d['tokens_per_s']:8.2f} {d['session_ms']:10.2f} "
                f"{d['python_forward_overhead_us']:10.1f} {d['loop_overhead_us']:8.1f}"
            )
        print(
            f"contrib speedup over standard: median {report['speedup_contrib_vs_standard_median']}x, "
            f"per round {report['speedup_contrib_vs_standard_per_round']}"
        )
    return report


if __name__ == "__main__":
    main()
