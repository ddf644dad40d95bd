"""SmoothQuant for the int8 prefill graph (codecs.smooth_factors, prefill_gate.smoothed): after a calibrated int4
pass, each weight's input is divided by per-channel factors s and its rows multiplied by them, so the per-tensor
uint8 activation scale no longer has to hold a trained model's outlier channels.

References: the fp32 product x @ W, onnxruntime's own kernel against exact integer math on x / s
(test_qgemm_kernel._exact), the SmoothQuant paper's formula for s, and the export's verification."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_qgemm_kernel import _exact, _session

from skin_offline import names
from skin_offline.export.codecs import SMOOTH_ALPHA, QGemm
from skin_offline.export.gptq import Hessian


def _outlier_acts(rows: int, k: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    x[:, :6] *= 60  # a few channels ~100x the rest, as a trained LM's hidden states have
    return x


def test_smoothing_keeps_the_product_and_holds_outlier_channels():
    k, n = 512, 256
    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32)
    absmax = np.abs(_outlier_acts(256, k, 1)).max(0)  # calibration statistics
    absmax[10] = 0.0  # a channel that never fired in calibration
    x = _outlier_acts(64, k, 2)  # what a request brings: same distribution, other values
    want = x @ w
    err = {}
    for label, codec in (("plain", QGemm()), ("smoothed", QGemm(absmax))):
        tensors = codec.encode("w", w)
        got = _session(tensors, codec.nodes("x", "y", "mm", tensors, k, n), k, n).run(None, {"x": x})[0]
        err[label] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    # the smoothed graph is the same int8 kernel run on x / s: nothing else changed
    (_, codes), (_, scales), (sname, s) = tensors
    assert sname == "w" + names.QGEMM_SMOOTH_SUFFIX
    ref = _exact(x / s, codes, scales)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-6
    # s is the paper's max|x|^a / max|w|^(1-a) per input channel; 1 where calibration saw nothing
    paper = absmax.astype(np.float64) ** SMOOTH_ALPHA / np.abs(w).max(1).astype(np.float64) ** (1 - SMOOTH_ALPHA)
    assert s[10] == 1.0
    np.testing.assert_allclose(np.delete(s, 10), np.delete(paper, 10), rtol=1e-6)
    # per-tensor activation scales spread over 100x outliers lose the small channels; smoothing recovers them
    assert err["smoothed"] < 0.5 * err["plain"], err


def test_hessian_keeps_each_channels_largest_magnitude():
    h = Hessian(8, diag_only=True)
    a, b = _outlier_acts(5, 8, 3), -_outlier_acts(7, 8, 4)
    h.add(a)
    h.add(b[None])  # [1,S,K] as the layers hand it over
    np.testing.assert_array_equal(h.absmax.numpy(), np.abs(np.concatenate([a, b])).max(0))


def _initializers(path):
    return {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def _double(folder, graph: str, name: str) -> None:
    """Initializer `name` of `graph` times 2, in the external data or inline wherever it is, the manifest rehashed."""
    from onnx import numpy_helper
    from test_verify import _rehash, _tensor_span

    model = onnx.load(str(folder / graph), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == name)
    if t.external_data:
        data, off, length = _tensor_span(folder, graph, name)
        raw = bytearray((folder / data).read_bytes())
        raw[off : off + length] = (np.frombuffer(bytes(raw[off : off + length]), np.float32) * 2).tobytes()
        (folder / data).write_bytes(bytes(raw))
        _rehash(folder, data)
    else:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(2), name))
        onnx.save(model, str(folder / graph))
        _rehash(folder, graph)


def test_calibrated_bundle_smooths_its_prefill_graph_and_verifies(llava_model, tmp_path):
    """`--prefill int8` after the calibrated pass: every layer weight smoothed (the head, which the pass does not
    see, not), the bundle verifies against the checkpoint; a tampered divisor is caught; rtn has no statistics."""
    from skin_offline.export.quantize import QuantConfig, quantize_bundle
    from skin_offline.export.to_onnx import verify_against_checkpoint
    from skin_offline.export.verify import VerificationError
    from skin_offline.manifest import Kernel, Manifest

    out = tmp_path / "s"
    m = quantize_bundle(
        llava_model.bundle_dir, out, QuantConfig("int4", prefill="int8"), quality=False, log=lambda s: None
    ).manifest
    (g,) = [g for g in m.variants(names.ROLE_DECODER) if g.kernel == Kernel.QGEMM]
    layers = m.model.num_layers
    assert g.details["smoothing"] == {"alpha": SMOOTH_ALPHA, "weights": 7 * layers, "statistics": "calibrated pass"}
    smooth = {t for t in _initializers(out / g.file) if t.endswith(names.QGEMM_SMOOTH_SUFFIX)}
    assert len(smooth) == 7 * layers and all(t.startswith("layers.") for t in smooth)
    from typer.testing import CliRunner

    from skin_offline.cli import app

    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and f"smoothed (alpha {SMOOTH_ALPHA}, {7 * layers} weights)" in info.output
    v = verify_against_checkpoint(out, llava_model.ckpt, log=lambda s: None)
    assert v["passed"] and v["graphs"][g.file]["layers_checked"] == layers
    assert v["graphs"][g.file]["max_layer_rel_diff"] < 1e-4  # exact mode: x / s @ (codes x scales) in fp32

    # a divisor that is positive and finite but not the one the codes were made with
    _double(out, g.file, "layers.0.mlp.down_proj.weight" + names.QGEMM_SMOOTH_SUFFIX)
    with pytest.raises(VerificationError, match="layers.0.mlp.down_proj.weight"):
        verify_against_checkpoint(out, llava_model.ckpt, log=lambda s: None)

    r = quantize_bundle(
        llava_model.bundle_dir,
        tmp_path / "r",
        QuantConfig("int4", method="rtn", prefill="int8"),
        quality=False,
        log=lambda s: None,
    ).manifest
    (gr,) = [g for g in Manifest.read(tmp_path / "r").variants(names.ROLE_DECODER) if g.kernel == Kernel.QGEMM]
    assert "smoothing" not in gr.details and r.files
    assert not any(t.endswith(names.QGEMM_SMOOTH_SUFFIX) for t in _initializers(tmp_path / "r" / gr.file))
