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
                  max_context: int | None = None, verify: bool = True, log: Log = print,
                  lora: Path | None = None, fast_decoder: bool = True, precision: Precision | str | None = None) -> Manifest:
    """`src` is the checkpoint, or with `lora` the base checkpoint the PEFT adapter folder is merged onto.
    `precision` int4/int8/fp16: the fp32 export is quantized (export/quantize.py) into the final bundle."""
    if precision is not None and Precision(precision) != Precision.FP32:
        from .quantize import QuantConfig, export_quantized

        cfg = QuantConfig(Precision(precision))  # validated before any work
        return export_quantized(lambda dst: export_bundle(src, dst, vision_tower=vision_tower, image_mode=image_mode,
                                                          max_context=max_context, verify=verify, log=log, lora=lora,
                                                          fast_decoder=fast_decoder), out, cfg, log=log)
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
        if verify:
            log("verifying ONNX graphs against transformers (layer by layer) ...")
            report = verify_bundle_against_reference(tmp, ckpt)
            log("  " + ", ".join(f"{k} {v:.2e}" for k, v in report.items()))
            manifest = replace(manifest, verification=report)
            manifest.write(tmp)
    size = sum(e.size for e in manifest.files.values())
    log(f"bundle written to {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    return manifest


def verify_bundle_against_reference(folder: Path, ckpt: Checkpoint, seed: int = 0) -> dict:
    """Max abs diffs of the ONNX graphs vs transformers on a probe: image features and prompt logits."""
    from ..runtime.bundle import Bundle
    from . import reference

    rng = np.random.default_rng(seed)
    bundle = Bundle.load(folder, check_hashes=False, flavor=Flavor.STANDARD)
    s = bundle.manifest.preprocess.crop_size
    pixels = rng.standard_normal((1, 3, s, s), dtype=np.float32)
    feats = bundle.vision.encode(pixels)  # [1,N,H]
    ref_feats = reference.vision_features(ckpt, pixels)
    ids = rng.integers(3, min(bundle.manifest.tokens.tokenizer_vocab_size, bundle.manifest.model.vocab_size), 8)
    embeds = np.concatenate([bundle.embed(ids[:4]), feats[0], bundle.embed(ids[4:])])[None]  # [1,S,H]
    logits = bundle.decoder.logits_all(embeds)  # [1,S,V]
    ref_logits = reference.decoder_logits(ckpt, embeds)
    report = {
        "image_features_max_abs_diff": float(np.abs(feats - ref_feats).max()),
        "logits_max_abs_diff": float(np.abs(logits - ref_logits).max()),
        "logits_scale": float(np.abs(ref_logits).max()),
    }
    for g in bundle.manifest.variants(names.ROLE_DECODER):
        if g.flavor == Flavor.CONTRIB and g.precision == Precision.FP32:
            from ..runtime.decoder import make_decoder
            from ..runtime.sessions import SessionFactory

            fast = make_decoder(SessionFactory().create(folder / g.file), bundle.manifest.model, share_buffer=True)
            report["contrib_logits_max_abs_diff"] = float(np.abs(fast.logits_all(embeds) - ref_logits).max())
    return report


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
