"""`skin-offline bench`: per-stage timings of one bundle through the product's own request path.

Each run is one `SkinVL.stream` request (image -> pixels -> vision -> prompt -> prefill -> decode), the
image-feature cache disabled so every run pays the vision encoder. W warmup runs are discarded; the
report keeps every measured run and their medians. Next to the decode rate it puts the roofline:
bandwidth / bytes read per decoded token (decoder weights + the KV cache at the mean context), for the
measured bandwidth and for the Jetson boards' memory.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import names
from .machine import Bandwidth, MachineInfo, machine_info

DEFAULT_QUESTION = "What is this lesion?"  # short: 576 image tokens + this = 587, so --prompt-tokens 600 is reachable
FILLER = " skin"  # one token per repetition in the Mistral vocabulary; pads the question to --prompt-tokens
JETSON_ROOFLINES_GBS = {"jetson_agx_orin": 204.8, "jetson_orin_nano_super": 102.0, "jetson_orin_nano": 68.0}
STAGES = (
    "load_s",
    "preprocess_s",
    "vision_s",
    "prefill_s",
    "prefill_tokens_per_s",
    "ttft_s",
    "decode_tokens_per_s",
    "end_to_end_s",
)


@dataclass(frozen=True)
class BenchConfig:
    bundle: Path
    image: Path | None = None  # None: a seeded random 512x384 image
    question: str = DEFAULT_QUESTION
    runs: int = 3
    warmup: int = 1
    prompt_tokens: int | None = None  # pad the question until image tokens + text reach this
    new_tokens: int = 128
    threads: int | None = None
    precision: str | None = None
    device: str = "auto"
    probe_bandwidth: bool = True
    prefill: str | None = None  # Prefill value: which graph many-row calls run through (None: the bundle's default)

    def __post_init__(self):
        from ..errors import UsageError

        if self.runs < 1 or self.warmup < 0 or self.new_tokens < 1:
            raise UsageError("--runs and --new-tokens must be >= 1 and --warmup >= 0")


@dataclass
class BenchResult:
    config: dict
    machine: dict
    model: dict  # precision, flavor, provider, threads, weight bytes, KV bytes
    runs: list[dict] = field(default_factory=list)  # one dict of STAGES per measured run
    medians: dict = field(default_factory=dict)
    roofline: dict = field(default_factory=dict)  # name -> decode tokens/s bound
    peak_rss_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def demo_image(seed: int = 0):
    """A seeded noise image: the bench measures speed, and every size is resized to the same pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((384, 512, 3)) * 255).astype(np.uint8))


def pad_question(tokenizer, question: str, image_tokens: int, target: int | None) -> str:
    """Append FILLER words until image tokens + prompt text tokens reach `target` (never shortens)."""
    from ..runtime.prompt import build_prompt_ids

    def length(q: str) -> int:
        return len(build_prompt_ids(tokenizer, q)) - 1 + image_tokens

    if target is None or length(question) >= target:
        return question
    q = question + FILLER * (target - length(question))
    while length(q) > target and q.endswith(FILLER):  # a filler that merged with its neighbour: trim back
        q = q[: -len(FILLER)]
    while length(q) < target:
        q += FILLER
    return q


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def model_facts(model, threads: int) -> dict:
    """What was measured: graph variant, provider, threads, bytes read per token."""
    m = model.manifest
    dec = model.bundle.picked[names.ROLE_DECODER]
    multi = model.bundle.picked.get("multi_row")
    weight_bytes = sum(m.files[f].size for f in (dec.file, *dec.data_files) if f in m.files)
    past = next((i for i in model.bundle.decoder.session.get_inputs() if i.name == names.past_key(0)), None)
    kv_item = 2 if past is not None and "float16" in past.type else 4
    return {
        "precision": dec.precision.value,
        "flavor": dec.flavor.value,
        "decoder_file": dec.file,
        # many-row calls (prefill) ran through: the int8 GEMM graph of a hybrid bundle, or the decoder itself
        "prefill": f"{multi.precision.value} {multi.kernel.value}" if multi else dec.precision.value,
        "decoder_weight_bytes": weight_bytes,
        "kv_bytes_per_token": m.model.kv_bytes_per_token(kv_item),
        "provider": model.bundle.decoder.session.get_providers()[0],
        "vision_provider": model.bundle.vision.session.get_providers()[0],
        "threads": threads,
        "layers": m.model.num_layers,
        "hidden": m.model.hidden_size,
        "image_tokens": m.model.image_tokens,
    }


