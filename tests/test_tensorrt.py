"""TensorRT engine management, CPU side: profiles vs the real graphs, standard-op checks, the manifest
record, and refusal of engines built for another GPU / TensorRT. No TensorRT exists here; building
must fail cleanly (DeviceError), and nothing here pretends an engine ran."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from skin_offline import names
from skin_offline.errors import BundleError, DeviceError, UsageError
from skin_offline.export import tensorrt as build
from skin_offline.manifest import Flavor, Manifest
from skin_offline.runtime import devices
from skin_offline.runtime import tensorrt as te
from skin_offline.runtime.devices import CPU_EP, CUDA_EP, TRT_EP

GPU = te.GpuInfo("NVIDIA Jetson AGX Orin", "8.7", 64 << 30)


def _graph_inputs(path):
    import onnxruntime as ort

    return {i.name: i.shape for i in ort.InferenceSession(str(path), providers=[CPU_EP]).get_inputs()}


def test_decoder_profiles_cover_every_dynamic_input_and_the_context(llava_model):
    m = llava_model.manifest
    d, ctx = m.model, 300
    std = build.standard_variant(m, names.ROLE_DECODER, None)
    inputs = _graph_inputs(llava_model.bundle_dir / std.file)
    prefill, decode = te.decoder_profiles(d, ctx)
    for p in (prefill, decode):
        # every input with a dynamic axis has a profile entry, of the graph's rank, static axes equal to the graph's
        assert set(p.shapes) == {n for n, s in inputs.items() if any(not isinstance(x, int) for x in s)}
        for n, (lo, opt, hi) in p.shapes.items():
            for shape in (lo, opt, hi):
                assert len(shape) == len(inputs[n])
                assert all(x == g for x, g in zip(shape, inputs[n]) if isinstance(g, int))
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    kv = (d.num_kv_heads, d.head_dim)
    past = prefill.shapes[names.past_key(0)]
    assert past[0] == (1, *kv[:1], 0, kv[1]) and past[2][2] == ctx - 1  # prefill: empty past .. follow-up turns
    assert prefill.shapes[names.INPUTS_EMBEDS][2] == (1, ctx, d.hidden_size)
    assert decode.shapes[names.INPUTS_EMBEDS] == ((1, 1, d.hidden_size),) * 3  # decode: one token
    assert decode.shapes[names.ATTENTION_MASK][2] == (1, ctx)
    assert decode.shapes[names.past_value(d.num_layers - 1)][2] == (1, kv[0], ctx - 1, kv[1])


def test_vision_profile_is_the_graph_shape(llava_model):
    m = llava_model.manifest
    (p,) = te.vision_profiles(m.preprocess.crop_size)
    shape = _graph_inputs(llava_model.bundle_dir / m.pick(names.ROLE_VISION).file)[names.PIXEL_VALUES]
    assert all(x == g for x, g in zip(p.shapes[names.PIXEL_VALUES][1], shape) if isinstance(g, int))


def test_profile_option_strings_parse_back():
    p1 = te.Profile({"a": ((1, 2), (1, 3), (1, 4)), "b": ((1,), (2,), (3,))})
    p2 = te.Profile({"a": ((1, 1), (1, 1), (1, 1)), "b": ((4,), (5,), (6,))})
    opts = te.profile_options([p1, p2])
    # onnxruntime's format: name:AxBxC, comma separated; the k-th occurrence of a name is profile k
    assert opts["trt_profile_min_shapes"] == "a:1x2,b:1,a:1x1,b:4"
    assert opts["trt_profile_opt_shapes"] == "a:1x3,b:2,a:1x1,b:5"
    assert opts["trt_profile_max_shapes"] == "a:1x4,b:3,a:1x1,b:6"


def test_standard_graphs_have_only_standard_ops(llava_model):
    m = llava_model.manifest
    std = [g for g in m.graphs if g.flavor is Flavor.STANDARD and g.file.endswith(".onnx")]
    assert {g.role for g in std} >= {names.ROLE_VISION, names.ROLE_DECODER}
    for g in std:
        assert build.nonstandard_ops(llava_model.bundle_dir / g.file) == []
    for g in m.graphs:  # a contrib-flavor graph, when the bundle has one, must be caught
        if g.flavor is Flavor.CONTRIB:
            assert any(
                op.startswith("com.microsoft::") for op in build.nonstandard_ops(llava_model.bundle_dir / g.file)
            )
            with pytest.raises(BundleError, match="non-standard ops"):
                build.assert_standard_ops(llava_model.bundle_dir / g.file)


def test_contrib_op_in_a_subgraph_is_caught(tmp_path):
    inner = helper.make_graph(
        [helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")],
        "inner",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(g), tmp_path / "m.onnx")
    assert build.nonstandard_ops(tmp_path / "m.onnx") == ["com.microsoft::FastGelu"]


def test_plan_refuses_context_beyond_the_bundle(llava_model):
    with pytest.raises(UsageError, match="--max-context"):
        build.plan(llava_model.manifest, llava_model.manifest.model.max_context + 1)


def _record(**kw) -> te.EngineRecord:
    base = dict(
        tensorrt_version="10.3.0",
        gpu_name=GPU.name,
        compute_capability=GPU.compute_capability,
        onnxruntime_version="1.20.0",
        fp16=True,
        int8=False,
        max_context=300,
        max_batch=1,
        workspace_gb=2.0,
    )
    return te.EngineRecord(**{**base, **kw})


@pytest.mark.parametrize(
    "record,trt,gpu,match",
    [
        (None, "10.3.0", GPU, "no TensorRT engines"),
        (_record(), None, GPU, "libnvinfer"),
        (_record(), "10.3.0", None, "no NVIDIA GPU"),
        (_record(), "10.7.0", GPU, "built with TensorRT 10.3.0, this machine has 10.7.0"),
        (_record(), "10.3.0", te.GpuInfo("NVIDIA GeForce RTX 4090", "8.9"), "compute capability 8.7"),
        (_record(), "10.3.0", te.GpuInfo("NVIDIA Jetson Orin Nano", "8.7"), "built for NVIDIA Jetson AGX Orin"),
    ],
)
def test_engines_for_another_gpu_or_tensorrt_are_refused(record, trt, gpu, match, tmp_path):
    with pytest.raises(DeviceError, match=match) as e:
        te.check_compatible(record, trt, gpu, tmp_path)
    assert "\n" not in str(e.value)


def test_matching_engines_are_accepted(tmp_path):
    te.check_compatible(_record(), "10.3.0", GPU, tmp_path)


def test_trt_version_decoding():
    # NvInferVersion.h: TensorRT 10 encodes major*10000 + minor*100 + patch; 8.x major*1000 + minor*100 + patch
    assert te.decode_trt_version(100300) == "10.3.0"
    assert te.decode_trt_version(101304) == "10.13.4"
    assert te.decode_trt_version(8601) == "8.6.1"


@pytest.fixture()
def bundle_with_engines(llava_model, tmp_path, monkeypatch):
    """A copy of the tiny bundle with fake engine files recorded the way build_engines records them."""
    folder = tmp_path / "bundle"
    shutil.copytree(llava_model.bundle_dir, folder)
    m = llava_model.manifest
    plan = build.plan(m, 300)
    graphs = {}
    for role, (variant, profiles) in plan.items():
        cache = folder / te.ENGINE_DIR / role
        cache.mkdir(parents=True)
        (cache / f"TensorrtExecutionProvider_{role}_sm87.engine").write_bytes(b"\0" * 64)
        graphs[role] = {
            "file": variant.file,
            "precision": variant.precision.value,
            "cache_dir": f"{te.ENGINE_DIR}/{role}",
            "profiles": [{n: [list(s) for s in shp] for n, shp in p.shapes.items()} for p in profiles],
        }
    build.write_record(folder, _record(graphs=graphs))
    monkeypatch.setattr(devices, "available_providers", lambda: [TRT_EP, CUDA_EP, CPU_EP])
    monkeypatch.setattr(te, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(te, "gpu_info", lambda: GPU)
    return folder


def test_record_round_trips_and_engine_files_are_verified(bundle_with_engines):
    from skin_offline.runtime.bundle import check_files, verify_bundle

    folder = bundle_with_engines
    rec = te.read_record(folder)
    assert rec.gpu_name == GPU.name and rec.tensorrt_version == "10.3.0" and rec.compute_capability == "8.7"
    m = verify_bundle(folder)  # engine files listed with sha256 and still valid; the typed manifest still reads
    engines = [f for f in m.files if f.startswith(te.ENGINE_DIR + "/")]
    assert len(engines) == 2
    # load passes the recorded profiles back verbatim (onnxruntime rebuilds when they differ from the cache's)
    opts = rec.options(folder, names.ROLE_DECODER)
    assert opts["trt_engine_cache_path"] == str(folder / te.ENGINE_DIR / names.ROLE_DECODER)
    assert opts == te.provider_options(
        folder / te.ENGINE_DIR / names.ROLE_DECODER, te.decoder_profiles(m.model, 300), fp16=True, workspace_gb=2.0
    )
    (folder / engines[0]).write_bytes(b"\0" * 10)  # truncated engine: caught like any bundle file
    with pytest.raises(BundleError, match="truncated"):
        check_files(folder, Manifest.read(folder), hashes=False)


def test_device_selection_with_engines(bundle_with_engines, monkeypatch):
    folder = bundle_with_engines
    assert te.device_for_bundle("auto", folder).device is devices.Device.TENSORRT
    monkeypatch.setattr(te, "gpu_info", lambda: te.GpuInfo("NVIDIA GeForce RTX 4090", "8.9"))
    assert te.device_for_bundle("auto", folder).device is devices.Device.CUDA  # auto: skip unusable engines
    with pytest.raises(DeviceError, match="rebuild them here"):
        te.device_for_bundle("tensorrt", folder)


def test_graph_providers_for_tensorrt(bundle_with_engines, llava_model):
    folder = bundle_with_engines
    m = Manifest.read(folder)
    choice = te.device_for_bundle("tensorrt", folder)
    std = build.standard_variant(m, names.ROLE_DECODER, None)
    provs = te.graph_providers(choice, folder, names.ROLE_DECODER, std)
    assert provs[0][0] == TRT_EP and provs[0][1]["trt_engine_cache_path"].startswith(str(folder))
    assert [p if isinstance(p, str) else p[0] for p in provs[1:]] == [CUDA_EP, CPU_EP]
    assert te.graph_providers(devices.resolve("cpu"), folder, names.ROLE_DECODER, std) is None
    contrib = [g for g in m.variants(names.ROLE_DECODER) if g.flavor is Flavor.CONTRIB]
    if contrib:
        with pytest.raises(DeviceError, match="contrib ops"):
            te.graph_providers(choice, folder, names.ROLE_DECODER, contrib[0])


def test_build_engines_fails_cleanly_without_tensorrt(llava_model, tmp_path):
    if TRT_EP in devices.available_providers():
        pytest.skip("this onnxruntime has TensorRT")
    folder = tmp_path / "b"
    shutil.copytree(llava_model.bundle_dir, folder)
    before = (folder / names.MANIFEST).read_text()
    with pytest.raises(DeviceError, match="TensorrtExecutionProvider"):
        build.build_engines(folder, fp16=True, max_context=300, log=lambda m: None)
    assert (folder / names.MANIFEST).read_text() == before and not (folder / te.ENGINE_DIR).exists()
    assert json.loads(before).get(te.MANIFEST_KEY) is None


def test_dummy_feeds_follow_the_profile(llava_model):
    import onnxruntime as ort

    m = llava_model.manifest
    std = build.standard_variant(m, names.ROLE_DECODER, None)
    sess = ort.InferenceSession(str(llava_model.bundle_dir / std.file), providers=[CPU_EP])
    for p in te.decoder_profiles(m.model, 64):
        feeds = build._dummy_feeds(sess, p)
        out = sess.run([names.LOGITS], feeds)[0]  # the feeds are a valid request for the real graph
        assert out.shape == (1, 1, m.model.vocab_size) and np.isfinite(out).all()
