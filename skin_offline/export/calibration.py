"""Calibration sequences for the calibrated int4 pass: shipped text + images through the export's own vision tower.

What the int4 pass calibrates on (export is offline, so the text ships in the package: data/calibration.json):
- text: 250 question/answer pairs of MM-Skin's test split (rows listed in the file, every 16th of rows 1001-4985),
  as training turns `[INST] <image>\\n{q} [/INST] {a}</s>`. Held apart from what quality is judged on: the manifest's
  quality report asks rows 1-16 (quality.ProbeSet), benchmarks/int4_quality.py rows EVAL_ROWS; a test checks the
  three are disjoint. (The real-weights proxy's image passage is answers 100-199: also outside.)
- images: synthetic lesion-like images (quality.probe_image, seeds from CALIBRATION_SEED on; the quality report uses
  seeds 0-2), or a clinic's own photos (`export --calibration-images DIR`), which are read, encoded and dropped:
  never stored, never logged (only their count is).
Each image is the shared prefix of `per_image` sequences (BOS "[INST] " + its features), the way the runtime's
prefix cache runs them (layerstream.Group).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UsageError

DATA = Path(__file__).resolve().parent / "data" / "calibration.json"
CALIBRATION_SEED = 1000  # probe_image seeds of the generated calibration images: 1000, 1001, ...
EVAL_ROWS = range(5389, 5453)  # MM-Skin_test.csv rows the int4 benchmarks judge on (never calibrated on)
QUALITY_ROWS = range(1, 17)  # rows the manifest's quality report may ask (ProbeSet.num_questions <= 16)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".heic", ".heif", ".avif", ".dcm")

Embed = Callable[[list[int]], np.ndarray]  # ids -> [n,H] fp32


# Default sizes by model scale (decoder parameters per layer): both 128 sequences. A small model gets 8 images x 16
# whole turns (~11k positions; seconds of work); a 7B-class one (218M per layer) 2 images x 64 turns with answers cut
# at 24 tokens (~6.6k positions): the pass's forward alone costs 2 x params x positions (92 TFLOP at 7B), which has to
# fit the export's time bound on 2 CPU cores (README "int4 quality" gives the measured time).
LARGE_LAYER_PARAMS = 50_000_000
SMALL_DEFAULT = (8, 16, None)
LARGE_DEFAULT = (2, 64, 24)


@dataclass(frozen=True)
class CalibrationSpec:
    """How many calibration sequences: `images` prefixes x `per_image` question/answer suffixes (answers cut at
    `max_answer_tokens`); None: the default for the model's size (`resolved`)."""

    images: int | None = None
    per_image: int | None = None
    max_answer_tokens: int | None = None
    image_dir: Path | None = None  # export --calibration-images: the clinic's photos instead of generated ones

    def resolved(self, layer_params: int) -> "CalibrationSpec":
        if self.images is not None and self.per_image is not None:
            return self
        images, per_image, cut = LARGE_DEFAULT if layer_params > LARGE_LAYER_PARAMS else SMALL_DEFAULT
        return CalibrationSpec(
            self.images or images,
            self.per_image or per_image,
            self.max_answer_tokens if self.max_answer_tokens is not None else cut,
            self.image_dir,
        )

    @property
    def sequences(self) -> int:
        return (self.images or SMALL_DEFAULT[0]) * (self.per_image or SMALL_DEFAULT[1])

    def describe(self, images_used: int) -> dict:
        """The manifest's record: what was calibrated on, never which files."""
        cut = f", answers cut at {self.max_answer_tokens} tokens" if self.max_answer_tokens else ""
        return {
            "text": f"MM-Skin_test.csv rows listed in skin_offline/export/data/calibration.json "
            f"({self.sequences} of {len(load_pairs()[0])} question/answer pairs{cut})",
            "images": (
                f"{images_used} images from --calibration-images"
                if self.image_dir is not None
                else f"{images_used} generated lesion-like images (probe_image seeds "
                f"{CALIBRATION_SEED}-{CALIBRATION_SEED + images_used - 1})"
            ),
            "sequences": self.sequences,
            "held_out": "the quality report's rows 1-16 and seeds 0-2",
        }


def load_pairs() -> tuple[list[int], list[tuple[str, str]]]:
    d = json.loads(DATA.read_text(encoding="utf-8"))
    return list(d["rows"]), [tuple(p) for p in d["pairs"]]


