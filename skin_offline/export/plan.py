"""`export --dry-run`: the files an export would write, their sizes, the disk and memory it needs; writes nothing.

Sizes come from the same code the export runs, not from a formula of its own: the decoder graphs' structure is
built with every weight left unread (onnx_writer.LazyData) and planned by quantize.decoder_plans, and each
weight's stored size is its codec's (`Codec.nbytes`), padded as ExternalData pads (4 KiB). Only headers of the
checkpoint are read. Memory is the largest of the stages' needs on top of this process's own size once it has
imported what the export imports and opened the checkpoint:
- writing: one fp32 tensor, its contiguous transposed copy, its encodings, and the memory-mapped checkpoint
  pages TensorStore lets stay resident (64 MiB per open shard; LoRA: + the B @ A product);
- the CLIP reference (transformers, fp32) and each vision graph;
- the quality report's quantized side: one decode graph loaded whole, one layer of the prefill graph, the keys of
  one probe image's prompts;
- the reference pass and verification: one decoder layer's fp32 weights, a decoded copy and a graph's layer cut.
`tests/test_export_plan.py` checks these against a real run's files and peak RSS.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import names
from ..manifest import Kernel, PadMode, Precision, Prefill

ALIGN = 4096
TOKENIZER_BYTES = 1_400_000  # the Mistral tokenizer.json this exporter writes (1.36 MB), when the checkpoint has none
MANIFEST_BYTES = 64_000
ACTIVATIONS = 400 << 20  # probe activations, attention scores, onnxruntime's working buffers (measured: < 0.3 GB)


def _aligned(sizes: list[int]) -> int:
    """ExternalData's file size for tensors of these sizes, written in order (each starts 4 KiB aligned)."""
    off = 0
    for n in sizes:
        off += (-off) % ALIGN
        off += n
    return off


@dataclass
class ExportPlan:
    files: dict[str, int]  # file -> bytes
    stages: dict[str, int]  # stage -> peak resident bytes expected
    baseline: int
    free_bytes: int
    existing_bytes: int = 0  # a bundle already at OUT stays until the new one replaces it
    transient_bytes: int = 0  # written and removed again before the end (the fp32 vision tower an int8 one replaces)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.files.values())

    @property
    def disk_needed(self) -> int:
        """Disk high-water: every file is written once, into a hidden folder next to OUT, then renamed into place;
        the fp32 vision tower an int8 one replaces exists until that one is written."""
        return self.total + self.transient_bytes

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "total_bytes": self.total,
            "disk_needed_bytes": self.disk_needed,
            "free_bytes": self.free_bytes,
            "existing_bytes": self.existing_bytes,
            "stages": self.stages,
            "baseline_rss_bytes": self.baseline,
            "peak_bytes": self.peak,
        }


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


