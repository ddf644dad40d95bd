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
    Attention, Flavor, GraphVariant, Manifest, ModelDims, PadMode, Precision, PromptConfig, TokenConfig, folder_entries,
)
from ..progress import task
from ..runtime.tokenizer import TextTokenizer
from .atomic import atomic_folder
from .checkpoint import Checkpoint, TensorStore, open_checkpoint
from .decoder_graph import build_decoder
from .decoder_graph_fast import build_decoder_fast
from .onnx_writer import external_initializers
from .tokenizer import write_tokenizer_json
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
        vocab_size=t.vocab, hidden_size=t.hidden, num_layers=t.layers, num_heads=t.heads, num_kv_heads=t.kv_heads,
        head_dim=t.head_dim, intermediate_size=t.mlp, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
        max_context=max_context or t.max_context, image_tokens=ckpt.vision.image_tokens,
        vision_hidden_size=ckpt.vision.hidden,
    )


def open_source(src: Path, lora: Path | None = None, **kw) -> Checkpoint:
    if lora is None:
        return open_checkpoint(Path(src), **kw)
    from .lora import open_lora_checkpoint

    return open_lora_checkpoint(Path(src), Path(lora), **kw)


def export_bundle(src: Path, out: Path, *, vision_tower: Path | None = None, image_mode: PadMode | None = None,
                  max_context: int | None = None, verify: bool = True, quality: bool = True, log: Log = print,
                  lora: Path | None = None, fast_decoder: bool = True, precision: Precision | str | None = None,
                  probes=None, threads: int | None = None) -> Manifest:
    """`src` is the checkpoint, or with `lora` the base checkpoint the PEFT adapter folder is merged onto.
    `precision` int4/int8/fp16: the fp32 export is quantized (export/quantize.py) into the final bundle.
    `verify`: every graph checked against the checkpoint, layer by layer (verify.py); `quality`: the quantized
    graphs' agreement with the checkpoint in fp32 (quality.py); both in one layer-streamed pass, bounded memory."""
    if precision is not None and Precision(precision) != Precision.FP32:
        from .quantize import QuantConfig, export_quantized

        cfg = QuantConfig(Precision(precision))  # validated before any work

        def finish(folder: Path, manifest: Manifest) -> Manifest:
            manifest = replace(manifest, source={k: v for k, v in manifest.source.items() if k != "quantized_from"})
            manifest.write(folder)  # (the scratch fp32 bundle it came from is gone once this returns)
            ckpt = open_source(src, lora, vision_tower=vision_tower, image_mode=image_mode)
            return check_bundle(folder, manifest, ckpt, verify=verify, quality=quality, probes=probes,
                                threads=threads, log=log)

        return export_quantized(lambda dst: export_bundle(src, dst, vision_tower=vision_tower, image_mode=image_mode,
                                                          max_context=max_context, verify=False, quality=False,
                                                          log=log, lora=lora, fast_decoder=fast_decoder),
                                out, cfg, finish=finish, log=log)
    t0 = time.perf_counter()
    ckpt = open_source(src, lora, vision_tower=vision_tower, image_mode=image_mode)
    log(f"checkpoint: {ckpt.layout} layout, {ckpt.text.layers} decoder layers, hidden {ckpt.text.hidden}, "
        f"vision {ckpt.vision.hidden}x{ckpt.vision.kept_layers}/{ckpt.vision.layers} layers, "
        f"{ckpt.vision.image_tokens} image tokens")
    with atomic_folder(Path(out)) as tmp:
        with task(log, "vision graph", total=ckpt.vision.kept_layers, unit="layers") as t:
            vfile, vdata = build_vision(ckpt.vision, lambda n: ckpt.vision_tensor(n).numpy(),
                                        lambda n: ckpt.projector_tensor(n).numpy(), tmp, progress=lambda i: t.advance())
        with task(log, "decoder graph", total=ckpt.text.layers, unit="layers") as t:
            dfile, ddata = build_decoder(ckpt.text, lambda n: ckpt.text_tensor(n).numpy(), tmp,
                                         progress=lambda i: t.advance())
        contrib = ()
        if fast_decoder:  # onnxruntime contrib-op variant: the runtime's default on CPU (GQA, in-place KV cache)
            with task(log, "contrib decoder graph", total=ckpt.text.layers, unit="layers") as t:
                ffile, fdata = build_decoder_fast(ckpt.text, lambda n: ckpt.text_tensor(n).numpy(), tmp,
                                                  max_positions=max_context or ckpt.text.max_context,
                                                  shared=external_initializers(tmp / dfile), progress=lambda i: t.advance())
            contrib = (GraphVariant(names.ROLE_DECODER, Precision.FP32, Flavor.CONTRIB, ffile, (ddata, fdata),
                                    attention=Attention.GQA),)
        efile = _write_embeddings(ckpt, tmp)
        write_tokenizer_json(ckpt.folder, tmp / names.TOKENIZER)
        tok_vocab = TextTokenizer.from_file(tmp / names.TOKENIZER).vocab_size
        graphs = (
            GraphVariant(names.ROLE_VISION, Precision.FP32, Flavor.STANDARD, vfile, vdata),
            GraphVariant(names.ROLE_DECODER, Precision.FP32, Flavor.STANDARD, dfile, (ddata,), attention=Attention.CONCAT),
            *contrib,
            GraphVariant(names.ROLE_EMBEDDINGS, Precision.FP32, Flavor.STANDARD, efile),
        )
        files = folder_entries(tmp, log)
        manifest = Manifest(
            model=model_dims(ckpt, max_context), preprocess=ckpt.preprocess, prompt=PromptConfig("mistral_instruct"),
            tokens=TokenConfig(bos_id=1, eos_id=2, tokenizer_vocab_size=tok_vocab), graphs=graphs, files=files,
            source={"path": str(Path(src).resolve()), "layout": ckpt.layout, "fingerprint": ckpt.store.fingerprint(),
                    "vision_tower": str(ckpt.vision_store.folder), "projector": ckpt.layout, **ckpt.notes,
                    names.SOURCE_RANDOM_WEIGHTS: ckpt.random_weights},
            exporter=_versions(),
        )
        manifest.write(tmp)
        manifest = check_bundle(tmp, manifest, ckpt, verify=verify, quality=False, probes=probes, threads=threads,
                                log=log)
    size = sum(e.size for e in manifest.files.values())
    log(f"bundle written to {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    return manifest


def check_bundle(folder: Path, manifest: Manifest, ckpt: Checkpoint, *, verify: bool = True, quality: bool = True,
                 probes=None, threads: int | None = None, log: Log = print) -> Manifest:
    """Verification and the quality report of the bundle in `folder` against its checkpoint, in one layer-streamed
    pass (one decoder layer's weights in memory); a failed verification raises VerificationError. Returns the
    manifest with both recorded (and written)."""
    if not verify and not quality:
        return manifest
    from .quality import CheckpointReference, ProbeSet, measure
    from .verify import Verifier

    verifier = Verifier(folder, manifest, threads) if verify else None
    report = measure(folder, CheckpointReference(ckpt), probes or ProbeSet(), quality=quality, verifier=verifier,
                     threads=threads, log=log)
    if verifier is not None:
        verifier.raise_on_failure()
        manifest = replace(manifest, verification=verifier.result())
        log("verification passed: " + "; ".join(_summary(f, g) for f, g in manifest.verification["graphs"].items()))
    if quality:
        manifest = replace(manifest, quality=report)
    manifest.write(folder)
    return manifest


def verify_against_checkpoint(folder: Path, src: Path, *, lora: Path | None = None, vision_tower: Path | None = None,
                              threads: int | None = None, probes=None, log: Log = print) -> dict:
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
    measure(folder, CheckpointReference(ckpt), probes or ProbeSet(), quality=False, verifier=verifier, threads=threads,
            log=log)
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


def plan_export(src: Path, out: Path, *, lora: Path | None = None, vision_tower: Path | None = None,
                image_mode: PadMode | None = None, fast_decoder: bool = True, log: Log = print) -> dict:
    """--dry-run: open the checkpoint (headers only), print what would be written and the expected peak memory."""
    import resource

    ckpt = open_source(src, lora, vision_tower=vision_tower, image_mode=image_mode)
    numel = lambda shape: int(np.prod(shape, dtype=np.int64))  # noqa: E731
    vis = [numel(ckpt.vision_store.shape(ckpt.vision_prefix + n)) for n in ckpt.vision_names()]
    vis += [numel(ckpt.store.shape(f"{p}.{k}")) for p in ckpt.projector_names.values() for k in ("weight", "bias")]
    text = {n: numel(ckpt.text_shape(n)) for n in ckpt.text_names()}
    emb = text.pop("embed_tokens.weight")
    files = {  # fp32 bytes; graph protos and alignment padding are a few MB at most
        names.VISION_GRAPH: 4 * sum(vis), names.DECODER_GRAPH: 4 * sum(text.values()),
        names.EMBEDDINGS: 4 * emb, names.TOKENIZER: 2 << 20,
    }
    if fast_decoder:  # the contrib-op decoder shares the standard graph's weights; its own data is the RoPE table
        files[names.DECODER_CONTRIB_GRAPH] = 2 * 4 * (ckpt.text.head_dim // 2) * ckpt.text.max_context
    largest = 4 * max([*vis, *text.values(), emb])
    # Streaming design: one tensor upcast to fp32, its transposed copy and its serialised bytes (+ B@A for
    # LoRA), plus at most RELEASE_BYTES of memory-mapped checkpoint per open shard, on top of the imports.
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = baseline + (4 if lora else 3) * largest + 2 * TensorStore.RELEASE_BYTES
    total = sum(files.values())
    log(f"dry run: {ckpt.layout} layout{' + LoRA ' + str(lora) if lora else ''}, projector: "
        f"{ckpt.notes.get('projector', ckpt.layout)}; nothing written")
    for name, size in files.items():
        log(f"  would write {Path(out) / name}  ~{size / 1e9:.2f} GB (+ external data)" if name.endswith(".onnx")
            else f"  would write {Path(out) / name}  ~{size / 1e9:.2f} GB")
    import shutil

    parent = next(p for p in (Path(out).absolute(), *Path(out).absolute().parents) if p.exists())
    free = shutil.disk_usage(parent).free
    log(f"  bundle total ~{total / 1e9:.2f} GB fp32; free disk needed ~{total / 1e9:.2f} GB next to {out}, "
        f"{free / 1e9:.1f} GB free" + ("" if free > total else ": NOT ENOUGH, free space or pick another folder"))
    log(f"  expected peak memory ~{peak / 1e9:.2f} GB (imports {baseline / 1e9:.2f} GB + largest tensor "
        f"{largest / 1e9:.2f} GB x {4 if lora else 3}); --verify loads the fp32 graphs: ~{(baseline + total) / 1e9:.1f} GB")
    return {"files": files, "total_bytes": total, "free_bytes": free, "largest_tensor_bytes": largest, "baseline_rss_bytes": baseline,
            "peak_bytes": peak, "verify_peak_bytes": baseline + total}
