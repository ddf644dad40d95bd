"""What a precision tier costs: a quantized bundle's outputs against its fp32 source on a fixed probe set.

Probe set: a few synthetic lesion-like images x the first questions of MM-Skin's test split. For each
probe the fp32 bundle greedily answers `new_tokens` tokens; then, with the same prompt:
- teacher-forced next-token distributions over prompt-end + those tokens (both models read the same
  token ids): top-1 agreement, KL(fp32 || quantized) mean and max, max abs logit difference;
- the quantized bundle's own greedy answer: fraction of the fp32 answer reproduced before the first
  differing token (`greedy_prefix_agreement`) and the share of probes answered identically;
- vision variants: cosine similarity of the image features with the fp32 tower's.
The decoder figures are end to end: the quantized bundle runs with the vision graph and embedding table
it picks for that precision. Random-weight models say little about a real checkpoint's accuracy (their
logits are flat and near-ties flip easily); the same code runs on a real export.

Uses only the runtime (NumPy + onnxruntime) so the numbers can be recomputed anywhere from the graphs.
"""

from __future__ import annotations

import csv
import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .. import names
from ..manifest import Manifest, Precision

MMSKIN_TEST_CSV = Path(__file__).resolve().parents[3] / "shared" / "data" / "MM-Skin_test.csv"
# the first rows of MM-Skin_test.csv, used when the file is not at hand (same probe set either way)
FALLBACK_QUESTIONS = (
    "What does the image show?",
    "Is the lesion raised above the skin surface?",
    "What type of tissue is present in this image?",
    "Where is the lesion located on the body?",
)
NOTE = ("agreement with this bundle's own fp32 graphs on synthetic images; a random-weight model says "
        "little about a real checkpoint's accuracy, rerun on the real export")


@dataclass(frozen=True)
class ProbeSet:
    image_seeds: tuple[int, ...] = (0, 1, 2)
    num_questions: int = 2
    new_tokens: int = 32

    def questions(self) -> tuple[list[str], str]:
        try:
            with open(MMSKIN_TEST_CSV, newline="") as f:
                rows = [r["question"] for _, r in zip(range(self.num_questions), csv.DictReader(f))]
            return rows, "MM-Skin_test.csv rows 1-%d" % self.num_questions
        except (OSError, KeyError):
            return list(FALLBACK_QUESTIONS[: self.num_questions]), "MM-Skin_test.csv rows (built-in copy)"


def probe_image(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A synthetic lesion: skin-toned noisy background with a darker irregular blob. [H,W,3] uint8."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    skin = np.array([224, 172, 140], np.float32) + rng.normal(0, 12, 3)
    lesion = np.array([110, 60, 50], np.float32) + rng.normal(0, 15, 3)
    cx, cy, r = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65), min(w, h) * rng.uniform(0.15, 0.35)
    ang = np.arctan2(yy - cy, xx - cx)
    radius = r * (1 + 0.2 * np.sin(3 * ang + rng.uniform(0, 6)))  # irregular border
    inside = (np.hypot(xx - cx, yy - cy) < radius)[..., None]
    img = np.where(inside, lesion, skin) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@dataclass
class _Probe:
    prompt: np.ndarray  # [1,S,H] prompt embeddings (fp32 bundle)
    ids: list[int]  # prompt ids (with the image placeholder)
    pixels: np.ndarray  # [1,3,s,s]
    tokens: list[int] = field(default_factory=list)  # fp32 greedy answer
    logits: np.ndarray | None = None  # [n,V] teacher-forced fp32 logits predicting each answer token
    features: np.ndarray | None = None  # [N,H]


def _greedy(model, prompt: np.ndarray, n: int) -> list[int]:
    """n greedy tokens (no EOS stop, so every probe has the same length). prompt [1,S,H]."""
    dec = model.bundle.decoder
    logits, cache = dec.forward(prompt, dec.empty_cache(1), keep=1)
    out = []
    for _ in range(n):
        t = int(np.argmax(logits[0, -1]))
        out.append(t)
        logits, cache = dec.forward(model.bundle.embed([t])[None], cache, keep=1)
    return out


