"""`skin-offline bench` mechanics on the tiny bundle: no timing thresholds, only what must hold."""

from __future__ import annotations

import io
import json
import os
import statistics

import pytest

from skin_offline import names
from skin_offline.bench import machine, report, run


@pytest.fixture(scope="module")
def tiny_result(llava_model):
    from skin_offline.runtime.vision import VisionEncoder

    calls = []
    orig = VisionEncoder.encode

    def counting(self, pixels):
        calls.append(1)
        return orig(self, pixels)

    VisionEncoder.encode = counting
    try:
        cfg = run.BenchConfig(
            bundle=llava_model.bundle_dir,
            runs=3,
            warmup=1,
            prompt_tokens=60,
            new_tokens=6,
            threads=1,
            device="cpu",
            probe_bandwidth=False,
        )
        res = run.run_bench(cfg)
    finally:
        VisionEncoder.encode = orig
    return res, len(calls)


def test_every_run_pays_the_vision_encoder(tiny_result):
    res, vision_calls = tiny_result
    assert vision_calls == 4  # 1 warmup + 3 runs: the feature cache must not hide the encoder


def test_medians_and_runs(tiny_result):
    res, _ = tiny_result
    assert len(res.runs) == 3
    for key in run.STAGES:
        assert res.medians[key] == statistics.median(r[key] for r in res.runs)
    for r in res.runs:
        assert r["ttft_s"] >= r["preprocess_s"] + r["vision_s"] + r["prefill_s"] - 1e-9  # ttft contains them
        assert r["end_to_end_s"] >= r["ttft_s"]
    assert res.medians["prompt_tokens"] == 60  # padded to --prompt-tokens exactly
    assert res.peak_rss_bytes > 0
    json.loads(report.to_json(res))  # serialisable as is


def test_roofline_uses_the_decoder_files_on_disk(tiny_result, llava_model):
    res, _ = tiny_result
    facts = res.model
    m = llava_model.manifest
    dec = next(g for g in m.variants(names.ROLE_DECODER) if g.file == facts["decoder_file"])
    on_disk = sum(os.path.getsize(llava_model.bundle_dir / f) for f in (dec.file, *dec.data_files))
    assert facts["decoder_weight_bytes"] == on_disk
    d = m.model
    assert facts["kv_bytes_per_token"] == 2 * d.num_layers * d.num_kv_heads * d.head_dim * 4  # fp32 K and V
    bw = machine.Bandwidth(gb_per_s=50.0)
    ctx = 60 + 6 / 2
    roof = run.rooflines(bw, facts, ctx)
    expected_bytes = on_disk + facts["kv_bytes_per_token"] * ctx
    assert roof["bytes_per_token"] == int(expected_bytes)
    assert roof["measured"] == pytest.approx(50e9 / expected_bytes, rel=1e-3)
    assert roof["jetson_agx_orin"] == pytest.approx(204.8e9 / expected_bytes, rel=1e-3)
    assert roof["jetson_orin_nano"] == pytest.approx(68e9 / expected_bytes, rel=1e-3)


def test_pad_question_reaches_the_target(llava_model):
    from skin_offline.runtime.prompt import build_prompt_ids

    tok = llava_model.runtime.tokenizer
    n_img = llava_model.manifest.model.image_tokens
    for target in (32, 57, 200):
        q = run.pad_question(tok, "What is this?", n_img, target)
        assert len(build_prompt_ids(tok, q)) - 1 + n_img == target
    assert run.pad_question(tok, "What is this?", n_img, 3) == "What is this?"  # never shortens


