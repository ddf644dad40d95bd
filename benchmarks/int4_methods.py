"""int4 methods compared on the real-weights proxy, before choosing the export default (issue 22).

Every linear weight of the proxy's language model quantized by one method (the export's own code:
export/calibrate.py, export/gptq.py), dequantized, and run teacher-forced by transformers' layers (layer-streamed,
layerstream.run_pass) on held-out prompts: synthetic lesion images + MM-Skin test rows never used for calibration
(calibration.EVAL_ROWS); figures against the unquantized model on the answer tokens. This isolates the weight
codec (no int8 prefill graph, no int8 lm_head / embeddings: `benchmarks/int4_quality.py` measures the bundles).

    python benchmarks/int4_methods.py PROXY_CHECKPOINT [--methods rtn gptq ...] [--images 8 --per-image 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

EVAL_SEED = 500  # probe_image seeds of the evaluation images (calibration: 1000+, quality report: 0-2)


def eval_pairs(csv_path: Path) -> list[tuple[str, str]]:
    import csv

    from skin_offline.export.calibration import EVAL_ROWS

    rows = list(csv.DictReader(open(csv_path, newline="", encoding="utf-8")))
    return [(rows[r - 1]["question"].strip(), rows[r - 1]["answer"].strip()) for r in EVAL_ROWS]


def features(ckpt, seeds) -> np.ndarray:
    """[I,N,H] image features of probe images through the checkpoint's CLIP + projector (transformers)."""
    from skin_offline.export import reference
    from skin_offline.export.quality import probe_image
    from skin_offline.runtime.image import preprocess

    px = np.concatenate([preprocess(probe_image(s), ckpt.preprocess) for s in seeds])
    return reference.vision_features(ckpt, px)


