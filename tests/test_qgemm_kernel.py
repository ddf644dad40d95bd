"""The int8 QGEMM codec (export/codecs.py) against onnxruntime's own kernel on this CPU: DynamicQuantizeMatMul over
the codec's stored codes must compute its exact integer math (uint8 activations quantized per tensor x int8 codes,
int32 sums, both scales), whatever the CPU's instruction set. On AVX2 CPUs without VNNI (the CI machine) the u8s8
kernel sums pairs of products in a saturating int16; with codes up to 127 it landed 3.3% (relative norm) away from
the exact result here, which is what the codec's 7-bit codes prevent. The int8 prefill graph, the int8 vision tower
and the int8-only tier all compute through this op."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from skin_offline.export.codecs import MS_DOMAIN, QGemm


def _session(tensors, nodes, k: int, n: int):
    g = helper.make_graph(
        nodes,
        "qgemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(a, name) for name, a in tensors],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _exact(x: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear's uint8 per-tensor quantization of x (range widened to hold 0, zero point rounded half
    to even and saturated), then integer products summed without overflow, then both scales; in float64."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    s = np.float32((hi - lo) / 255)
    zp = np.clip(np.rint(-lo / s), 0, 255)
    xq = np.clip(np.rint(x / s) + zp, 0, 255)
    return ((xq - zp) @ codes.astype(np.float64)) * np.float64(s) * scales.astype(np.float64)


def test_dynamic_quantize_matmul_over_the_codecs_codes_is_exact_on_this_cpu():
    rng = np.random.default_rng(0)
    k, n = 512, 256
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, :4] *= 20  # a few columns far larger than the rest: their scales differ, codes span the whole range
    codec = QGemm()
    tensors = codec.encode("w", w)
    (_, codes), (_, scales) = tensors
    # the kernel's int16 pair sums hold any two products of a uint8 and a stored code
    assert 2 * 255 * int(np.abs(codes).max()) <= np.iinfo(np.int16).max
    assert int(np.abs(codes).max()) >= 60  # and the codes use that range (absmax maps to the top code)
    sess = _session(tensors, codec.nodes("x", "y", "mm", tensors, k, n), k, n)
    for rows, outliers in ((1, 0), (64, 0), (64, 8), (600, 8)):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        x[:, :outliers] *= 40  # activation outlier channels, as trained LMs have: most values sit near the zero point
        got = sess.run(None, {"x": x})[0]
        want = _exact(x, codes, scales)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 1e-6, f"{rows} rows, {outliers} outlier channels: kernel {rel:.2e} from its exact integer math"
        # and the result is the fp32 product up to quantization error (a sanity bound, not the test's point)
        assert np.linalg.norm(got - x @ w) / np.linalg.norm(x @ w) < 0.1


def test_a_bundle_with_full_range_codes_is_not_run_through_a_saturating_kernel(llava_model, tmp_path, monkeypatch):
    """Bundles exported before 7-bit codes (no `max_code` in their QGEMM graphs' details) on a CPU without VNNI: auto
    mode leaves the prefill graph unloaded and uses the fp32 vision tower when the bundle has one, each with a
    notice; asked for by name, the prefill graph loads with a notice. With VNNI, or with 7-bit codes, nothing
    changes."""
    from dataclasses import replace

    from skin_offline import names
    from skin_offline.export.quantize import QuantConfig, quantize_bundle
    from skin_offline.manifest import Kernel, Manifest, Precision
    from skin_offline.runtime.bundle import Bundle
    from skin_offline.runtime.kernels import policy

    out = tmp_path / "b"
    quantize_bundle(
        llava_model.bundle_dir,
        out,
        QuantConfig("int4", method="rtn", prefill="int8", vision="int8"),
        quality=False,
        keep_source=True,
        log=lambda s: None,
    )
    m = Manifest.read(out)
    qgemm = [g for g in m.graphs if g.kernel == Kernel.QGEMM]
    assert {g.role for g in qgemm} == {names.ROLE_VISION, names.ROLE_DECODER}
    assert all(g.details["max_code"] == 63 for g in qgemm)
    avx2 = {"sse2", "avx", "avx2", "fma"}
    vnni = avx2 | {"avx512f", "avx512_vnni"}

    def load(flags, prefill=None):
        monkeypatch.setattr(policy, "cpu_flags", lambda: flags)
        b = Bundle.load(out, threads=1, prefill=prefill)
        return b.picked, b.notices

    picked, notices = load(avx2)  # 7-bit codes: exact here
    assert picked["multi_row"].kernel == Kernel.QGEMM and picked[names.ROLE_VISION].precision == Precision.INT8
    assert not notices

    # the same bundle as an older export wrote it
    old = replace(
        m, graphs=tuple(replace(g, details={k: v for k, v in g.details.items() if k != "max_code"}) for g in m.graphs)
    )
    old.write(out)
    picked, notices = load(vnni)
    assert "multi_row" in picked and picked[names.ROLE_VISION].precision == Precision.INT8 and not notices
    picked, notices = load(avx2)
    assert "multi_row" not in picked and picked[names.ROLE_VISION].precision == Precision.FP32
    assert len(notices) == 2 and all("overflow this CPU's int8 kernel (no VNNI)" in n for n in notices)
    assert all("\n" not in n and "re-export the bundle" in n for n in notices)
    picked, notices = load(avx2, prefill="int8")
    assert picked["multi_row"].kernel == Kernel.QGEMM
    assert any("loaded anyway: --prefill int8 asked for it" in n for n in notices)
