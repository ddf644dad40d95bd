"""What a precision tier costs: a quantized bundle's outputs against an fp32 reference on a fixed probe set.

Probe set: a few synthetic lesion-like images x the first questions of MM-Skin's test split. For each probe and
each quantized decoder of the bundle, the quantized path answers greedily, `new_tokens` tokens, the way a request
runs (prefill through the graph the kernel policy picks for that many rows, the int8 prefill graph of a hybrid
bundle; then one decode step per token), with the vision graph and embedding table it picks. Then the fp32
reference reads that same answer (teacher forcing), and on those positions:
- top-1 agreement, KL(fp32 || quantized) mean and max, max |logit difference|;
- `greedy_prefix_agreement`: the share of the answer before the first token the reference would not have chosen;
  since up to there both greedy runs saw the same tokens, that is exactly where fp32's own greedy answer would
  have parted, so one teacher-forced fp32 pass gives it (no 32 sequential fp32 steps); `greedy_identical`: the
  share of probes where they never part;
- vision variants: cosine of the image features with the reference's.
The teacher-forced figures are measured along the quantized model's own answer (the contexts it actually runs
in); up to the first divergence that is the fp32 answer too.

The fp32 reference is either the checkpoint itself (transformers' layers, layer-streamed: what `export` uses, in
the memory of one layer at any size) or an fp32 bundle's graphs (`quantize BUNDLE OUT`), cut per layer the same
way (layerstream.py). The quantized side prefills layer by layer too and loads only its decode graph whole. Random-
weight models say little about a real checkpoint's accuracy (their logits are flat and near-ties flip easily);
the same code runs on a real export.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .. import names
from ..manifest import Manifest, Precision
from .layerstream import release_memory

MMSKIN_TEST_CSV = Path(__file__).resolve().parents[3] / "shared" / "data" / "MM-Skin_test.csv"
# the first rows of MM-Skin_test.csv, used when the file is not at hand (same probe set either way)
FALLBACK_QUESTIONS = (
    "What does the image show?",
    "Is the lesion raised above the skin surface?",
    "What type of tissue is present in this image?",
    "Where is the lesion located on the body?",
)
NOTE = (
    "agreement with fp32 on synthetic images; a random-weight model says little about a real checkpoint's "
    "accuracy, rerun on the real export"
)
NOTE_REAL = "agreement with fp32 on synthetic lesion-like images and MM-Skin questions"
METHOD = "fp32 teacher-forced along each quantized model's own greedy answer (prefill + per-token decode)"
# the quantized side loads one decode graph whole; one that would take the process past this is not measured
MEMORY_BUDGET = 6 << 30


@dataclass(frozen=True)
class ProbeSet:
    image_seeds: tuple[int, ...] = (0, 1, 2)
    num_questions: int = 2
    new_tokens: int = 32
    memory_budget: int = MEMORY_BUDGET

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


# --- references ---------------------------------------------------------------------------------------------
class CheckpointReference:
    """fp32 from the checkpoint: transformers' CLIP tower + projector, the embedding rows, Mistral layers streamed."""

    def __init__(self, ckpt):
        from .layerstream import CheckpointStack

        self.ckpt, self.stack = ckpt, CheckpointStack(ckpt)

    def describe(self) -> dict:
        return {
            "reference": "checkpoint (transformers, one layer in memory at a time)",
            "source_fingerprint": self.ckpt.store.fingerprint(),
        }

    def vision(self, pixels: np.ndarray) -> np.ndarray:
        from . import reference

        return reference.vision_features(self.ckpt, pixels)  # [B,N,H]

    def embed(self, ids: list[int]) -> np.ndarray:
        table = self.ckpt.text_tensor("embed_tokens.weight")  # [V,H] read once per call: callers batch their ids
        return table[np.asarray(ids, np.int64)].numpy()


class BundleReference:
    """fp32 from a bundle's fp32 graphs (`quantize BUNDLE OUT`), the decoder cut per layer."""

    def __init__(self, folder: Path, threads: int | None = None):
        from ..runtime.bundle import _load_table
        from .layerstream import GraphStack

        self.folder, self.threads = Path(folder), threads
        self.manifest = Manifest.read(self.folder)
        m = self.manifest
        self.vision_graph = m.pick(names.ROLE_VISION, Precision.FP32)
        self.stack = GraphStack(self.folder / m.pick(names.ROLE_DECODER, Precision.FP32).file, threads)
        self.table, _ = _load_table(self.folder, m, m.pick(names.ROLE_EMBEDDINGS, Precision.FP32))

    def describe(self) -> dict:
        return {
            "reference": "fp32 bundle graphs (one layer in memory at a time)",
            "source_fingerprint": self.manifest.source.get("fingerprint"),
            "source_manifest_files": {k: v.sha256 for k, v in self.manifest.files.items()},
        }

    def vision(self, pixels: np.ndarray) -> np.ndarray:
        return _encode(self.folder / self.vision_graph.file, pixels, self.threads)

    def embed(self, ids: list[int]) -> np.ndarray:
        return np.asarray(self.table[np.asarray(ids, np.int64)], np.float32)


