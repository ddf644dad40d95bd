"""`skin-offline build-engines`: serialized TensorRT engines for a bundle's standard-op graphs.

Built through onnxruntime's TensorRT execution provider with its engine cache inside the bundle
(`engines/<role>/`); the reasons (no extra dependency, one session code path, CUDA fallback for rejected
nodes) and the profile / compatibility logic are in runtime/tensorrt.py, which the runtime shares.
TensorRT cannot run onnxruntime contrib ops (GroupQueryAttention, MatMulNBits, ...), so only STANDARD-flavor
graphs are accepted, and each is checked node by node before anything is built.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import names
from ..errors import BundleError, DeviceError, UsageError
from ..manifest import Flavor, GraphVariant, Manifest, Precision, file_entry
from ..runtime import tensorrt as te
from ..runtime.devices import TRT_EP, TRT_INSTALL, Device, resolve

STANDARD_DOMAINS = ("", "ai.onnx")
CALIBRATION_TABLE = "calibration.flatbuffers"  # TensorRT int8 calibration table, placed in engines/<role>/


def nonstandard_ops(graph_path: Path) -> list[str]:
    """'domain::OpType' of every node (subgraphs included) outside the standard ONNX domain."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    found = set()

    def walk(graph):
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS:
                found.add(f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    walk(g)

    walk(model.graph)
    return sorted(found)


def assert_standard_ops(graph_path: Path) -> None:
    bad = nonstandard_ops(graph_path)
    if bad:
        raise BundleError(
            f"{graph_path.name} uses non-standard ops TensorRT cannot run ({', '.join(bad)}); "
            f"build engines from the bundle's standard-flavor graph (skin-offline info lists them)"
        )


def standard_variant(manifest: Manifest, role: str, precision: Precision | None) -> GraphVariant:
    cands = [
        g
        for g in manifest.variants(role)
        if g.flavor is Flavor.STANDARD and (precision is None or g.precision is precision)
    ]
    if not cands:
        have = ", ".join(f"{g.precision.value}/{g.flavor.value}" for g in manifest.variants(role)) or "none"
        want = precision.value if precision else "any"
        raise BundleError(
            f"bundle has no standard-op {role} graph at precision {want} (it has: {have}); "
            f"TensorRT needs one: re-export or pick another --precision"
        )
    return cands[0]


def plan(
    manifest: Manifest, max_context: int | None, max_batch: int = 1, precision: Precision | None = None
) -> dict[str, tuple[GraphVariant, list[te.Profile]]]:
    """role -> (standard graph, optimization profiles) for the engines to build."""
    limit = manifest.model.max_context
    ctx = max_context or limit
    if not 2 <= ctx <= limit:
        raise UsageError(f"--max-context {ctx} must be between 2 and the bundle's context {limit}")
    vis_prec = precision if precision in {g.precision for g in manifest.variants(names.ROLE_VISION)} else None
    return {
        names.ROLE_VISION: (
            standard_variant(manifest, names.ROLE_VISION, vis_prec),
            te.vision_profiles(manifest.preprocess.crop_size, max_batch),
        ),
        names.ROLE_DECODER: (
            standard_variant(manifest, names.ROLE_DECODER, precision),
            te.decoder_profiles(manifest.model, ctx, max_batch),
        ),
    }


def _dummy_feeds(session, profile: te.Profile) -> dict:
    """Inputs at the profile's opt shapes (zeros; ones for the mask), to make onnxruntime build and run the engine."""
    feeds = {}
    for i in session.get_inputs():
        if i.name in profile.shapes:
            shape = profile.shapes[i.name][1]
            dtype = np.int64 if "int64" in i.type else np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = (np.ones if i.name == names.ATTENTION_MASK else np.zeros)(shape, dtype)
        elif i.name == names.NUM_LOGITS_TO_KEEP:
            feeds[i.name] = np.array(1, np.int64)
    if names.POSITION_IDS in feeds:  # positions continue after the past
        s = feeds[names.POSITION_IDS].shape[1]
        total = feeds[names.ATTENTION_MASK].shape[1]
        feeds[names.POSITION_IDS] = np.arange(total - s, total, dtype=np.int64)[None].repeat(
            feeds[names.POSITION_IDS].shape[0], 0
        )
    return feeds


def write_record(folder: Path, record: te.EngineRecord) -> None:
    """Add the engine files (size + sha256) and the record to manifest.json, replacing any earlier engines."""
    path = folder / names.MANIFEST
    raw = json.loads(path.read_text())
    files = {k: v for k, v in raw[names.K_FILES].items() if not k.startswith(te.ENGINE_DIR + "/")}
    for p in sorted((folder / te.ENGINE_DIR).rglob("*")):
        if p.is_file():
            e = file_entry(p)
            files[p.relative_to(folder).as_posix()] = {"size": e.size, "sha256": e.sha256}
    raw[names.K_FILES] = dict(sorted(files.items()))
    raw[te.MANIFEST_KEY] = record.to_dict()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    os.replace(tmp, path)  # a crash leaves the old manifest, never half of one


def build_engines(
    folder: Path,
    *,
    fp16: bool = False,
    int8: bool = False,
    max_context: int | None = None,
    workspace_gb: float = 4.0,
    max_batch: int = 1,
    precision: str | None = None,
    log: Callable[[str], None] = print,
) -> te.EngineRecord:
    import onnxruntime as ort

    folder = Path(folder)
    manifest = Manifest.read(folder)
    prec = Precision(precision) if precision else None
    todo = plan(manifest, max_context, max_batch, prec)
    for variant, _ in todo.values():
        assert_standard_ops(folder / variant.file)
    choice = resolve(Device.TENSORRT)  # DeviceError (exit 5) without onnxruntime-gpu's TensorRT provider
    trt_version, gpu = te.tensorrt_version(), te.gpu_info()
    if trt_version is None or gpu is None:
        raise DeviceError(
            "TensorRT engines need an NVIDIA GPU and TensorRT's libnvinfer "
            f"(found: GPU {gpu.name if gpu else 'none'}, TensorRT {trt_version or 'none'}); {TRT_INSTALL}"
        )
    if int8 and not all((folder / te.ENGINE_DIR / role / CALIBRATION_TABLE).is_file() for role in todo):
        raise UsageError(
            f"--int8 needs a TensorRT calibration table {te.ENGINE_DIR}/<role>/{CALIBRATION_TABLE} for "
            f"each graph (fp32 graphs carry no int8 ranges); build fp16 engines instead"
        )
    from ..runtime.sessions import SessionFactory

    factory = SessionFactory(device=choice)
    ctx = max_context or manifest.model.max_context
    graphs = {}
    for role, (variant, profiles) in todo.items():
        cache = folder / te.ENGINE_DIR / role
        if cache.exists():  # stale engines (another GPU / precision) would be listed in the manifest; keep the table
            for old in cache.iterdir():
                if old.name != CALIBRATION_TABLE:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        cache.mkdir(parents=True, exist_ok=True)
        opts = te.provider_options(
            cache,
            profiles,
            fp16=fp16,
            int8=int8,
            workspace_gb=workspace_gb,
            calibration_table=CALIBRATION_TABLE if int8 else None,
        )
        log(f"building TensorRT engine for {variant.file} ({len(profiles)} profile(s)) ...")
        t0 = time.perf_counter()
        session = factory.create(folder / variant.file, [(TRT_EP, opts), *choice.providers[1:]])
        for p in profiles:  # one run per profile: the engine exists and executes at its opt shapes
            session.run(None, _dummy_feeds(session, p))
        log(f"  built in {time.perf_counter() - t0:.0f}s")
        graphs[role] = {
            "file": variant.file,
            "precision": variant.precision.value,
            "cache_dir": cache.relative_to(folder).as_posix(),
            "profiles": [{n: [list(s) for s in shp] for n, shp in p.shapes.items()} for p in profiles],
        }
    record = te.EngineRecord(
        tensorrt_version=trt_version,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        onnxruntime_version=ort.__version__,
        fp16=fp16,
        int8=int8,
        max_context=ctx,
        max_batch=max_batch,
        workspace_gb=workspace_gb,
        graphs=graphs,
    )
    write_record(folder, record)
    return record