def calibration_images(spec: CalibrationSpec) -> list:
    """PIL images: the clinic's (sorted by name, at most spec.images, cycled if fewer) or generated ones."""
    from .quality import probe_image

    if spec.image_dir is None:
        return [probe_image(CALIBRATION_SEED + k) for k in range(spec.images)]
    from ..errors import ImageError
    from ..runtime.image import load_image

    folder = Path(spec.image_dir)
    if not folder.is_dir():
        raise UsageError(f"--calibration-images {folder} is not a folder; pass a folder of lesion photos")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    images = []
    for p in files:
        if len(images) == spec.images:
            break
        try:
            images.append(load_image(p))
        except ImageError:
            continue  # unreadable files are skipped (and not named: patient data is never logged)
    if not images:
        raise UsageError(
            f"--calibration-images {folder} holds no readable image ({', '.join(IMAGE_SUFFIXES[:5])}, ...)"
        )
    return images


def sequence_ids(tok, question: str, answer: str, max_answer_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """(ids before the image, ids after it) of one training turn, as the runtime builds prompts (prompt.py) plus the
    answer as it stands in the turn and EOS (an answer cut at `max_answer_tokens` has no EOS)."""
    from ..runtime.prompt import IMAGE_PLACEHOLDER, build_prompt_ids

    answer_ids = tok.answer_ids(answer) + [tok.eos_id]
    if max_answer_tokens is not None:
        answer_ids = answer_ids[:max_answer_tokens]
    ids = build_prompt_ids(tok, question) + answer_ids
    slot = ids.index(IMAGE_PLACEHOLDER)
    return ids[:slot], ids[slot + 1 :]


def calibration_groups(
    tok, embed: Embed, feats: np.ndarray, per_image: int, offset: int = 0, max_answer_tokens: int | None = None
) -> list:
    """One layerstream.Group per image of `feats` [I,N,H]: prefix = BOS "[INST] " + features, suffixes = `per_image`
    question/answer turns (the shipped pairs, in order from `offset`, cycling)."""
    from .layerstream import Group

    _, pairs = load_pairs()
    groups = []
    for i in range(feats.shape[0]):
        pre, suffixes = None, []
        for j in range(per_image):
            q, a = pairs[(offset + i * per_image + j) % len(pairs)]
            before, after = sequence_ids(tok, q, a, max_answer_tokens)
            pre = before
            suffixes.append(embed(after))
        groups.append(Group(np.concatenate([embed(pre), feats[i]]), suffixes))
    return groups


def image_features(vision_graph: Path, images: list, preprocess_cfg, threads: int | None = None) -> np.ndarray:
    """[I,N,H] features of `images` through a bundle vision graph (the export's own fp32 tower), one at a time."""
    from ..runtime.image import preprocess
    from ..runtime.sessions import SessionFactory
    from ..runtime.vision import VisionEncoder
    from .layerstream import release_memory

    enc = VisionEncoder(SessionFactory(threads=threads).create(vision_graph))
    feats = np.concatenate([enc.encode(preprocess(img, preprocess_cfg)) for img in images])
    del enc
    release_memory()
    return feats


def build_calibrator(
    cfg, stack, weights_of, embed: Embed, tok, vision_graph: Path, preprocess_cfg, threads: int | None = None, log=None
):
    """The calibrated pass of QuantConfig `cfg` (block size resolved) over the decoder `stack` / `weights_of`
    (calibrate.Calibrator): calibration images through `vision_graph`, the shipped text through `tok` and `embed`."""
    from .calibrate import Calibrator
    from .gptq import Grid
    from .quantize import _BITS

    c = stack.cfg
    spec = cfg.calibration.resolved(
        layer_params(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    )
    images = calibration_images(spec)
    if log is not None:
        log(
            f"calibrating int4 on {spec.sequences} sequences over {len(images)} "
            f"{'of your images' if spec.image_dir is not None else 'generated images'} ({cfg.method_spec().describe()})"
        )
    feats = image_features(vision_graph, images, preprocess_cfg, threads)
    n_images = len(images)
    del images
    # fewer readable clinic images than asked: the same number of sequences, more of them per image
    per_image = -(-spec.sequences // n_images)
    groups = calibration_groups(tok, embed, feats, per_image, max_answer_tokens=spec.max_answer_tokens)
    return Calibrator(
        stack,
        weights_of,
        groups,
        Grid(_BITS[cfg.precision], cfg.block_size),
        cfg.method_spec(),
        source=spec.describe(n_images),
    )


def layer_params(hidden: int, mlp: int, heads: int, kv_heads: int, head_dim: int) -> int:
    return hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * mlp


def calibration_positions(tok, spec: CalibrationSpec, image_tokens: int) -> int:
    """Positions the calibrated pass runs (export --dry-run) for a resolved spec: each image's prefix once, every
    suffix."""
    _, pairs = load_pairs()
    total = 0
    for i in range(spec.images):
        for j in range(spec.per_image):
            before, after = sequence_ids(tok, *pairs[(i * spec.per_image + j) % len(pairs)], spec.max_answer_tokens)
            total += len(after)
        total += len(before) + image_tokens
    return total