def plan_export(
    src: Path,
    out: Path,
    *,
    lora: Path | None = None,
    vision_tower: Path | None = None,
    image_mode: PadMode | None = None,
    precision: Precision | str | None = None,
    max_context: int | None = None,
    fast_decoder: bool = True,
    verify: bool = True,
    quality: bool = True,
    log=print,
    quant_method=None,
    scale_search: bool | None = None,
    calibration_images: Path | None = None,
) -> ExportPlan:
    import onnxruntime  # noqa: F401  (the export imports these: part of its size)
    import transformers.models.mistral.modeling_mistral  # noqa: F401

    from .checkpoint import TensorStore
    from .onnx_writer import LazyData, LazyTensor
    from .quantize import (
        _BITS,
        EmbeddingPrecision,
        GraphSource,
        convert_graph_fp16,
        decoder_plans,
        is_external,
    )
    from .to_onnx import open_source, quant_config

    cfg = quant_config(precision, quant_method, scale_search, calibration_images)
    ckpt = open_source(src, lora, vision_tower=vision_tower, image_mode=image_mode)
    baseline = _rss()
    numel = lambda shape: int(np.prod(shape, dtype=np.int64))  # noqa: E731
    t = ckpt.text
    files: dict[str, int] = {}

    # vision: fp32, then (int4/int8 exports, quantize's default) the int8 tower written from it, which replaces it
    # unless it fails the feature-cosine gate (assumed to pass here: the fp32 files are then the transient part)
    shapes = [(n, ckpt.vision_store.shape(ckpt.vision_prefix + n)) for n in ckpt.vision_names()]
    shapes += [
        (f"{p}.{k}", ckpt.store.shape(f"{p}.{k}")) for p in ckpt.projector_names.values() for k in ("weight", "bias")
    ]
    vis = [4 * numel(s) for _, s in shapes]
    vis32 = {
        names.external_data_name(names.VISION_GRAPH): _aligned([b for b in vis if b >= 1024]),
        names.VISION_GRAPH: 4000 + 5000 * ckpt.vision.kept_layers,
    }  # the proto: ~5 KB of nodes per layer
    transient = 0
    if cfg is not None and cfg.resolved_vision() == Precision.INT8:
        from .codecs import QGemm

        sizes = []
        for name, shape in shapes:  # the encoder's dense weights [out,in] -> MatMul [in,out] -> int8 + scales
            dense = len(shape) == 2 and name.endswith(".weight") and "embedding" not in name
            sizes += (
                QGemm().nbytes(int(shape[1]), int(shape[0])) if dense else [b for b in [4 * numel(shape)] if b >= 1024]
            )
        vfile = names.variant_file(names.VISION_GRAPH, "int8")
        files[names.external_data_name(vfile)] = _aligned(sizes)
        files[vfile] = vis32[names.VISION_GRAPH] + 2000 * ckpt.vision.kept_layers  # scale inputs per MatMul
        transient = sum(vis32.values())
    else:
        files.update(vis32)

    lazy = LazyData()
    read_bytes = []  # fp32 size of every tensor the writing stage reads

    def tensor(name: str) -> LazyTensor:
        shape = ckpt.text_shape(name)
        read_bytes.append(4 * numel(shape))
        return LazyTensor(shape, lambda: np.zeros(shape, np.float32))  # only the small ones are ever "read"

    from .decoder_graph import decoder_model
    from .decoder_graph_fast import decoder_fast_model

    ctx = max_context or t.max_context
    decode_graphs: list[tuple[str, int]] = []  # (file, data bytes): what the quality report loads whole
    layer_cut = 0  # the largest layer of any decoder graph (a cut's weights)
    if cfg is None:
        std = decoder_model(t, tensor, lazy)
        files[names.external_data_name(names.DECODER_GRAPH)] = _aligned(
            [lazy.sources[x.name].nbytes for x in std.graph.initializer if is_external(x)]
        )
        files[names.DECODER_GRAPH] = std.ByteSize()
        if fast_decoder:  # shares the standard graph's weights; its own data is the RoPE tables
            fast = decoder_fast_model(t, tensor, LazyData(), max_positions=ctx)
            files[names.external_data_name(names.DECODER_CONTRIB_GRAPH)] = _aligned([2 * 4 * (t.head_dim // 2) * ctx])
            files[names.DECODER_CONTRIB_GRAPH] = fast.ByteSize()
        files[names.EMBEDDINGS] = 128 + 4 * t.vocab * t.hidden
        layer_cut = 4 * _layer_params(t)
    else:
        from ..manifest import Attention, Flavor, GraphVariant

        if cfg.precision in _BITS:
            model = decoder_fast_model(t, tensor, lazy, max_positions=ctx)
            dec32 = GraphVariant(
                names.ROLE_DECODER, Precision.FP32, Flavor.CONTRIB, names.DECODER_CONTRIB_GRAPH, attention=Attention.GQA
            )
        else:
            model = decoder_model(t, tensor, lazy)
            dec32 = GraphVariant(
                names.ROLE_DECODER, Precision.FP32, Flavor.STANDARD, names.DECODER_GRAPH, attention=Attention.CONCAT
            )
        cfg, plans = decoder_plans(cfg, GraphSource.lazy(dec32.file, model, lazy), dec32, str(src))
        for plan in plans:
            keep = convert_graph_fp16(_copy(model))[1] if plan.to_fp16 else set()
            sizes, per_layer = [], {}
            for x in model.graph.initializer:
                codec = plan.codecs.get(x.name)
                if codec is not None:
                    k, n = x.dims
                    got = codec.nbytes(int(k), int(n))
                elif is_external(x):
                    b = lazy.sources[x.name].nbytes
                    got = [b // 2 if plan.to_fp16 and x.name not in keep else b]
                else:
                    continue
                sizes += got
                if x.name.startswith("layers."):
                    i = int(x.name.split(".")[1])
                    per_layer[i] = per_layer.get(i, 0) + sum(got)
            data = _aligned(sizes)
            files[names.external_data_name(plan.dst_name)] = data
            files[plan.dst_name] = model.ByteSize()
            decode_graphs.append((plan.dst_name, data))
            layer_cut = max(layer_cut, max(per_layer.values(), default=0))
        emb = cfg.embeddings
        files[names.variant_file(names.EMBEDDINGS, emb.value)] = 128 + t.vocab * t.hidden * (
            4 if emb == EmbeddingPrecision.FP32 else 2 if emb == EmbeddingPrecision.FP16 else 1
        )
        if emb == EmbeddingPrecision.INT8:
            files[names.embedding_scales_file(emb.value)] = 128 + 4 * t.vocab
    tok = ckpt.folder / names.TOKENIZER
    files[names.TOKENIZER] = tok.stat().st_size if tok.is_file() else TOKENIZER_BYTES
    files[names.MANIFEST] = MANIFEST_BYTES

    # --- memory, stage by stage ---
    largest = max(read_bytes + vis)
    mapped = 2 * (TensorStore.RELEASE_BYTES + largest // 2)  # resident checkpoint pages, vision + text stores
    stages = {"write": baseline + (3 if lora else 2) * largest + largest // 4 + mapped}
    notes = []
    if cfg is not None and cfg.calibrated:
        from .calibrate import PASS_EFFICIENCY

        cost, seconds = _calibration_cost(ckpt, cfg)
        stages["calibrated int4 pass"] = stages["write"] + cost.peak_bytes
        notes.append(
            f"calibrated int4 pass ({cfg.method_spec().describe()}): {cost.flops / 1e12:.0f} TFLOP, "
            f"~{seconds / 60:.1f} min at this machine's fp32 GEMM rate now (x {PASS_EFFICIENCY}, the pass's measured "
            f"efficiency), on top of the rest of the export"
        )
    if cfg is not None and cfg.precision == Precision.INT4 and cfg.prefill == Prefill.INT8:
        from .calibrate import measure_gflops
        from .prefill_gate import check_flops

        # the prefill graph's gate (prefill_gate.py): a layer of the reference and of a quantized graph, three [n,V]
        # logit tables
        gate = check_flops(
            t.hidden, t.mlp, t.heads, t.kv_heads, t.head_dim, t.layers, t.vocab, ckpt.vision.image_tokens
        )
        stages["int8 prefill gate"] = baseline + 4 * _layer_params(t) + layer_cut + 3 * 300 * 4 * t.vocab + ACTIVATIONS
        qgemm = names.kernel_variant_file(names.DECODER_GRAPH, "int8", Kernel.QGEMM.value)
        prefill_bytes = sum(v for k, v in files.items() if k in (qgemm, names.external_data_name(qgemm)))
        smooth = " (smoothed with the calibrated pass's activation statistics)" if cfg.calibrated else ""
        notes.append(
            f"int8 prefill graph{smooth} check against fp32: {gate / 1e12:.0f} TFLOP, ~{gate / 1e9 / measure_gflops() / 60:.1f} "
            f"min at this machine's fp32 GEMM rate now; the graph is written (a second pass over the weights) only "
            f"when it passes, else the bundle is {(sum(files.values()) - prefill_bytes) / 1e9:.2f} GB"
        )
    if transient:  # the int8 tower's gate: the fp32 and int8 vision graphs loaded side by side
        stages["vision int8 gate"] = baseline + sum(vis) + sum(vis) // 4 + ACTIVATIONS
    if verify or (quality and cfg is not None):
        clip = sum(vis)
        stages["vision reference"] = baseline + clip + ACTIVATIONS
        layer32 = 4 * _layer_params(t)
        head32 = 4 * t.vocab * t.hidden
        stages["reference + verification"] = baseline + 2 * layer32 + max(layer32, layer_cut) + head32 + ACTIVATIONS
    if quality and cfg is not None:
        from .quality import MEMORY_BUDGET, ProbeSet

        probes = ProbeSet()
        prompt = ckpt.vision.image_tokens + 64
        kv = probes.num_questions * prompt * 2 * t.layers * t.kv_heads * t.head_dim * 4
        for file, data in decode_graphs:
            if data > MEMORY_BUDGET - (1 << 30):
                continue  # the report skips it (and says so)
            stages[f"quality: {file}"] = baseline + data + layer_cut + kv + ACTIVATIONS

    dest = Path(out).absolute()
    parent = next(p for p in (dest, *dest.parents) if p.exists())
    existing = sum(f.stat().st_size for f in dest.iterdir() if f.is_file()) if dest.is_dir() else 0
    plan = ExportPlan(files, stages, baseline, shutil.disk_usage(parent).free, existing, transient, notes=notes)
    _report(plan, ckpt, lora, out, cfg, log)
    return plan


def _calibration_cost(ckpt, cfg):
    """(calibrate.PassCost, predicted seconds) of the calibrated int4 pass on this checkpoint: its exact calibration
    positions (the checkpoint's tokenizer over the shipped text) at this machine's measured GEMM rate."""
    import tempfile

    from ..runtime.tokenizer import TextTokenizer
    from .calibrate import measure_gflops, pass_cost
    from .calibration import calibration_positions, layer_params
    from .tokenizer import token_config, write_tokenizer_json

    with tempfile.TemporaryDirectory() as d:
        tj = write_tokenizer_json(ckpt.folder, Path(d) / names.TOKENIZER)
        tok = TextTokenizer.from_file(tj, token_config(ckpt.folder, tj))
        t = ckpt.text
        spec = cfg.calibration.resolved(layer_params(t.hidden, t.mlp, t.heads, t.kv_heads, t.head_dim))
        positions = calibration_positions(tok, spec, ckpt.vision.image_tokens)
    cost = pass_cost(t.hidden, t.mlp, t.heads, t.kv_heads, t.head_dim, t.layers, positions, cfg.method_spec())
    return cost, cost.seconds(measure_gflops())


def _layer_params(t) -> int:
    return (
        2 * t.heads * t.head_dim * t.hidden
        + 2 * t.kv_heads * t.head_dim * t.hidden
        + 3 * t.hidden * t.mlp
        + 2 * t.hidden
    )


def _copy(model):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _report(plan: ExportPlan, ckpt, lora, out, cfg, log) -> None:
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    what = (
        "fp32" if cfg is None else f"{cfg.precision.value} (prefill {cfg.prefill.value}, lm_head {cfg.lm_head.value})"
    )
    log(
        f"dry run: {ckpt.layout} layout{' + LoRA ' + str(lora) if lora else ''}, projector: "
        f"{ckpt.notes.get('projector', ckpt.layout)}, {what}; nothing written"
    )
    for name, size in plan.files.items():
        log(f"  would write {Path(out) / name}  {gb(size)}")
    need = plan.disk_needed
    ok = plan.free_bytes > need
    log(
        f"  bundle {gb(plan.total)}; disk needed {gb(need)} (every file written once, no fp32 copy)"
        + (
            f", and the {gb(plan.existing_bytes)} bundle already at {out} stays until replaced"
            if plan.existing_bytes
            else ""
        )
        + f"; {plan.free_bytes / 1e9:.1f} GB free"
        + ("" if ok else ": NOT ENOUGH, free space or pick another folder")
    )
    log(
        f"  expected peak memory {gb(plan.peak)} (this process {gb(plan.baseline)}; by stage: "
        + ", ".join(f"{k} {gb(v)}" for k, v in plan.stages.items())
        + ")"
    )
    for note in plan.notes:
        log(f"  {note}")