def _encode(path: Path, pixels: np.ndarray, threads: int | None) -> np.ndarray:
    """[B,3,S,S] -> [B,N,H] through one vision graph, loaded for this call only."""
    from ..runtime.sessions import SessionFactory
    from ..runtime.vision import VisionEncoder

    enc = VisionEncoder(SessionFactory(threads=threads).create(path))
    out = np.concatenate([enc.encode(pixels[b : b + 1]) for b in range(pixels.shape[0])])
    del enc
    release_memory()
    return out


# --- the probes -----------------------------------------------------------------------------------------------
@dataclass
class Probes:
    """Prompt pieces shared by both sides: per question the ids before the image (same for all) and after it."""

    questions: list[str]
    source: str
    prefix_ids: list[int]  # "<s> [INST] " before the image
    text_ids: list[list[int]]  # per question: "\n{question} [/INST]"
    pixels: np.ndarray  # [I,3,S,S] one row per probe image
    new_tokens: int

    @classmethod
    def build(cls, folder: Path, m: Manifest, probes: ProbeSet) -> "Probes":
        from ..runtime.image import preprocess
        from ..runtime.prompt import IMAGE_PLACEHOLDER, build_prompt_ids
        from ..runtime.tokenizer import TextTokenizer

        tok = TextTokenizer.from_file(Path(folder) / names.TOKENIZER)
        questions, source = probes.questions()
        ids = [build_prompt_ids(tok, q) for q in questions]
        slot = ids[0].index(IMAGE_PLACEHOLDER)
        assert all(x[: slot + 1] == ids[0][: slot + 1] for x in ids)  # the template's prefix is question-independent
        pixels = np.concatenate([preprocess(probe_image(s), m.preprocess) for s in probes.image_seeds])
        return cls(questions, source, ids[0][:slot], [x[slot + 1 :] for x in ids], pixels, probes.new_tokens)

    def groups(self, embed: Callable[[list[int]], np.ndarray], feats: np.ndarray, answers=None) -> list:
        """layerstream groups, one per image: the prefix (ids + that image's features [N,H]) and as suffixes, per
        answer set e (a list over (image, question) of token lists; None: the prompts alone) and question q, at
        index e * questions + q: the question's ids, then the answer's tokens but the last (teacher forcing)."""
        from .layerstream import Group

        sets = answers or [None]
        nq, n_img = len(self.text_ids), feats.shape[0]
        pieces = [self.prefix_ids, *self.text_ids] + [a[:-1] for ans in sets if ans is not None for a in ans]
        rows = embed([t for p in pieces for t in p])  # one read of the table
        parts = np.split(rows, np.cumsum([len(p) for p in pieces])[:-1])
        pre, texts, ans_rows = parts[0], parts[1 : 1 + nq], parts[1 + nq :]
        out = []
        for img in range(n_img):
            suffixes = [
                texts[q] if ans is None else np.concatenate([texts[q], ans_rows[e * n_img * nq + img * nq + q]])
                for e, ans in enumerate(sets)
                for q in range(nq)
            ]
            out.append(Group(np.concatenate([pre, feats[img]]), suffixes))
        return out


# --- the quantized side -------------------------------------------------------------------------------------
def _graph_bytes(m: Manifest, g) -> int:
    return sum(m.files[f].size for f in {g.file, *g.data_files} if f in m.files)


