"""Direct quantized export: the same graph files as export + quantize, no fp32 copy on disk (the folder is polled
while a subprocess exports), and `export --dry-run` predicts the files a real run writes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import torch

from skin_offline.export.factory import PRESETS, llava_tensor_shapes, write_streaming_checkpoint


def test_export_int4_writes_the_same_graph_files_as_export_then_quantize(llava_model, tmp_path):
    from skin_offline.export.quantize import QuantConfig, quantize_bundle
    from skin_offline.export.to_onnx import export_bundle

    direct = tmp_path / "direct"
    export_bundle(llava_model.ckpt, direct, precision="int4", verify=False, quality=False, log=lambda m: None)
    two_step = tmp_path / "two"
    quantize_bundle(llava_model.bundle_dir, two_step, QuantConfig("int4"), quality=False, log=lambda m: None)
    files = sorted(p.name for p in two_step.iterdir() if p.name != "manifest.json")
    assert sorted(p.name for p in direct.iterdir() if p.name != "manifest.json") == files
    assert "decoder.int4.onnx" in files and "decoder.int8-qgemm.onnx" in files  # the int4 default: + int8 prefill
    for f in files:
        assert (direct / f).read_bytes() == (two_step / f).read_bytes(), f


@pytest.mark.parametrize("precision", ["fp32", "int4", "int8", "fp16"])
def test_dry_run_predicts_the_files_of_a_real_run(llava_model, tmp_path, precision, monkeypatch):
    """The plan assumes the quality gates pass (the int8 vision tower, the int8 prefill graph: measurements it
    cannot make before the run); here they are opened so the run writes what they let through."""
    import skin_offline.export.prefill_gate as pg
    import skin_offline.export.quantize as q
    from skin_offline.export.plan import plan_export
    from skin_offline.export.to_onnx import export_bundle

    monkeypatch.setattr(q, "VISION_INT8_MIN_COSINE", -1.0)
    monkeypatch.setattr(pg, "KL_SLACK", float("inf"))

    plan = plan_export(llava_model.ckpt, tmp_path / "b", precision=precision, log=lambda m: None)
    m = export_bundle(
        llava_model.ckpt, tmp_path / "b", precision=precision, verify=False, quality=False, log=lambda m: None
    )
    assert set(m.files) == set(plan.files) - {"manifest.json"}
    for f, e in m.files.items():  # data files exactly; graph protos and the tokenizer within a few KB
        tol = 0 if f.endswith((".data", ".npy")) else 64 << 10
        assert abs(e.size - plan.files[f]) <= tol, (f, e.size, plan.files[f])
    assert plan.disk_needed >= sum(e.size for e in m.files.values())


# a model whose export takes seconds (so polling sees every file while it exists) and whose fp32 decoder is several
# times its int4 bundle: an fp32 scratch copy could not hide under the 1.2x bound
MID = replace(PRESETS["tiny"], hidden=256, heads=4, kv_heads=2, mlp=2048, layers=16, init_std=0.02)


def _folder_bytes(root) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:  # removed between listing and stat
                pass
    return total


_HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
_EXPORT = f"""
import json, sys
from skin_offline.cli import app
try:
    app(sys.argv[2:], standalone_mode=False)
finally:
    json.dump({{"peak_rss": {_HWM}}}, open(sys.argv[1], "w"))
"""
_PLAN = """
import json, sys
from skin_offline.export.plan import plan_export
p = plan_export(sys.argv[1], sys.argv[2], precision=sys.argv[3], log=lambda m: None)
print(json.dumps(p.to_dict()))
"""


def test_direct_export_disk_high_water_and_peak_rss_as_the_dry_run_said(tmp_path, tokenizer_model):
    """`export --precision int4` (verification and quality report included) in a subprocess: poll the output's
    parent (hidden partial folders included) for the disk high-water; VmHWM for the peak RSS; both against the
    dry run's figures (computed in a fresh process too)."""
    import json

    ckpt = write_streaming_checkpoint(tmp_path / "ck", MID, tokenizer_model, dtype=torch.bfloat16)
    parent = tmp_path / "out"
    parent.mkdir()
    plan = json.loads(
        subprocess.run(
            [sys.executable, "-c", _PLAN, str(ckpt), str(parent / "b"), "int4"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
    )
    high, done = [0], threading.Event()

    def poll():
        while not done.is_set():
            high[0] = max(high[0], _folder_bytes(parent))
            time.sleep(0.01)

    th = threading.Thread(target=poll)
    th.start()
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            _EXPORT,
            str(tmp_path / "rss.json"),
            "export",
            str(ckpt),
            str(parent / "b"),
            "--precision",
            "int4",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    done.set()
    th.join()
    assert r.returncode == 0, r.stderr[-2000:]
    final = _folder_bytes(parent)
    peak = json.loads((tmp_path / "rss.json").read_text())["peak_rss"]
    fp32_decoder = 4 * sum(
        int(torch.Size(s).numel()) for k, s in llava_tensor_shapes(MID).items() if "mm_projector" not in k
    )
    assert fp32_decoder > 1.5 * final, "model too small for the test to tell an fp32 copy"
    print(
        f"disk high-water {high[0] >> 20} MB, final {final >> 20} MB (dry run {plan['disk_needed_bytes'] >> 20} MB), "
        f"fp32 decoder {fp32_decoder >> 20} MB; peak RSS {peak >> 20} MB (dry run {plan['peak_bytes'] >> 20} MB); "
        f"{time.perf_counter() - t0:.0f} s"
    )
    assert high[0] <= 1.2 * final, f"high-water {high[0] >> 20} MB > 1.2 x final {final >> 20} MB"
    assert abs(plan["disk_needed_bytes"] - final) <= 0.02 * final + (256 << 10)
    assert peak <= plan["peak_bytes"], f"peak RSS {peak >> 20} MB over the dry run's {plan['peak_bytes'] >> 20} MB"
