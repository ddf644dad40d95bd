"""benchmarks/compare.py mechanics (no peers, no timing thresholds): summary arithmetic, the table, the
skin-offline worker on the tiny bundle, and discovery of a missing cache."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", REPO / "benchmarks" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(decode, prefill, ttft=None, rss=2e9, weights=1e9, resident=None, kv=0.0):
    return {
        "decode_tokens_per_s": decode,
        "prefill_tokens_per_s": prefill,
        "ttft_s": ttft,
        "vision_s": None,
        "end_to_end_s": None,
        "peak_rss_bytes": rss,
        "weight_bytes": weights,
        "detail": "d",
        "prompt_tokens": 600,
        "new_tokens": 128,
        **({"resident_weight_bytes": resident, "kv_bytes": kv} if resident else {}),
    }


def test_summary_medians_ratios_roofline_and_rss(compare):
    results = {
        "skin": [
            _run(60, 200, 5.0, rss=2.4e9, weights=0.6e9, resident=1.98e9, kv=0.02e9),
            _run(40, 210, 5.2),
            {"error": "boom"},
        ],
        "llama.cpp Q4_0": [_run(50, 180), _run(50, 170)],
        "llama.cpp Q4_0 + mmproj": [_run(45, 175, 6.0), _run(47, 165, 6.4)],
    }
    rows = {r["peer"]: r for r in compare.summarize(results, "llama.cpp Q4_0", 60.0)}
    s = rows["skin"]
    assert s["runs"] == 2 and s["errors"] == ["boom"]
    assert s["decode_tokens_per_s"] == 50 and s["decode_tokens_per_s_range"] == (40, 60)
    assert s["decode_tokens_per_s_ratio"] == pytest.approx(50 / 50)
    assert s["prefill_tokens_per_s_ratio"] == pytest.approx(205 / 175)
    assert s["ttft_ratio"] == pytest.approx(5.1 / 6.2)  # vs the baseline's multimodal run, not the text-only one
    assert s["roofline_tokens_per_s"] == pytest.approx(60e9 / 0.6e9)
    assert s["fraction_of_roofline"] == pytest.approx(50 / 100)
    assert s["rss_ratio"] == pytest.approx(s["peak_rss_bytes"] / 2.0e9)
    assert "rss_ratio" not in rows["llama.cpp Q4_0"]
    table = compare.markdown(
        list(rows.values()),
        [("ort-genai int4", "not installed")],
        {
            "prompt_tokens": 600,
            "new_tokens": 128,
            "threads": 2,
            "runs": 2,
            "baseline": "llama.cpp Q4_0",
            "bandwidth_gb_per_s": 60.0,
            "bandwidth_probes_gb_per_s": [35.0, 60.0],
        },
    )
    assert "best of 2 bandwidth probes: 60.0 GB/s (probes 35.0-60.0)" in table
    assert "| ort-genai int4 | skipped |" in table and table.count("\n|") == 2 + 3 + 1


def test_discover_without_a_cache_skips_everything(compare, tmp_path):
    peers, skipped = compare.discover(tmp_path)
    assert peers == [] and skipped[0][0] == "everything" and "compare.py setup" in skipped[0][1]


def test_skin_worker_on_the_tiny_bundle(llava_model):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "compare.py"),
            "worker",
            "skin",
            "--model",
            str(llava_model.bundle_dir),
            "--bundle",
            str(llava_model.bundle_dir),
            "--threads",
            "1",
            "--prompt-tokens",
            "60",
            "--new-tokens",
            "4",
            "--warmup",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    m = llava_model.manifest
    assert res["prompt_tokens"] == 60 and 1 <= res["new_tokens"] <= 4
    # the files the worker's sessions map: vision, the CPU's contrib decoder (+ the data it shares), embeddings
    from skin_offline import names
    from skin_offline.manifest import Flavor

    loaded = [
        m.pick(names.ROLE_VISION),
        m.pick(names.ROLE_DECODER, flavor=Flavor.CONTRIB),
        m.pick(names.ROLE_EMBEDDINGS),
    ]
    assert res["resident_weight_bytes"] == sum(
        m.files[f].size for f in {f for g in loaded for f in (g.file, *g.data_files)}
    )
    assert res["kv_bytes"] == res["kv_bytes_per_token"] * (res["prompt_tokens"] + res["new_tokens"])
    assert res["peak_rss_bytes"] > 0 and res["decode_tokens_per_s"] >= 0


def test_a_crashed_peer_fails_the_run_loudly(compare, tmp_path, monkeypatch, capsys):
    """A peer that dies (the AMX SIGSEGV seen with GGML_NATIVE builds) is named with its signal and fails the run."""
    assert compare.describe_exit(-11) == "killed by SIGSEGV" and compare.describe_exit(3) == "exit 3"
    peers = [{"name": "llama.cpp Q4_0", "kind": "llama"}, {"name": "skin-offline int4", "kind": "skin"}]
    monkeypatch.setattr(compare, "discover", lambda cache: (peers, []))
    monkeypatch.setattr(
        compare,
        "run_one",
        lambda p, a, b: {"error": "killed by SIGSEGV: (no output)"} if p["kind"] == "llama" else _run(50, 200, 3.0),
    )
    import skin_offline.bench.machine as machine

    monkeypatch.setattr(machine, "probe_bandwidth", lambda threads=None: machine.Bandwidth(50.0, {}, 0))
    args = type(
        "A",
        (),
        dict(
            cache=str(tmp_path),
            peers=None,
            runs=1,
            threads=1,
            prompt_tokens=600,
            new_tokens=8,
            warmup=0,
            timeout=10,
            baseline=None,
            out=str(tmp_path / "out"),
        ),
    )()
    with pytest.raises(SystemExit) as e:
        compare.cmd_run(args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "FAILED llama.cpp Q4_0" in err and "SIGSEGV" in err
    assert (tmp_path / "out" / "compare.json").exists()  # the results are still written
