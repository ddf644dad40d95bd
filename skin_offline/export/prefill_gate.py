"""Whether a default hybrid bundle keeps its int8 prefill graph: measured against fp32 when it is written.

The prefill graph (Kernel.QGEMM) quantizes each call's activations with one scale per tensor
(DynamicQuantizeMatMul). Trained language models carry a few activation channels hundreds of times larger than the
rest, which one scale per tensor holds badly: on the real-weights proxy (SmolLM2-135M, benchmarks/prefill_smoothing.py)
the graph agreed with fp32 on 79.4% of the probe turns' next tokens (mean KL 0.167 nats) where the calibrated int4
decode graph agrees on 85.0% (KL 0.097). After a calibrated int4 pass the graph is therefore smoothed (SmoothQuant,
codecs.smooth_factors) with that pass's activation statistics: 86.9% / KL 0.047 there. Random weights have no such
channels. Like the int8 vision tower (quantize.write_vision), a defaulted prefill graph must earn its place: its
next-token distributions on probe turns must be no further from fp32 than those of the decode graph it stands in
for. `--prefill int8` keeps it whatever the measurement says (the figures still go into the manifest).

The three decoders (fp32 reference, decode graph, prefill graph) run one layer at a time (layerstream.run_pass),
so the check holds one layer's weights at any model size. The prefill graph is measured before it is written, each
layer encoded in memory from the fp32 source, and written (a second pass over the weights, after the calibrated
pass has given its statistics) only when it is kept: a rejected one never takes disk space (at 7B it would be 7 GB
next to a ~4 GB bundle).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..manifest import GraphVariant, Kernel
from .layerstream import GraphStack, Group, LayerStack, release_memory, run_pass

if TYPE_CHECKING:
    from .quantize import GraphPlan

# Slack on the comparison, nats of mean KL. Why: on random weights both graphs sit within ~1e-3 of fp32's flat
# logits and their order is noise; a broken prefill graph is off by whole nats (the proxy: ~9).
KL_SLACK = 0.01
# One probe image followed by three MM-Skin turns. The image's 576 positions are most of the cost: three layer-
# streamed passes, 36 TFLOP at 7B (~6 min at 100 GFLOPS); the dry run predicts it (check_flops).
PROBE_IMAGES = (0,)  # quality.probe_image seeds
TURNS_PER_IMAGE = 3
PAIR_OFFSET = 200  # calibration.json pairs the int4 calibration does not reach at its defaults (128 sequences)
MAX_ANSWER_TOKENS = 48


def check_flops(
    hidden: int, mlp: int, heads: int, kv_heads: int, head_dim: int, layers: int, vocab: int, image_tokens: int
) -> float:
    """The check's cost for the dry run: three forward passes (fp32, decode graph, prefill graph) over the probe
    positions (the image, ~40 question tokens and the answer per turn; attention scores ignored), and three heads
    over the turns' positions."""
    q, kv = heads * head_dim, kv_heads * head_dim
    per_position = 2 * layers * (2 * q * hidden + 2 * kv * hidden + 3 * hidden * mlp)
    turns = TURNS_PER_IMAGE * (40 + MAX_ANSWER_TOKENS)
    positions = len(PROBE_IMAGES) * (image_tokens + 8 + turns)
    return 3.0 * (positions * per_position + len(PROBE_IMAGES) * turns * 2 * hidden * vocab)


@dataclass(frozen=True)
class PrefillCheck:
    """Teacher-forced next-token agreement with fp32 over the probe turns' positions."""

    prefill_kl: float  # mean KL(fp32 || prefill graph), nats
    decode_kl: float  # mean KL(fp32 || decode graph), nats
    prefill_top1: float
    decode_top1: float
    positions: int

    @property
    def passed(self) -> bool:
        return self.prefill_kl <= self.decode_kl + KL_SLACK

    def details(self, kept: bool) -> dict:
        """For the decode graph's manifest entry (kept or not, the measurement stays with the bundle)."""
        return {
            "prefill_gate": {
                "kl_mean": round(self.prefill_kl, 5),
                "decode_kl_mean": round(self.decode_kl, 5),
                "top1_agreement": round(self.prefill_top1, 4),
                "decode_top1_agreement": round(self.decode_top1, 4),
                "positions": self.positions,
                "passed": self.passed,
                "prefill_graph_kept": kept,
            }
        }

    def describe(self) -> str:
        return (
            f"top-1 agreement with fp32 {self.prefill_top1:.1%} (decode graph {self.decode_top1:.1%}), mean KL "
            f"{self.prefill_kl:.3f} nats (decode graph {self.decode_kl:.3f}) over {self.positions} positions"
        )