def _teacher_forced(model, prompt: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Logits [n,V] predicting tokens[i] from prompt + tokens[:i] (float32), computed the way a request runs:
    one prefill of the prompt, then one decode step per token. (A single call over prompt + tokens would send
    every position through the multi-row graph of a hybrid bundle and never measure its decode graph.)"""
    dec = model.bundle.decoder
    logits, cache = dec.forward(prompt, dec.empty_cache(1), keep=1)  # [1,1,V]
    out = [logits[0, -1]]
    for t in tokens[:-1]:
        logits, cache = dec.forward(model.bundle.embed([t])[None], cache, keep=1)
        out.append(logits[0, -1])
    return np.stack(out).astype(np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logit_metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    """[n,V] fp32 vs quantized logits of the same positions -> agreement figures."""
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)  # [n] KL(fp32 || quantized), nats
    return {"top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "max_abs_logit_diff": float(np.abs(ref - got).max())}


def _load(folder: Path, precision: Precision | None, threads: int | None):
    from ..runtime.bundle import Bundle
    from ..runtime.pipeline import SkinVL
    from ..runtime.tokenizer import TextTokenizer

    # fp16 graphs are measured wherever quantize runs (usually CPU), although the CPU runtime refuses to serve them
    b = Bundle.load(folder, threads=threads, precision=precision, allow_cpu_fp16=True)
    return SkinVL(b, TextTokenizer.from_file(b.folder / names.TOKENIZER))


def _picked(m: Manifest, role: str, precision: Precision) -> str:
    """The precision Bundle.load uses for `role` when asked for `precision`: that one if present, else the default."""
    have = {g.precision for g in m.variants(role)}
    return (precision if precision in have else m.pick(role).precision).value


def _multi_row(m: Manifest, g, model) -> str:
    """What many-row calls (prefill) ran through while measuring `g`: "int8-qgemm" or `g`'s own precision."""
    partner = m.multi_row_partner(g)
    used = partner is not None and getattr(model.bundle.decoder, "gemm_session", None) is not None
    return f"{partner.precision.value}-{partner.kernel.value}" if used else g.precision.value


def quality_report(src: Path, dst: Path, probes: ProbeSet = ProbeSet(), threads: int | None = None,
                   log=None) -> dict:
    """Compare every non-fp32 variant of bundle `dst` with the fp32 graphs of bundle `src`."""
    from ..progress import task
    from ..runtime.prompt import build_prompt_ids

    questions, qsource = probes.questions()
    ref = _load(src, Precision.FP32, threads)
    cases: list[_Probe] = []
    with task(log, "quality: fp32 answers", total=len(probes.image_seeds) * len(questions), unit="probes") as t:
        for seed in probes.image_seeds:
            pixels = ref.pixels(probe_image(seed))
            feats = ref.bundle.vision.encode(pixels)[0]
            for q in questions:
                ids = build_prompt_ids(ref.tokenizer, q)
                p = _Probe(ref.prompt_embeddings(ids, feats), ids, pixels, features=feats)
                p.tokens = _greedy(ref, p.prompt, probes.new_tokens)
                p.logits = _teacher_forced(ref, p.prompt, p.tokens)
                cases.append(p)
                t.advance()
    del ref
    gc.collect()  # one model in memory at a time

    m = Manifest.read(dst)
    report: dict = {"measured_on": {
        "source_bundle": str(Path(src).resolve()), "source_fingerprint": m.source.get("fingerprint"),
        "images": [f"probe_image(seed={s})" for s in probes.image_seeds], "questions": questions,
        "questions_source": qsource, "new_tokens": probes.new_tokens, "probes": len(cases), "note": NOTE,
        "probe_set": asdict(probes)}}
    for g in m.graphs:
        if g.precision == Precision.FP32 or g.role == names.ROLE_EMBEDDINGS:
            continue
        key = f"{g.role}.{g.precision.value}"
        if g.role == names.ROLE_VISION:  # this graph alone (its precision need not match a decoder's)
            from ..runtime.sessions import SessionFactory
            from ..runtime.vision import VisionEncoder

            enc = VisionEncoder(SessionFactory(threads=threads).create(Path(dst) / g.file))
            cos = []
            for p in cases[:: len(questions)]:
                a = p.features.reshape(-1).astype(np.float64)
                b = enc.encode(p.pixels)[0].reshape(-1).astype(np.float64)
                cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
            report[key] = {"feature_cosine_mean": float(np.mean(cos)), "feature_cosine_min": float(np.min(cos))}
            del enc
        else:
            model = _load(dst, g.precision, threads)
            ref_l, got_l, prefix, same = [], [], [], 0
            with task(log, f"quality: {key}", total=len(cases), unit="probes") as t:
                for p in cases:
                    prompt = model.prompt_embeddings(p.ids, model.image_features(p.pixels))
                    ref_l.append(p.logits)
                    got_l.append(_teacher_forced(model, prompt, p.tokens))
                    mine = _greedy(model, prompt, probes.new_tokens)
                    n = next((i for i, (a, b) in enumerate(zip(mine, p.tokens)) if a != b), len(p.tokens))
                    prefix.append(n / len(p.tokens))
                    same += mine == p.tokens
                    t.advance()
            report[key] = {
                **logit_metrics(np.concatenate(ref_l), np.concatenate(got_l)),
                "greedy_prefix_agreement": float(np.mean(prefix)), "greedy_identical": same / len(cases),
                "pipeline": {"vision": _picked(m, names.ROLE_VISION, g.precision),
                             "embeddings": _picked(m, names.ROLE_EMBEDDINGS, g.precision),
                             "multi_row": _multi_row(m, g, model)},
            }
            del model
        gc.collect()
    return report


# --- for `skin-offline info` ----------------------------------------------------------------------------
def format_details(details: dict) -> str:
    """A graph variant's quantization details in one short phrase ('' for none)."""
    if "bits" not in details:
        return ""
    parts = [f"block {details.get('block_size')}", "sym" if details.get("symmetric") else "asym",
             f"acc {details.get('accuracy_level')}"]
    if "lm_head" in details:
        parts.append(f"lm_head {details['lm_head']}")
    if details.get("scales") == "mse-search":
        parts.append("searched scales")
    return "[" + ", ".join(parts) + "]"


def format_report(report: dict) -> list[str]:
    """The manifest's quality report as indented lines."""
    lines = []
    on = report.get("measured_on", {})
    if on:
        lines.append(f"quality vs fp32 ({on.get('probes')} probes: {len(on.get('images', []))} synthetic images x "
                     f"{len(on.get('questions', []))} questions from {on.get('questions_source')}, "
                     f"{on.get('new_tokens')} tokens each)")
    for key, r in report.items():
        if key == "measured_on" or not isinstance(r, dict):
            continue
        if "feature_cosine_mean" in r:
            lines.append(f"  {key:14s} image-feature cosine mean {r['feature_cosine_mean']:.6f}, min {r['feature_cosine_min']:.6f}")
            continue
        pipe = r.get("pipeline", {})
        lines.append(
            f"  {key:14s} top-1 {r['top1_agreement']:.1%}, KL mean {r['kl_mean']:.2e} max {r['kl_max']:.2e}, "
            f"max |dlogit| {r['max_abs_logit_diff']:.3g}, greedy prefix {r['greedy_prefix_agreement']:.1%}, "
            f"identical {r['greedy_identical']:.0%} (vision {pipe.get('vision')}, embeddings {pipe.get('embeddings')}"
            + (f", prefill {pipe['multi_row']})" if pipe.get("multi_row") else ")"))
    if on.get("note"):
        lines.append(f"  note: {on['note']}")
    return lines