def eval_groups(tok, embed, feats: np.ndarray, pairs):
    """Held-out turns, len(pairs) / images per image; returns (groups, answer ids per sequence in order)."""
    from skin_offline.export.calibration import sequence_ids
    from skin_offline.export.layerstream import Group

    per = len(pairs) // feats.shape[0]
    groups, answers = [], []
    for i in range(feats.shape[0]):
        suffixes = []
        for q, a in pairs[i * per : (i + 1) * per]:
            before, after = sequence_ids(tok, q, a)
            n = len(tok.answer_ids(a)) + 1  # the answer and EOS
            suffixes.append(embed(after))
            answers.append(after[-n:])
            pre = before
        groups.append(Group(np.concatenate([embed(pre), feats[i]]), suffixes))
    return groups, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--methods", nargs="+", default=["rtn", "search", "gptq-absmax", "gptq"])
    ap.add_argument("--images", type=int, default=4, help="calibration images")
    ap.add_argument("--per-image", type=int, default=32, help="calibration question/answer pairs per image")
    ap.add_argument("--eval-images", type=int, default=4)
    ap.add_argument("--csv", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/MM-Skin_test.csv")
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a shared 2-core machine)")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)

    from skin_offline.export.calibrate import LINEARS, Calibrator, MethodSpec
    from skin_offline.export.calibration import CALIBRATION_SEED, calibration_groups
    from skin_offline.export.checkpoint import open_checkpoint
    from skin_offline.export.gptq import Grid, dequantize
    from skin_offline.export.layerstream import CheckpointStack, run_pass
    from skin_offline.export.tokenizer import token_config, write_tokenizer_json
    from skin_offline.runtime.tokenizer import TextTokenizer

    torch.manual_seed(0)
    ckpt = open_checkpoint(a.checkpoint)
    stack = CheckpointStack(ckpt)
    t = ckpt.text
    bs = a.block or next(b for b in (128, 64, 32, 16) if t.hidden % b == 0 and t.mlp % b == 0)
    grid = Grid(4, bs)
    table = ckpt.text_tensor("embed_tokens.weight").numpy()
    embed = lambda ids: table[np.asarray(ids, np.int64)]  # noqa: E731
    tj = write_tokenizer_json(a.checkpoint, Path("/tmp") / "int4_methods_tokenizer.json")
    tok = TextTokenizer(__import__("tokenizers").Tokenizer.from_file(str(tj)), token_config(a.checkpoint, tj))
    ev, answers = eval_groups(
        tok, embed, features(ckpt, range(EVAL_SEED, EVAL_SEED + a.eval_images)), eval_pairs(a.csv)
    )
    cal = calibration_groups(
        tok, embed, features(ckpt, range(CALIBRATION_SEED, CALIBRATION_SEED + a.images)), a.per_image
    )

    class Stack:
        num_layers = t.layers
        cfg, rotary = stack.cfg, stack.rotary

        def __init__(self, over=None):
            self.over = over or {}

        def open(self, i):
            w = stack.weights(i)
            for k in list(w):
                if f"layers.{i}.{k}" in self.over:
                    w[k] = torch.from_numpy(self.over[f"layers.{i}.{k}"])
            return stack.open(i, w)

        def head(self, h):
            return stack.head(h)

    def logits(s) -> list[np.ndarray]:
        outs = run_pass(ev, lambda rows: s, t.layers, on_done=lambda: print(".", end="", flush=True))
        rows = [x for out in outs for x in out.suffixes]
        return [s.head(r[len(r) - len(ans) - 1 : -1]) for r, ans in zip(rows, answers)]  # predictions of answer + EOS

    t0 = time.perf_counter()
    ref = logits(Stack())
    print(f"fp32 reference: {sum(map(len, answers))} answer tokens, {time.perf_counter() - t0:.0f}s", flush=True)
    specs = {
        "rtn": MethodSpec(gptq=False, scale_search=False),
        "search": MethodSpec(gptq=False, scale_search=True),
        "gptq-absmax": MethodSpec(gptq=True, scale_search=False),
        "gptq": MethodSpec(),
        "gptq-noact": MethodSpec(act_order=False),
        # what a 7B export gets: GPTQ on q/k/v/o/gate/up, down_proj (K 14336 there) rounded on searched scales
        "gptq-nodown": MethodSpec(gptq_max_inputs=1024),
    }
    results, calib = {}, None
    for m in a.methods:
        t0 = time.perf_counter()
        calib = Calibrator(Stack(), stack.weights, cal, grid, specs[m])
        over = {}
        for i in range(t.layers):
            for lin in LINEARS:
                name = f"layers.{i}.{lin}.weight"
                codes, scales = calib.take(name)
                over[name] = dequantize(codes, scales, grid)
        tq = time.perf_counter() - t0
        results[m] = metrics(ref, logits(Stack(over)), answers) | {"quantize_s": round(tq, 1)}
        print(m, json.dumps(results[m]), flush=True)
    if a.out:
        a.out.write_text(
            json.dumps(
                {
                    "block_size": bs,
                    "calibration": {
                        "images": a.images,
                        "per_image": a.per_image,
                        "sequences": calib.sequences,
                        "positions": calib.positions,
                    },
                    "results": results,
                },
                indent=2,
            )
        )


def metrics(ref: list[np.ndarray], got: list[np.ndarray], answers: list[list[int]]) -> dict:
    from skin_offline.export.quality import _log_softmax

    top, kl, nll_r, nll_q, n = 0, 0.0, 0.0, 0.0, 0
    for r, q, ids in zip(ref, got, answers):
        lp, lq = _log_softmax(r), _log_softmax(q)
        kl += float((np.exp(lp) * (lp - lq)).sum())
        top += int((r.argmax(-1) == q.argmax(-1)).sum())
        idx = np.arange(len(ids))
        nll_r -= float(lp[idx, ids].sum())
        nll_q -= float(lq[idx, ids].sum())
        n += len(ids)
    return {
        "top1_agreement": round(top / n, 4),
        "kl_mean": round(kl / n, 4),
        "ppl_ref": round(float(np.exp(nll_r / n)), 3),
        "ppl": round(float(np.exp(nll_q / n)), 3),
        "tokens": n,
    }


if __name__ == "__main__":
    main()
