"""Checkpoint folder -> bundle folder (vision graph, decoder graph, embedding table, tokenizer, manifest).

Every weight is read once from the (memory-mapped) checkpoint and appended to the graph's external
data, so export memory is bounded by the largest tensor; the bundle is built in a hidden sibling and
renamed into place only when complete and verified.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__, names
from ..manifest import (
    Attention,
    Flavor,
    GraphVariant,
    Manifest,
    ModelDims,
    PadMode,
    Precision,
    Prefill,
    PromptConfig,
    folder_entries,
)
from ..progress import task
from ..runtime.tokenizer import TextTokenizer
from .atomic import atomic_folder
from .checkpoint import Checkpoint, open_checkpoint
from .decoder_graph import build_decoder
from .decoder_graph_fast import build_decoder_fast
from .onnx_writer import external_initializers
from .tokenizer import token_config, write_tokenizer_json
from .vision_graph import build_vision

Log = Callable[[str], None]


def _versions() -> dict:
    out = {"skin_offline": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "numpy", "safetensors", "tokenizers", "sentencepiece"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _write_embeddings(ckpt: Checkpoint, folder: Path) -> str:
    table = ckpt.text_tensor("embed_tokens.weight").numpy()  # [V, H]
    np.save(folder / names.EMBEDDINGS, np.ascontiguousarray(table, dtype=np.float32))
    return names.EMBEDDINGS


def model_dims(ckpt: Checkpoint, max_context: int | None = None) -> ModelDims:
    t = ckpt.text
    return ModelDims(
        vocab_size=t.vocab,
        hidden_size=t.hidden,
        num_layers=t.layers,
        num_heads=t.heads,
        num_kv_heads=t.kv_heads,
        head_dim=t.head_dim,
        intermediate_size=t.mlp,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta,
        max_context=max_context or t.max_context,
        image_tokens=ckpt.vision.image_tokens,
        vision_hidden_size=ckpt.vision.hidden,
    )


def open_source(src: Path, lora: Path | None = None, **kw) -> Checkpoint:
    if lora is None:
        return open_checkpoint(Path(src), **kw)
    from .lora import open_lora_checkpoint

    return open_lora_checkpoint(Path(src), Path(lora), **kw)


def export_bundle(
    src: Path,
    out: Path,
    *,
    vision_tower: Path | None = None,
    image_mode: PadMode | None = None,
    max_context: int | None = None,
    verify: bool = True,
    quality: bool = True,
    log: Log = print,
    lora: Path | None = None,
    fast_decoder: bool = True,
    precision: Precision | str | None = None,
    probes=None,
    threads: int | None = None,
    quant_method=None,
    scale_search: bool | None = None,
    calibration_images: Path | None = None,
) -> Manifest:
    """`src` is the checkpoint, or with `lora` the base checkpoint the PEFT adapter folder is merged onto.

    `precision` int4/int8/fp16 (quantize's defaults): each checkpoint weight is encoded as it is read, straight into
    the quantized graphs (no fp32 copy on disk), by the same code `quantize` rewrites an fp32 bundle with, so both
    write the same graph files. `verify`: every graph checked against the checkpoint, layer by layer (verify.py);
    `quality`: the quantized graphs' agreement with the checkpoint in fp32 (quality.py); both in one layer-streamed
    pass, in bounded memory at any size."""
    cfg = quant_config(precision, quant_method, scale_search, calibration_images)  # validated before any work
    t0 = time.perf_counter()
    ckpt = open_source(src, lora, vision_tower=vision_tower, image_mode=image_mode)
    log(
        f"checkpoint: {ckpt.layout} layout, {ckpt.text.layers} decoder layers, hidden {ckpt.text.hidden}, "
        f"vision {ckpt.vision.hidden}x{ckpt.vision.kept_layers}/{ckpt.vision.layers} layers, "
        f"{ckpt.vision.image_tokens} image tokens"
    )
    with atomic_folder(Path(out)) as tmp:
        with task(log, "vision graph", total=ckpt.vision.kept_layers, unit="layers") as t:
            vfile, vdata = build_vision(
                ckpt.vision,
                lambda n: ckpt.vision_tensor(n).numpy(),
                lambda n: ckpt.projector_tensor(n).numpy(),
                tmp,
                progress=lambda i: t.advance(),
            )
        with task(log, "tokenizer", total=1, unit="files") as t:
            write_tokenizer_json(ckpt.folder, tmp / names.TOKENIZER)
            tokens = token_config(ckpt.folder, tmp / names.TOKENIZER)
            tok = TextTokenizer.from_file(tmp / names.TOKENIZER, tokens)  # loads as the runtime will
            t.advance()
        if cfg is None:
            decoders = _fp32_decoders(ckpt, tmp, max_context, fast_decoder, log)
        else:
            decoders = _quantized_decoders(ckpt, tmp, cfg, max_context, str(src), log, (tok, tmp / vfile, threads))
        vis32 = GraphVariant(names.ROLE_VISION, Precision.FP32, Flavor.STANDARD, vfile, vdata)
        vision = (vis32,)
        if cfg is not None and cfg.resolved_vision() != Precision.FP32:  # the same vision step as `quantize`
            from .quantize import write_vision

            vis = write_vision(
                tmp / vfile,
                vis32,
                tmp,
                replace(cfg, vision=cfg.resolved_vision()),
                cfg.vision_defaulted,
                ckpt.preprocess,
                log,
            )
            if vis is not None and vis.precision == Precision.INT8:
                for f in (vfile, *vdata):  # the int8 tower replaces the fp32 one (as quantize without --keep-source)
                    (tmp / f).unlink()
                vision = (vis,)
            elif vis is not None:
                vision = (vis32, vis)  # fp16 rides after fp32 (the CPU provider refuses fp16)
        graphs = (*vision, *decoders)
        files = folder_entries(tmp, log)
        manifest = Manifest(
            model=model_dims(ckpt, max_context),
            preprocess=ckpt.preprocess,
            prompt=PromptConfig("mistral_instruct"),
            tokens=tokens,
            graphs=graphs,
            files=files,
            source={
                "path": str(Path(src).resolve()),
                "layout": ckpt.layout,
                "fingerprint": ckpt.store.fingerprint(),
                "vision_tower": str(ckpt.vision_store.folder),
                "projector": ckpt.layout,
                **ckpt.notes,
                names.SOURCE_RANDOM_WEIGHTS: ckpt.random_weights,
            },
            exporter=_versions(),
        )
        manifest.write(tmp)
        manifest = check_bundle(
            tmp,
            manifest,
            ckpt,
            verify=verify,
            quality=quality and cfg is not None,
            probes=probes,
            threads=threads,
            log=log,
        )
    size = sum(e.size for e in manifest.files.values())
    log(f"bundle written to {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    return manifest


def quant_config(
    precision, quant_method=None, scale_search: bool | None = None, calibration_images: Path | None = None
):
    """quantize.QuantConfig of `export --precision P [--quant-method M] [--scale-search] [--calibration-images DIR]`
    (quantize's defaults otherwise); None for fp32."""
    if precision is None or Precision(precision) == Precision.FP32:
        if quant_method is not None or scale_search or calibration_images is not None:
            from ..errors import UsageError

            raise UsageError("--quant-method, --scale-search and --calibration-images are for --precision int4/int8")
        return None
    from .calibration import CalibrationSpec
    from .quantize import QuantConfig

    return QuantConfig(
        Precision(precision),
        method=quant_method,
        scale_search=scale_search,
        calibration=CalibrationSpec(image_dir=calibration_images),
    )


def _fp32_decoders(ckpt: Checkpoint, tmp: Path, max_context: int | None, fast_decoder: bool, log: Log) -> tuple:
    """The standard decoder graph, the contrib one sharing its weights, the fp32 embedding table."""
    with task(log, "decoder graph", total=ckpt.text.layers, unit="layers") as t:
        dfile, ddata = build_decoder(
            ckpt.text, lambda n: ckpt.text_tensor(n).numpy(), tmp, progress=lambda i: t.advance()
        )
    contrib = ()
    if fast_decoder:  # onnxruntime contrib-op variant: the runtime's default on CPU (GQA, in-place KV cache)
        with task(log, "contrib decoder graph", total=ckpt.text.layers, unit="layers") as t:
            ffile, fdata = build_decoder_fast(
                ckpt.text,
                lambda n: ckpt.text_tensor(n).numpy(),
                tmp,
                max_positions=max_context or ckpt.text.max_context,
                shared=external_initializers(tmp / dfile),
                progress=lambda i: t.advance(),
            )
        contrib = (
            GraphVariant(
                names.ROLE_DECODER, Precision.FP32, Flavor.CONTRIB, ffile, (ddata, fdata), attention=Attention.GQA
            ),
        )
    efile = _write_embeddings(ckpt, tmp)
    return (
        GraphVariant(names.ROLE_DECODER, Precision.FP32, Flavor.STANDARD, dfile, (ddata,), attention=Attention.CONCAT),
        *contrib,
        GraphVariant(names.ROLE_EMBEDDINGS, Precision.FP32, Flavor.STANDARD, efile),
    )


def _quantized_decoders(
    ckpt: Checkpoint, tmp: Path, cfg, max_context: int | None, where: str, log: Log, probes: tuple
) -> tuple:
    """The decoder graphs of `cfg` (quantize's plans: int4 + its int8 prefill graph by default) and the embedding
    table, each weight read from the checkpoint once and encoded on the way: the fp32 graph's structure is built
    first with every weight left unread (onnx_writer.LazyData), then quantize_graphs streams them. `probes`
    (tokenizer, fp32 vision graph, threads) feed the calibrated int4 pass, run as the weights stream (calibrate.py) on
    transformers' layers over the checkpoint's weights one layer at a time, and the int8 prefill graph's gate."""
    from .decoder_graph import decoder_model
    from .decoder_graph_fast import decoder_fast_model
    from .onnx_writer import LazyData, LazyTensor
    from .quantize import (
        _BITS,
        EmbeddingPrecision,
        GraphSource,
        decoder_plans,
        embedding_variant,
        quantize_table,
        write_plans,
    )

    lazy = LazyData()

    def tensor(name: str) -> LazyTensor:
        return LazyTensor(ckpt.text_shape(name), lambda: ckpt.text_tensor(name).numpy())

    if cfg.precision in _BITS:  # int4/int8 from the contrib (GroupQueryAttention) graph, as `quantize` does
        model = decoder_fast_model(ckpt.text, tensor, lazy, max_positions=max_context or ckpt.text.max_context)
        dec32 = GraphVariant(
            names.ROLE_DECODER,
            Precision.FP32,
            Flavor.CONTRIB,
            names.DECODER_CONTRIB_GRAPH,
            (names.external_data_name(names.DECODER_CONTRIB_GRAPH),),
            attention=Attention.GQA,
        )
    else:  # fp16 from the standard graph (GPU providers, TensorRT)
        model = decoder_model(ckpt.text, tensor, lazy)
        dec32 = GraphVariant(
            names.ROLE_DECODER,
            Precision.FP32,
            Flavor.STANDARD,
            names.DECODER_GRAPH,
            (names.external_data_name(names.DECODER_GRAPH),),
            attention=Attention.CONCAT,
        )
    prefill_forced = cfg.prefill == Prefill.INT8  # asked for by name: kept whatever prefill_gate measures
    cfg, plans = decoder_plans(cfg, GraphSource.lazy(dec32.file, model, lazy), dec32, where)
    calibrator = None
    calib = probes if cfg.calibrated else None
    if calib is not None:
        from .calibration import build_calibrator
        from .layerstream import CheckpointStack

        tok, vision_graph, threads = calib
        stack = CheckpointStack(ckpt)
        table = ckpt.text_tensor("embed_tokens.weight").numpy()  # [V,H]: the calibration rows, then dropped
        calibrator = build_calibrator(
            cfg,
            stack,
            stack.weights,
            lambda ids: table[np.asarray(ids, np.int64)],
            tok,
            vision_graph,
            ckpt.preprocess,
            threads,
            log,
        )
        del table
    from .layerstream import CheckpointStack
    from .prefill_gate import defer_prefill, gate_prefill, probe_groups, smoothed

    first, deferred = defer_prefill(plans)
    with _torch_threads(calib[2] if calib else None):
        decoders = write_plans(first, tmp, cfg, {dec32.file: dec32}, log, calibrator)
    if calibrator is not None:
        deferred = smoothed(deferred, calibrator.act_absmax)
    del calibrator
    tok, vision_graph, threads = probes

    def groups():
        table = ckpt.text_tensor("embed_tokens.weight").numpy()  # [V,H]
        return probe_groups(tok, lambda ids: table[np.asarray(ids, np.int64)], vision_graph, ckpt.preprocess, threads)

    decoders = gate_prefill(  # the hybrid's prefill graph: measured, written only if kept (others: unchanged)
        decoders,
        deferred,
        prefill_forced,
        lambda p: write_plans([p], tmp, cfg, {dec32.file: dec32}, log)[0],
        tmp,
        CheckpointStack(ckpt),
        groups,
        threads,
        log,
    )
    log(f"writing {cfg.embeddings.value} embedding table ...")
    table = ckpt.text_tensor("embed_tokens.weight").numpy()  # [V,H] fp32: one tensor
    if cfg.embeddings == EmbeddingPrecision.FP32:
        efile = _write_embeddings(ckpt, tmp)
        emb = GraphVariant(names.ROLE_EMBEDDINGS, Precision.FP32, Flavor.STANDARD, efile)
    else:
        efile, edata = quantize_table(lambda r0, n: table[r0 : r0 + n], *table.shape, tmp, cfg.embeddings)
        emb = embedding_variant(cfg.embeddings, efile, edata)
    return (*decoders, emb)


class _torch_threads:
    """torch's intra-op threads set to `n` for a block (the calibrated pass), restored after; None: unchanged."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        if self.n is not None:
            import torch

            self.before = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.n is not None:
            import torch

            torch.set_num_threads(self.before)


def check_bundle(
    folder: Path,
    manifest: Manifest,
    ckpt: Checkpoint,
    *,
    verify: bool = True,
    quality: bool = True,
    probes=None,
    threads: int | None = None,
    log: Log = print,
) -> Manifest:
    """Verification and the quality report of the bundle in `folder` against its checkpoint, in one layer-streamed
    pass (one decoder layer's weights in memory); a failed verification raises VerificationError. Returns the
    manifest with both recorded (and written)."""
    if not verify and not quality:
        return manifest
    from .quality import CheckpointReference, ProbeSet, measure
    from .verify import Verifier

    verifier = Verifier(folder, manifest, threads) if verify else None
    report = measure(
        folder,
        CheckpointReference(ckpt),
        probes or ProbeSet(),
        quality=quality,
        verifier=verifier,
        threads=threads,
        log=log,
    )
    if verifier is not None:
        verifier.raise_on_failure()
        manifest = replace(manifest, verification=verifier.result())
        log("verification passed: " + "; ".join(_summary(f, g) for f, g in manifest.verification["graphs"].items()))
    if quality:
        manifest = replace(manifest, quality=report)
    manifest.write(folder)
    return manifest


def verify_against_checkpoint(
    folder: Path,
    src: Path,
    *,
    lora: Path | None = None,
    vision_tower: Path | None = None,
    threads: int | None = None,
    probes=None,
    log: Log = print,
) -> dict:
    """`skin-offline verify BUNDLE --against CKPT`: the export's verification of an existing bundle (read only);
    returns the record, raises VerificationError naming the first mismatch."""
    from ..runtime.bundle import check_files
    from .quality import CheckpointReference, ProbeSet, measure
    from .verify import Verifier

    folder = Path(folder)
    manifest = Manifest.read(folder)
    check_files(folder, manifest, hashes=False)
    ckpt = open_source(src, lora, vision_tower=vision_tower, image_mode=manifest.preprocess.mode)
    verifier = Verifier(folder, manifest, threads)
    measure(
        folder,
        CheckpointReference(ckpt),
        probes or ProbeSet(),
        quality=False,
        verifier=verifier,
        threads=threads,
        log=log,
    )
    verifier.raise_on_failure()
    return verifier.result()


def _summary(file: str, g: dict) -> str:
    if "layers_checked" in g:
        return f"{file} {g['layers_checked']} layers (max rel diff {g['max_layer_rel_diff']:.1e})"
    if "feature_cosine" in g:
        return f"{file} (rel diff {g['max_abs_diff_rel']:.1e})"
    return f"{file} exact"


def describe(manifest: Manifest) -> dict:
    return {"model": asdict(manifest.model), "files": {k: v.size for k, v in manifest.files.items()}}
