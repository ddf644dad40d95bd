"""The int4 benchmark of issue 22 on the real-weights proxy: fp32, int4 rtn, int4 default (calibrated), int8 bundles.

Each bundle is exported from the proxy checkpoint by `export` itself, then run the way a request runs on held-out
prompts (8 generated lesion images, probe seeds 500-507, x MM-Skin_test.csv rows 5389-5452: never calibrated on, see
export/calibration.py): the prompt prefilled through the graph the kernel policy picks (the int8 prefill graph of an
int4 bundle), then the reference answer fed one token at a time through the decode graph (teacher forcing). On the
answer tokens (and the EOS after them), against the fp32 bundle: top-1 agreement, mean KL(fp32 || bundle), and the
perplexity of the reference answers. Bundle size: every file. Decode tok/s: greedy answers of 48 new tokens,
interleaved across bundles round by round, median per bundle (ratios are taken within the same run). Last, the
int8 prefill graph's effect: the default int4 bundle quantized with `--prefill int8`, the same turns prefilled
through that graph and through the int4 graph (`--prefill-only` runs just this, on the fp32 bundle under OUT).

    python benchmarks/int4_quality.py [PROXY_CHECKPOINT] OUT_DIR [--threads 2] [--rounds 5] [--prefill-only]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np

EVAL_SEED = 500
EVAL_IMAGES = 8
BUNDLES = {  # name -> export options
    "fp32": dict(precision="fp32"),
    "int4 rtn": dict(precision="int4", quant_method="rtn"),
    "int4 default (gptq)": dict(precision="int4"),
    "int8": dict(precision="int8"),
}


def eval_pairs(csv_path: Path) -> list[tuple[str, str]]:
    from skin_offline.export.calibration import EVAL_ROWS

    rows = list(csv.DictReader(open(csv_path, newline="", encoding="utf-8")))
    return [(rows[r - 1]["question"].strip(), rows[r - 1]["answer"].strip()) for r in EVAL_ROWS]


def teacher_forced(
    folder: Path, pairs, threads: int, prefill: str | None = None
) -> tuple[list[np.ndarray], list[list[int]]]:
    """Per held-out turn: [n,V] logits predicting the answer + EOS, and those n target ids. `prefill`: as
    SkinVL.load takes it (None: the bundle's default)."""
    from skin_offline.export.quality import probe_image
    from skin_offline.runtime.pipeline import SkinVL
    from skin_offline.runtime.prompt import Prompt, build_prompt_ids

    model = SkinVL.load(folder, threads=threads, prefill=prefill)
    tok, dec = model.tokenizer, model.bundle.decoder
    per = len(pairs) // EVAL_IMAGES
    out, targets = [], []
    for i in range(EVAL_IMAGES):
        feats = model.bundle.vision.encode(model.pixels(probe_image(EVAL_SEED + i)))[0]
        for q, a in pairs[i * per : (i + 1) * per]:
            answer = tok.answer_ids(a) + [tok.eos_id]
            emb = Prompt.of(build_prompt_ids(tok, q), feats.shape[0]).embeds(model.bundle.embed, feats)[None]  # [1,S,H]
            logits, cache = dec.forward(emb, dec.empty_cache(1), keep=1)  # the prompt, as a request prefills it
            rows = [logits[0, -1]]
            for t in answer[:-1]:  # then token by token through the decode graph
                logits, cache = dec.forward(model.bundle.embed([t])[None], cache, keep=1)
                rows.append(logits[0, -1])
            out.append(np.stack(rows).astype(np.float32))
            targets.append(answer)
            del cache
    return out, targets


def metrics(ref: list[np.ndarray], got: list[np.ndarray], targets: list[list[int]]) -> dict:
    from skin_offline.export.quality import _log_softmax

    top = kl = nll = 0.0
    n = 0
    for r, q, ids in zip(ref, got, targets):
        lp, lq = _log_softmax(r), _log_softmax(q)
        kl += float((np.exp(lp) * (lp - lq)).sum())
        top += int((r.argmax(-1) == q.argmax(-1)).sum())
        nll -= float(lq[np.arange(len(ids)), ids].sum())
        n += len(ids)
    return {"top1_agreement": top / n, "kl_mean": kl / n, "perplexity": float(np.exp(nll / n)), "tokens": n}


def decode_speed(folders: dict[str, Path], threads: int, rounds: int) -> dict[str, float]:
    """Median decode tok/s per bundle, the bundles taking turns within each round."""
    from skin_offline import names
    from skin_offline.export.quality import probe_image
    from skin_offline.runtime.bundle import Bundle
    from skin_offline.runtime.pipeline import SkinVL
    from skin_offline.runtime.tokenizer import TextTokenizer

    def load(folder: Path) -> SkinVL:  # no feature or prompt cache: every answer pays its vision and prefill
        b = Bundle.load(folder, threads=threads)
        return SkinVL(b, TextTokenizer.from_file(b.folder / names.TOKENIZER), feature_cache_size=0, prompt_cache_size=0)

    models = {k: load(f) for k, f in folders.items()}
    img = probe_image(EVAL_SEED)
    for m in models.values():  # warm-up
        m.ask(img, "What is this lesion?", max_new_tokens=8)
    rates = {k: [] for k in models}
    for _r in range(rounds):
        for k, m in models.items():
            a = m.ask(img, "Describe the lesion in detail.", max_new_tokens=48)
            rates[k].append(a.timings.decode_tokens_per_s)
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, nargs="?", default=None)
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument(
        "--prefill-only",
        action="store_true",
        help="only the int8 prefill graph's effect (needs the fp32 bundle under OUT from a full run)",
    )
    a = ap.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from proxy_checkpoint import mmskin_csv, proxy_checkpoint

    from skin_offline.export.to_onnx import export_bundle
    from skin_offline.manifest import Manifest

    if a.prefill_only:
        prefill_effect(a.out, eval_pairs(a.csv or mmskin_csv()), a.threads)
        return
    ckpt = a.checkpoint or proxy_checkpoint()
    a.out.mkdir(parents=True, exist_ok=True)
    folders, export_s = {}, {}
    for name, kw in BUNDLES.items():
        folder = a.out / name.split(" (")[0].replace(" ", "-")
        if not (folder / "manifest.json").exists():
            t0 = time.perf_counter()
            export_bundle(ckpt, folder, quality=False, threads=a.threads, log=lambda m: None, **kw)
            export_s[name] = time.perf_counter() - t0
            print(f"exported {name} in {export_s[name]:.0f}s", flush=True)
        folders[name] = folder
    pairs = eval_pairs(a.csv or mmskin_csv())
    ref, targets = teacher_forced(folders["fp32"], pairs, a.threads)
    results = {}
    for name, folder in folders.items():
        got = ref if name == "fp32" else teacher_forced(folder, pairs, a.threads)[0]
        m = Manifest.read(folder)
        results[name] = {**metrics(ref, got, targets), "bundle_bytes": sum(e.size for e in m.files.values())}
        print(name, json.dumps(results[name]), flush=True)
    speeds = decode_speed(folders, a.threads, a.rounds)
    for k, v in speeds.items():
        results[k]["decode_tok_s"] = v
    (a.out / "int4_quality.json").write_text(json.dumps({"results": results, "export_s": export_s}, indent=2))
    rtn, new = results["int4 rtn"], results["int4 default (gptq)"]
    print("| bundle | top-1 agreement | mean KL (nats) | perplexity | bundle size | decode tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, r in results.items():
        print(
            f"| {k} | {r['top1_agreement']:.1%} | {r['kl_mean']:.3f} | {r['perplexity']:.2f} | "
            f"{r['bundle_bytes'] / 1e6:.1f} MB | {r['decode_tok_s']:.1f} |"
        )
    print(
        f"default vs rtn: KL {new['kl_mean'] / rtn['kl_mean']:.2f}x, size {new['bundle_bytes'] / rtn['bundle_bytes']:.4f}x, "
        f"decode {new['decode_tok_s'] / rtn['decode_tok_s']:.3f}x"
    )
    prefill_effect(a.out, pairs, a.threads, ref, targets)


def prefill_effect(out: Path, pairs, threads: int, ref=None, targets=None) -> None:
    """The int8 prefill graph on real weights: the default int4 bundle quantized from the fp32 one with
    `--prefill int8` (kept whatever its gate says), the same turns prefilled through it and through the int4 graph."""
    from skin_offline.export.quantize import QuantConfig, quantize_bundle
    from skin_offline.manifest import Manifest

    folder = out / "int4-prefill-int8"
    if not (folder / "manifest.json").exists():
        quantize_bundle(out / "fp32", folder, QuantConfig("int4", prefill="int8"), quality=False, log=lambda m: None)
    if ref is None:
        ref, targets = teacher_forced(out / "fp32", pairs, threads)
    gate = Manifest.read(folder).pick("decoder").details["prefill_gate"]
    print(f"prefill gate at export: {json.dumps(gate)}")
    for prefill in ("int8", "decoder"):
        r = metrics(ref, teacher_forced(folder, pairs, threads, prefill)[0], targets)
        print(f"int4 default, prompts prefilled through {prefill}: {json.dumps(r)}", flush=True)


if __name__ == "__main__":
    main()