def probe_groups(
    tok, embed: Callable[[list[int]], np.ndarray], vision_graph: Path, preprocess_cfg, threads: int | None
) -> list[Group]:
    """Probe images through the fp32 vision graph, each followed by MM-Skin question/answer turns."""
    from .calibration import calibration_groups, image_features
    from .quality import probe_image

    feats = image_features(vision_graph, [probe_image(s) for s in PROBE_IMAGES], preprocess_cfg, threads)  # [I,N,H]
    return calibration_groups(
        tok, embed, feats, TURNS_PER_IMAGE, offset=PAIR_OFFSET, max_answer_tokens=MAX_ANSWER_TOKENS
    )


def _turn_logits(stack: LayerStack, groups: list[Group]) -> np.ndarray:
    """[n,V] logits at every position after the image (question, answer) of every group, through `stack`."""
    outs = run_pass(groups, lambda rows: stack, stack.num_layers)
    logits = np.concatenate([stack.head(s) for o in outs for s in o.suffixes])
    release_memory()
    return logits


def measure_prefill(
    reference: LayerStack, decode: LayerStack, prefill: LayerStack, groups: list[Group]
) -> PrefillCheck:
    from .quality import logit_metrics

    ref = _turn_logits(reference, groups)
    got = {}
    for name, stack in (("decode", decode), ("prefill", prefill)):
        got[name] = logit_metrics(ref, _turn_logits(stack, groups))
        stack.close()
    return PrefillCheck(
        got["prefill"]["kl_mean"],
        got["decode"]["kl_mean"],
        got["prefill"]["top1_agreement"],
        got["decode"]["top1_agreement"],
        ref.shape[0],
    )


def defer_prefill(plans: list[GraphPlan]) -> tuple[list[GraphPlan], GraphPlan | None]:
    """The plans to write in the weights' first pass, and a hybrid's prefill plan held back for `gate_prefill`: it is
    measured (and smoothed with the calibrated pass's activation statistics, `smoothed`) only after that pass, and
    written, in a second pass over the weights, only if it is kept."""
    qgemm = [p for p in plans if p.kernel == Kernel.QGEMM]
    if len(qgemm) != 1 or len(plans) != 2:  # no prefill graph, or the int8-only tier's one graph
        return plans, None
    return [p for p in plans if p is not qgemm[0]], qgemm[0]


def smoothed(plan: GraphPlan | None, act_absmax: dict[str, np.ndarray], alpha: float | None = None) -> GraphPlan | None:
    """The prefill plan with each weight it marks for smoothing (those the calibrated pass quantizes) given that pass's
    activation statistics (codecs.smooth_factors: what per-tensor activation scales need on a trained model); the
    rest (lm_head) as is."""
    from .codecs import SMOOTH_ALPHA, QGemm

    if plan is None:
        return plan
    a = SMOOTH_ALPHA if alpha is None else alpha
    codecs = {w: QGemm(act_absmax[w], a) if isinstance(c, QGemm) and c.smooth else c for w, c in plan.codecs.items()}
    return replace(plan, codecs=codecs)


def gate_prefill(
    decoders: list[GraphVariant],
    deferred: GraphPlan | None,
    forced: bool,
    write: Callable[[GraphPlan], GraphVariant],
    out_dir: Path,
    reference: LayerStack,
    groups: Callable[[], list[Group]],
    threads: int | None,
    log: Callable[[str], None],
) -> list[GraphVariant]:
    """`decoders` as written, with the hybrid's `deferred` prefill plan (defer_prefill) measured before it is written,
    each layer encoded in memory (quantize.encode_cut); the figures go into the decode graph's details
    ("prefill_gate"). `write` is called only when it passes or is `forced` (`--prefill int8`): a rejected graph
    (7 GB at 7B, the bundle would be ~4 GB without it) never touches the disk. Without a deferred plan, `decoders`
    come back unchanged."""
    from .quantize import encode_cut

    decode = [g for g in decoders if g.kernel != Kernel.QGEMM]
    if deferred is None or len(decode) != 1:
        return decoders
    (d,) = decode
    plan = deferred
    candidate = GraphStack(
        Path(out_dir) / plan.dst_name, threads, model=plan.source.model, fill=lambda c: encode_cut(plan, c)
    )
    log(
        f"checking the int8 prefill graph against fp32 ({len(PROBE_IMAGES)} probe images x {TURNS_PER_IMAGE} turns) ..."
    )
    check = measure_prefill(reference, GraphStack(Path(out_dir) / d.file, threads), candidate, groups())
    del candidate
    release_memory()
    kept = check.passed or forced
    d2 = replace(d, details={**d.details, **check.details(kept)})
    if not kept:
        log(
            f"int8 prefill graph rejected, not written: {check.describe()}; prompts prefill on the "
            f"{d.precision.value} decode graph (slower first token; --prefill int8 forces the graph)"
        )
        return [d2]
    log(f"int8 prefill graph {'kept' if check.passed else 'kept (forced by --prefill int8)'}: {check.describe()}")
    return [d2, write(plan)]