def quantized_answers(
    folder: Path, m: Manifest, g, probes: Probes, feats: np.ndarray, threads: int | None, log=None
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Decoder `g`'s greedy answers (per image, per question) and the logits that chose each token [n,V], the way a
    request runs: one prefill call of the prompt through the graph the kernel policy picks for its rows (a hybrid
    bundle's int8 prefill graph), cut per layer so that graph is never loaded whole; then one decode step per token
    on `g`, loaded whole once (after the prefill's cuts are gone)."""
    from ..progress import task
    from ..runtime.bundle import _load_table
    from ..runtime.decoder import make_decoder
    from ..runtime.kernels.policy import KernelPolicy
    from ..runtime.kv import HostCache
    from ..runtime.sessions import SessionFactory
    from .layerstream import GraphStack, Group, run_pass

    emb = m.pick(names.ROLE_EMBEDDINGS, Precision(_picked(m, names.ROLE_EMBEDDINGS, g.precision)))
    table, scales = _load_table(folder, m, emb)

    def embed(ids):
        ids = np.asarray(ids, np.int64)
        rows = np.asarray(table[ids], np.float32)  # [n,H]; int8 rows dequantized as the runtime does
        return rows * scales[ids][:, None] if scales is not None else rows

    own = GraphStack(folder / g.file, threads)
    partner = m.multi_row_partner(g)
    multi = GraphStack(folder / partner.file, threads) if partner is not None else own
    policy = KernelPolicy.for_this_machine()

    def stack_for(rows: int):
        return multi if policy.multi_row(rows) else own

    n = probes.new_tokens
    groups = [Group(np.concatenate([img.prefix, s]), []) for img in probes.groups(embed, feats) for s in img.suffixes]
    # all prompts in one pass (one session per layer of the prefill graph); their keys go to disk as they come
    # (0.16 GB per 600-token prompt at 7B) and return one prompt at a time, next to the decode graph
    with tempfile.TemporaryDirectory(dir=Path(folder).parent, prefix=f".{Path(folder).name}.kv-") as spill:

        def sink(j: int, i: int, k: np.ndarray, v: np.ndarray) -> None:
            np.save(Path(spill) / f"{j}.{i}.k.npy", k)
            np.save(Path(spill) / f"{j}.{i}.v.npy", v)

        with task(log, f"quality: {g.file} prefill", total=own.num_layers, unit="layers") as t:
            outs = run_pass(groups, stack_for, own.num_layers, kv_sink=sink, on_done=t.advance)
        firsts = [stack_for(o.prefix.shape[0]).head(o.prefix[-1:])[0] for o in outs]  # [V] each
        own.close()
        multi.close()
        release_memory()
        dec = make_decoder(
            SessionFactory(threads=threads).create(folder / g.file),
            m.model,
            share_buffer=g.attention is not None and g.attention.in_place,
        )
        answers, logits = [], []
        with task(log, f"quality: {g.file} answers", total=len(groups), unit="probes") as t:
            for j, o in enumerate(outs):
                keys = [np.load(Path(spill) / f"{j}.{i}.k.npy") for i in range(m.model.num_layers)]
                values = [np.load(Path(spill) / f"{j}.{i}.v.npy") for i in range(m.model.num_layers)]
                cache = HostCache(keys, values, np.ones((1, o.prefix.shape[0]), np.int64))
                del keys, values
                rows, toks = [firsts[j]], []
                for step in range(n):
                    toks.append(int(np.argmax(rows[-1])))
                    if step + 1 < n:
                        out, cache = dec.forward(embed([toks[-1]])[None], cache, keep=1)
                        rows.append(out[0, -1])
                del cache
                answers.append(toks)
                logits.append(np.stack(rows).astype(np.float32))
                t.advance()
    del dec
    release_memory()
    return answers, logits


# --- the report -----------------------------------------------------------------------------------------------
def measure(
    folder: Path,
    reference,
    probes: ProbeSet = ProbeSet(),
    *,
    quality: bool = True,
    verifier=None,
    threads: int | None = None,
    log=None,
) -> dict:
    """The quality report of bundle `folder` against `reference` (CheckpointReference / BundleReference), and with
    `verifier` (verify.Verifier, checkpoint references only) its checks in the same layer-streamed pass."""
    from ..progress import task
    from .layerstream import run_pass

    folder = Path(folder)
    m = Manifest.read(folder)
    pr = Probes.build(folder, m, probes)
    n_img, nq = pr.pixels.shape[0], len(pr.questions)
    if log is not None:
        log(
            f"{'verifying and measuring' if verifier and quality else 'verifying' if verifier else 'measuring'} "
            f"on {n_img} probe images x {nq} questions (fp32 reference: {reference.describe()['reference']}) ..."
        )
    with task(log, "reference image features", total=1, unit="passes") as t:
        ref_feats = reference.vision(pr.pixels)  # [I,N,H]
        release_memory()
        t.advance()
    feats: dict[str, np.ndarray] = {}
    report: dict = {}
    for g in m.variants(names.ROLE_VISION):
        with task(log, f"image features: {g.file}", total=1, unit="passes") as t:
            feats[g.precision.value] = f = _encode(folder / g.file, pr.pixels, threads)
            t.advance()
        if verifier is not None:
            verifier.vision(g, f, ref_feats)
        if quality and g.precision != Precision.FP32:
            cos = [_cosine(f[i], ref_feats[i]) for i in range(n_img)]
            report[f"vision.{g.precision.value}"] = {
                "feature_cosine_mean": float(np.mean(cos)),
                "feature_cosine_min": float(np.min(cos)),
            }
    if verifier is not None:
        verifier.embeddings(reference.ckpt)

    entries, answers = [], {}
    for g in m.variants(names.ROLE_DECODER) if quality else ():
        if g.precision == Precision.FP32:
            continue
        key = f"{g.role}.{g.precision.value}"
        need = _graph_bytes(m, g)
        if need > probes.memory_budget - (1 << 30):
            report[key] = {
                "skipped": f"its decode graph alone is {need / 1e9:.1f} GB, over the report's memory "
                f"budget ({probes.memory_budget / 1e9:.1f} GB in all); measure it on a machine "
                f"that serves it: quantize --keep-source from an fp32 bundle"
            }
            continue
        vis = _picked(m, names.ROLE_VISION, g.precision)
        answers[key] = quantized_answers(folder, m, g, pr, feats[vis], threads, log)
        entries.append((key, g, vis))

    n = pr.new_tokens
    sets = [[a for a in answers[key][0]] for key, _, _ in entries]  # per entry: answers in (image, question) order
    ref_groups = pr.groups(reference.embed, ref_feats, answers=sets or None)
    stack = reference.stack
    with task(
        log, "fp32 reference" + (" + verification" if verifier else ""), total=stack.num_layers, unit="layers"
    ) as t:
        outs = run_pass(
            ref_groups,
            lambda rows: stack,
            stack.num_layers,
            on_layer=verifier.layer if verifier is not None else None,
            on_done=t.advance,
        )
    if verifier is not None:
        verifier.head(stack, outs[0].prefix)
    release_memory()

    on = {
        **reference.describe(),
        "method": METHOD,
        "images": [f"probe_image(seed={s})" for s in probes.image_seeds],
        "questions": pr.questions,
        "questions_source": pr.source,
        "new_tokens": n,
        "probes": n_img * nq,
        "note": NOTE if m.random_weights else NOTE_REAL,
        "probe_set": asdict(probes),
    }
    # every probe's answer positions through the reference head in one call (the lm_head is read once)
    rows = [outs[i].suffixes[e * nq + q][-n:] for e in range(len(entries)) for i in range(n_img) for q in range(nq)]
    heads = np.split(stack.head(np.concatenate(rows)), len(rows)) if rows else []  # [n,V] each
    for e, (key, g, vis) in enumerate(entries):
        toks, got = answers[key]
        ref_l = heads[e * n_img * nq : (e + 1) * n_img * nq]
        prefix = []
        for r, a in zip(ref_l, toks):
            k = next((i for i, t in enumerate(a) if int(np.argmax(r[i])) != t), n)
            prefix.append(k)
        report[key] = {
            **logit_metrics(np.concatenate(ref_l), np.concatenate(got)),
            "greedy_prefix_agreement": float(np.mean(prefix) / n),
            "greedy_identical": float(np.mean([k == n for k in prefix])),
            "pipeline": {
                "vision": vis,
                "embeddings": _picked(m, names.ROLE_EMBEDDINGS, g.precision),
                "multi_row": _multi_row_name(m, g),
            },
            "quantization": quantization_of(g),
        }
    return {"measured_on": on, **report} if quality else {}


def quantization_of(g) -> dict:
    """How a decoder variant's weights were quantized, for the report: the method and what it was calibrated on
    (never on the report's own probes: calibration.py keeps them apart)."""
    d = g.details
    if d.get("op") == "DynamicQuantizeMatMul":
        return {"method": "int8 per-column, round to nearest"}
    out = {"method": d.get("method", "rtn"), "scales": d.get("scales", "absmax")}
    cal = d.get("calibration")
    if cal:
        out["calibration"] = {k: cal[k] for k in ("text", "images", "sequences") if k in cal}
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _picked(m: Manifest, role: str, precision: Precision) -> str:
    """The precision Bundle.load uses for `role` when asked for `precision`: that one if present, else the default."""
    have = {g.precision for g in m.variants(role)}
    return (precision if precision in have else m.pick(role).precision).value


def _multi_row_name(m: Manifest, g) -> str:
    """What many-row calls (prefill) of `g` ran through: its int8 QGEMM partner ("int8-qgemm") or `g` itself."""
    partner = m.multi_row_partner(g)
    return f"{partner.precision.value}-{partner.kernel.value}" if partner is not None else g.precision.value


def quality_report(src: Path, dst: Path, probes: ProbeSet = ProbeSet(), threads: int | None = None, log=None) -> dict:
    """Every quantized variant of bundle `dst` against the fp32 graphs of bundle `src` (`quantize`)."""
    return measure(dst, BundleReference(src, threads), probes, threads=threads, log=log)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logit_metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    """[n,V] fp32 vs quantized logits of the same positions -> agreement figures."""
    kl = []
    for r in range(0, ref.shape[0], 32):  # in row chunks: float64 temporaries of [32,V], not [n,V]
        lp, lq = _log_softmax(ref[r : r + 32]), _log_softmax(got[r : r + 32])
        kl.append((np.exp(lp) * (lp - lq)).sum(axis=-1))  # [32] KL(fp32 || quantized), nats
    kl = np.concatenate(kl)
    return {
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "max_abs_logit_diff": float(np.abs(ref - got).max()),
    }


# --- for `skin-offline info` ----------------------------------------------------------------------------
def format_details(details: dict) -> str:
    """A graph variant's quantization details in one short phrase ('' for none)."""
    if details.get("op") == "DynamicQuantizeMatMul":  # a QGEMM graph (the int8 prefill graph, the int8 tower)
        smooth = details.get("smoothing")
        extra = f", smoothed (alpha {smooth['alpha']}, {smooth['weights']} weights)" if smooth else ""
        return f"[int8 per-column weights, per-tensor activations{extra}]"
    if "bits" not in details:
        return ""
    parts = [
        f"block {details.get('block_size')}",
        "sym" if details.get("symmetric") else "asym",
        f"acc {details.get('accuracy_level')}",
    ]
    if "lm_head" in details:
        parts.append(f"lm_head {details['lm_head']}")
    if details.get("scales") == "mse-search":
        parts.append("searched scales")
    if details.get("method") == "gptq":
        parts.append("GPTQ")
    if details.get("scales") == "activation-search":
        parts.append("activation-searched scales")
    if details.get("calibration"):
        parts.append(f"calibrated on {details['calibration'].get('sequences')} sequences")
    gate = details.get("prefill_gate")
    if gate:  # prefill_gate.PrefillCheck.details
        parts.append(
            f"int8 prefill graph {'kept' if gate['prefill_graph_kept'] else 'rejected'}: top-1 "
            f"{gate['top1_agreement']:.1%} vs {gate['decode_top1_agreement']:.1%} for this graph"
        )
    return "[" + ", ".join(parts) + "]"


def format_report(report: dict) -> list[str]:
    """The manifest's quality report as indented lines."""
    lines = []
    on = report.get("measured_on", {})
    if on:
        ref = f"{on['reference'].split(' (')[0]}, " if on.get("reference") else ""
        lines.append(
            f"quality vs fp32 ({ref}{on.get('probes')} probes: {len(on.get('images', []))} synthetic images x "
            f"{len(on.get('questions', []))} questions from {on.get('questions_source')}, "
            f"{on.get('new_tokens')} tokens each)"
        )
    for key, r in report.items():
        if key == "measured_on" or not isinstance(r, dict):
            continue
        if "skipped" in r:
            lines.append(f"  {key:14s} not measured: {r['skipped']}")
            continue
        if "feature_cosine_mean" in r:
            lines.append(
                f"  {key:14s} image-feature cosine mean {r['feature_cosine_mean']:.6f}, min {r['feature_cosine_min']:.6f}"
            )
            continue
        pipe = r.get("pipeline", {})
        q = r.get("quantization", {})
        if q.get("calibration"):
            lines.append(
                f"  {key:14s} weights: {q['method']} ({q['scales']} scales), calibrated on "
                f"{q['calibration'].get('sequences')} sequences: {q['calibration'].get('images')}"
            )
        lines.append(
            f"  {key:14s} top-1 {r['top1_agreement']:.1%}, KL mean {r['kl_mean']:.2e} max {r['kl_max']:.2e}, "
            f"max |dlogit| {r['max_abs_logit_diff']:.3g}, greedy prefix {r['greedy_prefix_agreement']:.1%}, "
            f"identical {r['greedy_identical']:.0%} (vision {pipe.get('vision')}, embeddings {pipe.get('embeddings')}"
            + (f", prefill {pipe['multi_row']})" if pipe.get("multi_row") else ")")
        )
    if on.get("note"):
        lines.append(f"  note: {on['note']}")
    return lines