def bytes_per_token(facts: dict, context: float) -> float:
    """Decoder weights + the whole KV cache, read once per decoded token at `context` cached positions."""
    return facts["decoder_weight_bytes"] + facts["kv_bytes_per_token"] * context


def rooflines(bandwidth: Bandwidth | None, facts: dict, context: float) -> dict:
    b = bytes_per_token(facts, context)
    out = {"bytes_per_token": int(b), "mean_context": round(context, 1)}
    if bandwidth is not None:
        out["measured_bandwidth_gb_per_s"] = bandwidth.gb_per_s
        out["measured"] = round(bandwidth.gb_per_s * 1e9 / b, 2)
    for name, gbs in JETSON_ROOFLINES_GBS.items():
        out[name] = round(gbs * 1e9 / b, 2)
    return out


def one_run(model, image, question: str, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    last = None
    for r in model.stream(image, question, max_new_tokens=new_tokens):
        last = r
    e2e = time.perf_counter() - t0
    t = last.timings
    return {
        "preprocess_s": t.preprocess_s,
        "vision_s": t.vision_s,
        "prefill_s": t.prefill_s,
        "prefill_tokens_per_s": t.prompt_tokens / t.prefill_s if t.prefill_s > 0 else 0.0,
        "ttft_s": t.ttft_s,
        "decode_tokens_per_s": t.decode_tokens_per_s,
        "end_to_end_s": e2e,
        "prompt_tokens": t.prompt_tokens,
        "new_tokens": t.new_tokens,
    }


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda m: None) -> BenchResult:
    from ..runtime.bundle import Bundle
    from ..runtime.pipeline import SkinVL
    from ..runtime.sessions import default_threads
    from ..runtime.tokenizer import TextTokenizer

    threads = cfg.threads or default_threads()
    t0 = time.perf_counter()
    bundle = Bundle.load(cfg.bundle, threads=threads, precision=cfg.precision, device=cfg.device, prefill=cfg.prefill)
    model = SkinVL(
        bundle, TextTokenizer.from_file(bundle.folder / names.TOKENIZER), feature_cache_size=0, prompt_cache_size=0
    )
    load_s = time.perf_counter() - t0
    facts = model_facts(model, threads)
    image = cfg.image if cfg.image is not None else demo_image()
    question = pad_question(model.tokenizer, cfg.question, bundle.manifest.model.image_tokens, cfg.prompt_tokens)
    log(
        f"loaded {cfg.bundle} in {load_s:.2f}s: {facts['precision']} {facts['flavor']} decoder on {facts['provider']}, "
        f"{threads} threads"
    )
    for i in range(cfg.warmup):
        log(f"warmup {i + 1}/{cfg.warmup}")
        one_run(model, image, question, cfg.new_tokens)
    runs = []
    for i in range(cfg.runs):
        r = one_run(model, image, question, cfg.new_tokens)
        r["load_s"] = load_s
        runs.append(r)
        log(f"run {i + 1}/{cfg.runs}: ttft {r['ttft_s']:.3f}s, decode {r['decode_tokens_per_s']:.2f} tok/s")
    peak = peak_rss_bytes()
    log("probing memory bandwidth ..." if cfg.probe_bandwidth else "bandwidth probe skipped")
    machine: MachineInfo = machine_info(bandwidth=cfg.probe_bandwidth, threads=threads)
    medians = {k: statistics.median(r[k] for r in runs) for k in (*STAGES, "prompt_tokens", "new_tokens")}
    context = medians["prompt_tokens"] + medians["new_tokens"] / 2
    result = BenchResult(
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()} | {"question": question},
        machine=machine.to_dict(),
        model=facts,
        runs=runs,
        medians=medians,
        roofline=rooflines(machine.bandwidth, facts, context),
        peak_rss_bytes=peak,
    )
    if medians["new_tokens"] < cfg.new_tokens:
        result.notes.append(f"the model stopped (EOS) after {medians['new_tokens']:.0f} of {cfg.new_tokens} tokens")
    if machine.jetson and machine.jetson.get("board_bandwidth_gb_per_s"):
        gbs = machine.jetson["board_bandwidth_gb_per_s"]
        result.roofline["this_board"] = round(gbs * 1e9 / result.roofline["bytes_per_token"], 2)
    if "measured" in result.roofline and result.roofline["measured"] > 0:
        result.roofline["fraction_of_measured"] = round(medians["decode_tokens_per_s"] / result.roofline["measured"], 3)
    return result
