"""Verification can fail: a bundle that does not compute what its checkpoint does is caught and named.

The fixture bundles pass (tests/test_parity.py & co. check the figures); here each kind of damage an exporter bug
could do is made on purpose, the bundle re-hashed so the sha256 check cannot be what notices, and `verify
--against CHECKPOINT` (the export's own verification, run on an existing bundle through the CLI) must say which
graph, which layer and which weight. An export whose graphs came out wrong stops and writes nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from skin_offline import names
from skin_offline.manifest import Manifest, file_entry


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "skin_offline.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def _rehash(folder, *files):
    m = json.loads((folder / names.MANIFEST).read_text())
    for f in files:
        e = file_entry(folder / f)
        m["files"][f] = {"size": e.size, "sha256": e.sha256}
    (folder / names.MANIFEST).write_text(json.dumps(m))


def _tensor_span(folder, graph: str, name: str) -> tuple[str, int, int]:
    model = onnx.load(str(folder / graph), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == name)
    info = {e.key: e.value for e in t.external_data}
    return info["location"], int(info["offset"]), int(info["length"])


def _mutate(folder, graph, name, fn):
    loc, off, length = _tensor_span(folder, graph, name)
    with open(folder / loc, "r+b") as f:
        f.seek(off)
        raw = bytearray(f.read(length))
        fn(raw)
        f.seek(off)
        f.write(raw)
    _rehash(folder, loc)


def _one_error(r) -> str:
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 4 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


@pytest.fixture(scope="module")
def hybrid(llava_model, tmp_path_factory):
    from skin_offline.export.quantize import QuantConfig, quantize_bundle

    out = tmp_path_factory.mktemp("verify") / "int4"
    # round to nearest: its stored codes are checked byte for byte (a calibrated bundle's: tests/test_calibrate.py)
    quantize_bundle(llava_model.bundle_dir, out, QuantConfig("int4", method="rtn"), quality=False, log=lambda m: None)
    return out


def test_an_intact_bundle_passes_against_its_checkpoint(llava_model, hybrid):
    for folder in (llava_model.bundle_dir, hybrid):
        r = cli("verify", folder, "--against", llava_model.ckpt, "--quiet")
        assert r.returncode == 0, r.stderr
        assert "verification: passed" in r.stdout and "2 layers" in r.stdout, r.stdout


def test_one_changed_fp32_value_is_caught_and_named(llava_model, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(llava_model.bundle_dir, b)

    def nudge(raw):  # one fp32 value of layer 1's up_proj x 1.001
        v = np.frombuffer(raw, np.float32).copy()
        v[123] *= 1.001
        raw[:] = v.tobytes()

    _mutate(b, names.DECODER_GRAPH, "layers.1.mlp.up_proj.weight", nudge)
    line = _one_error(cli("verify", b, "--against", llava_model.ckpt))
    assert "layers.1.mlp.up_proj.weight" in line and "1 of 8192 values differ" in line, line


def test_one_changed_int4_code_is_caught_and_named(llava_model, hybrid, tmp_path):
    b = tmp_path / "q"
    shutil.copytree(hybrid, b)
    q4 = "layers.0.self_attn.k_proj.weight" + names.Q_WEIGHT_SUFFIX.format(bits=4)

    def flip(raw):  # one packed byte: two int4 codes change
        raw[7] ^= 0x33

    _mutate(b, "decoder.int4.onnx", q4, flip)
    line = _one_error(cli("verify", b, "--against", llava_model.ckpt))
    assert "decoder.int4.onnx" in line and "layers.0.self_attn.k_proj.weight (int4 block" in line, line
    assert "2 of 2048 values differ" in line, line


def test_a_wrong_graph_with_right_weights_is_caught_by_the_layer_check(llava_model, tmp_path):
    """Every weight intact, one op attribute of layer 1 wrong (an RMSNorm epsilon): the computation check names it."""
    b = tmp_path / "b"
    shutil.copytree(llava_model.bundle_dir, b)
    model = onnx.load(str(b / names.DECODER_CONTRIB_GRAPH), load_external_data=False)
    node = next(
        n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization" and "ln1b" in n.output[0]
    )
    next(a for a in node.attribute if a.name == "epsilon").f = 0.5
    (b / names.DECODER_CONTRIB_GRAPH).write_bytes(model.SerializeToString())
    _rehash(b, names.DECODER_CONTRIB_GRAPH)
    line = _one_error(cli("verify", b, "--against", llava_model.ckpt))
    assert f"{names.DECODER_CONTRIB_GRAPH}: layer 1 differs from transformers'" in line, line


def test_an_export_that_writes_a_wrong_weight_stops_and_writes_nothing(llava_model, tmp_path, monkeypatch):
    from skin_offline.export import to_onnx
    from skin_offline.export.verify import VerificationError

    real = to_onnx.build_decoder_fast

    def wrong(spec, tensor, *a, **kw):  # the contrib graph's builder reads layer 1's o_proj from layer 0
        return real(
            spec,
            lambda n: tensor(n.replace("layers.1.self_attn.o_proj", "layers.0.self_attn.o_proj")),
            *a,
            shared=None,
            **{k: v for k, v in kw.items() if k != "shared"},
        )

    monkeypatch.setattr(to_onnx, "build_decoder_fast", wrong)
    with pytest.raises(VerificationError, match=r"decoder_contrib.onnx: layers.1.self_attn.o_proj.weight \(fp32\): "):
        to_onnx.export_bundle(llava_model.ckpt, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_info_shows_the_verification(llava_model):
    r = cli("info", llava_model.bundle_dir)
    assert r.returncode == 0 and "verification: passed (against the checkpoint, layer by layer)" in r.stdout, r.stdout
    assert Manifest.read(llava_model.bundle_dir).verification["graphs"][names.DECODER_GRAPH]["weights_checked"] == 20