def test_report_table_and_chart(tiny_result, tmp_path):
    from rich.console import Console

    res, _ = tiny_result
    buf = io.StringIO()
    report.render(res, Console(file=buf, width=200))
    out = buf.getvalue()
    for label in ("vision encode", "time to first token", "decode", "roofline", "agx_orin", "peak RSS"):
        assert label in out
    png = report.write_chart(res, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bandwidth_probe_and_machine_info():
    bw = machine.probe_bandwidth(threads=2, buffer_mb=4, repeats=1)
    assert set(bw.kernels) == {f"{k}@{t}" for k in ("copy", "add", "read") for t in (1, 2)}
    assert bw.gb_per_s == max(bw.kernels.values()) > 0
    info = machine.machine_info(bandwidth=False)
    assert info.logical_cores >= 1 and info.memory_bytes > 0 and "CPUExecutionProvider" in info.providers
    assert info.gemm_min_rows >= 1 and set(info.cpu_features) <= set(machine.KERNEL_FEATURES)


def test_cpu_features_are_read_from_the_flags():
    flags = {"fpu", "avx2", "avx512_vnni", "amx_int8", "amx_tile", "sse4_2"}
    assert machine.cpu_features(flags) == ["amx_int8", "amx_tile", "avx512_vnni", "avx2"]
    assert machine.cpu_features({"asimddp", "i8mm", "fp"}) == ["asimddp", "i8mm"]  # a Jetson's Cortex-A78AE


@pytest.mark.parametrize(
    "model,gbs",
    [
        ("NVIDIA Jetson AGX Orin Developer Kit", 204.8),
        ("NVIDIA Jetson Orin Nano Developer Kit", 68.0),
        ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", 102.0),
        ("Raspberry Pi 5 Model B", None),
    ],
)
def test_jetson_board_detection(monkeypatch, model, gbs):
    files = {
        "/proc/device-tree/model": model + "\x00",
        "/etc/nv_tegra_release": "# R36 (release), REVISION: 4.0" if gbs else None,
    }
    monkeypatch.setattr(machine, "_read", lambda p: (files.get(p) or "").strip("\x00") or None)
    monkeypatch.setattr(machine, "_nvpmodel_query", lambda: None)
    info = machine.jetson_info()
    if gbs is None:
        assert info is None
    else:
        assert (
            info["model"] == model
            and info["board_bandwidth_gb_per_s"] == gbs
            and info["l4t_release"].startswith("# R36")
        )


def test_cli_bench_json(llava_model):
    from typer.testing import CliRunner

    from skin_offline.cli import app

    r = CliRunner().invoke(
        app,
        [
            "bench",
            str(llava_model.bundle_dir),
            "--runs",
            "1",
            "--warmup",
            "0",
            "--new-tokens",
            "3",
            "--threads",
            "1",
            "--no-probe",
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["model"]["provider"] == "CPUExecutionProvider" and len(d["runs"]) == 1
    bad = CliRunner().invoke(app, ["bench", str(llava_model.bundle_dir), "--device", "cuda"])
    if "CUDAExecutionProvider" not in d["machine"]["providers"]:
        assert bad.exit_code == 5


def test_profile_decode_accounts_for_the_decoder_graph(llava_model, monkeypatch):
    """benchmarks/profile_decode.py: the profile's node time covers the decode run, the MatMul weights it
    counts are the decoder's MatMul initializers, and the Python time around Run is reported separately."""
    import importlib.util

    import onnx

    spec = importlib.util.spec_from_file_location(
        "profile_decode", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "profile_decode.py")
    )
    pd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pd)
    monkeypatch.setattr(machine, "probe_bandwidth", lambda threads=None: machine.Bandwidth(10.0, {}, 0))
    r = pd.profile(llava_model.bundle_dir, None, past=20, steps=8, threads=1)
    assert r["steps"] == 8 - 2  # two warm-up steps left out
    assert abs(sum(o["share"] for o in r["ops"]) - 1) < 1e-6
    # sequential execution: each step's node times add up to at most its Run (a single slow step cannot skew it)
    assert r["nodes_ms_per_token"] > 0 and all(0 < nodes <= run * 1.01 + 5 for run, nodes in r["runs_us"])
    assert r["python_ms_per_token"] >= 0
    # MatMul weight bytes per token = every MatMul-type node's initializers in the graph, read once per step
    graph = llava_model.bundle_dir / r["graph"]
    model = onnx.load(str(graph), load_external_data=False)
    sizes = {t.name: int(__import__("numpy").prod(t.dims)) * 4 for t in model.graph.initializer}
    want = sum(sizes.get(i, 0) for n in model.graph.node if n.op_type in pd._MATMULS for i in n.input)
    got = sum(o["weight_mb_per_token"] for o in r["ops"] if o["op"] in pd._MATMULS) * 1e6
    assert want > 0 and abs(got - want) / want < 1e-6
