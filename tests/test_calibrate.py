"""The calibrated int4 pass (export/gptq.py, export/calibrate.py, export/calibration.py).

References are independent of the code under test: output errors computed directly as ||X (W - Q)^T||, the stored
bytes decoded from MatMulNBits' documented layout (test_quantize._unpack), onnxruntime's own packer for rounding to
nearest, GPTQ's own three-factorization formula for H^-1's Cholesky factor, and the export's verification.
"""

from __future__ import annotations

import numpy as np
import pytest

from skin_offline.export.calibration import (
    CALIBRATION_SEED,
    EVAL_ROWS,
    QUALITY_ROWS,
    CalibrationSpec,
    calibration_groups,
    load_pairs,
)
from skin_offline.export.codecs import pack_codes, pack_nbits
from skin_offline.export.gptq import (
    Grid,
    Hessian,
    _inverse_cholesky_upper,
    absmax_scales,
    block_scales,
    dequantize,
    gptq_codes,
    rtn_codes,
)


def _correlated(n: int, k: int, seed: int) -> np.ndarray:
    """[n,K] activations with strongly correlated channels and a few outlier channels (what LLM layers see)."""
    mix = np.random.default_rng(k).normal(size=(k, k)).astype(np.float32) / np.sqrt(k)  # one distribution per K
    x = np.random.default_rng(seed).normal(size=(n, k)).astype(np.float32) @ (np.eye(k, dtype=np.float32) + 2 * mix)
    x[:, :4] *= 20
    return x


def _out_err(x, w, q) -> float:
    return float(np.linalg.norm(x @ (w - q).T))


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_lowers_the_output_error_of_round_to_nearest(act_order):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(96, 256)).astype(np.float32)
    grid = Grid(4, 64)
    x = _correlated(2048, 256, 2)
    h = Hessian(256)
    for c in range(0, len(x), 500):  # accumulated in chunks: the running mean equals the whole
        h.add(x[c : c + 500])
    np.testing.assert_allclose(h.h.numpy(), x.T @ x / len(x), rtol=2e-4, atol=1e-3)
    s = absmax_scales(w, grid)
    rtn = dequantize(rtn_codes(w, s, grid), s, grid)
    codes = gptq_codes(w, h.h, s, grid, act_order=act_order)
    assert codes.dtype == np.int8 and codes.min() >= -8 and codes.max() <= 7
    gq = dequantize(codes, s, grid)
    held_out = _correlated(1024, 256, 3)  # same distribution, other samples
    assert _out_err(held_out, w, gq) < 0.8 * _out_err(held_out, w, rtn)
    # GPTQ trades weight error for output error, within what verification allows (weights_check)
    from skin_offline.export.weights_check import CALIBRATED_ERROR_RATIO

    assert np.linalg.norm(gq - w) < CALIBRATED_ERROR_RATIO * np.linalg.norm(rtn - w)


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    """With uncorrelated unit inputs no column can compensate another: GPTQ reduces to rounding (up to ties)."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(32, 128)).astype(np.float32)
    grid = Grid(4, 32)
    s = absmax_scales(w, grid)
    import torch

    codes = gptq_codes(w, torch.eye(128), s, grid, damp=0.0)
    assert np.array_equal(codes, rtn_codes(w, s, grid))


def test_inverse_cholesky_factor_equals_gptq_formula():
    import torch

    x = torch.from_numpy(_correlated(512, 96, 5))
    h = x.T @ x / 512 + 0.01 * torch.eye(96)
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # GPTQ's code path
    got = _inverse_cholesky_upper(h)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got.T @ got, torch.linalg.inv(h), rtol=1e-3, atol=1e-4)


def test_round_to_nearest_codes_pack_as_onnxruntime_packs():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(40, 256)).astype(np.float32)  # [N,K] checkpoint layout
    for bits, bs in ((4, 32), (4, 128), (8, 64)):
        grid = Grid(bits, bs)
        s = absmax_scales(w, grid)
        packed, scales, _ = pack_nbits(np.ascontiguousarray(w.T), bits, bs, True)  # onnxruntime's packer, [K,N]
        np.testing.assert_allclose(s.reshape(-1), scales, rtol=1e-6)
        mine = pack_codes(rtn_codes(w, s, grid), bits, bs)
        # ties may round either way (onnxruntime rounds half away from zero): compare decoded values
        assert np.mean(mine == packed) > 0.99


def test_activation_weighted_scales_favour_the_active_inputs():
    rng = np.random.default_rng(7)
    w = rng.normal(size=(64, 128)).astype(np.float32)
    grid = Grid(4, 128)
    imp = np.ones(128, np.float32)
    imp[:8] = 1e4  # eight inputs carry nearly all activation energy
    s = block_scales(w, grid, imp)
    base = absmax_scales(w, grid)
    assert np.all((s / base >= 0.6 - 1e-6) & (s / base <= 1 + 1e-6))
    err = lambda sc: (imp * np.square(dequantize(rtn_codes(w, sc, grid), sc, grid) - w)).sum()  # noqa: E731
    assert err(s) <= err(base)
    assert err(s) <= err(block_scales(w, grid)) + 1e-6  # the weight-error search is no better on what matters


def test_calibration_data_is_held_apart_and_large_enough():
    rows, pairs = load_pairs()
    assert len(rows) == len(pairs) >= 128 and len(set(rows)) == len(rows)
    assert (
        not set(rows) & set(QUALITY_ROWS) and not set(rows) & set(EVAL_ROWS) and not set(QUALITY_ROWS) & set(EVAL_ROWS)
    )
    assert not set(rows) & set(range(101, 201))  # the proxy's image passage (answers of rows 101-200)
    from skin_offline.export.quality import ProbeSet

    assert ProbeSet().num_questions <= len(QUALITY_ROWS) and CALIBRATION_SEED > max(ProbeSet().image_seeds)
    assert CalibrationSpec().sequences >= 128
    for layer_params in (3_500_000, 218_000_000):  # the proxy's layers, Mistral-7B's
        spec = CalibrationSpec().resolved(layer_params)
        assert spec.images * spec.per_image >= 128 and spec.images >= 1


def test_calibration_sequences_are_training_turns_with_image_positions(llava_model):
    """Each group: BOS "[INST] " + an image's features as the shared prefix; suffixes are `\\n{q} [/INST] {a}</s>`."""
    tok = llava_model.runtime.tokenizer
    table = llava_model.runtime.bundle.embed
    n, h = llava_model.manifest.model.image_tokens, llava_model.manifest.model.hidden_size
    feats = np.random.default_rng(0).normal(size=(2, n, h)).astype(np.float32)
    groups = calibration_groups(tok, lambda ids: table(ids), feats, per_image=3)
    _, pairs = load_pairs()
    assert len(groups) == 2 and all(len(g.suffixes) == 3 for g in groups)
    head = [tok.bos_id, *tok.encode("[INST] ")]
    np.testing.assert_array_equal(groups[1].prefix[len(head) :], feats[1])
    np.testing.assert_array_equal(groups[0].prefix[: len(head)], table(head))
    q, a = pairs[4]  # image 1, second suffix
    want = tok.encode("\n" + q + " [/INST]") + tok.answer_ids(a) + [tok.eos_id]
    np.testing.assert_array_equal(groups[1].suffixes[1], table(want))


def _export(ckpt, out, **kw):
    from skin_offline.export.to_onnx import export_bundle

    return export_bundle(ckpt, out, precision="int4", log=lambda m: None, **kw)


def test_calibrated_export_is_deterministic_verified_and_recorded(llava_model, tmp_path):
    from conftest import assert_verified

    a = _export(llava_model.ckpt, tmp_path / "a", threads=1)
    _export(llava_model.ckpt, tmp_path / "b", threads=1, verify=False, quality=False)
    data = [f for f in a.files if f.startswith("decoder")]
    assert data and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in data)
    assert_verified(a)
    g = a.pick("decoder")
    assert g.details["method"] == "gptq" and g.details["scales"] == "activation-search"
    cal = g.details["calibration"]
    assert cal["sequences"] >= 128 and "generated" in cal["images"] and "calibration.json" in cal["text"]
    q = a.quality["decoder.int4"]["quantization"]
    assert q["method"] == "gptq" and q["calibration"]["sequences"] == cal["sequences"]
    assert a.quality["measured_on"]["questions_source"].startswith("MM-Skin_test.csv rows")
    # rtn keeps onnxruntime's own rounding, byte for byte (test_quantize checks it against the fp32 weights)
    r = _export(llava_model.ckpt, tmp_path / "r", quant_method="rtn", verify=False, quality=False)
    assert r.pick("decoder").details["method"] == "rtn" and "calibration" not in r.pick("decoder").details
    assert (tmp_path / "r" / "decoder.int4.onnx.data").read_bytes() != (
        tmp_path / "a" / "decoder.int4.onnx.data"
    ).read_bytes()
    assert r.files["decoder.int4.onnx.data"].size == a.files["decoder.int4.onnx.data"].size  # same format


def test_calibration_images_are_used_and_never_recorded(llava_model, tmp_path):
    from conftest import random_image

    photos = tmp_path / "patient-jane-doe"
    photos.mkdir()
    for i in range(3):
        random_image(40 + i, size=(120, 90)).save(photos / f"jane_doe_{i}.png")
    (photos / "notes.txt").write_text("not an image")
    logged = []
    from skin_offline.export.to_onnx import export_bundle

    m = export_bundle(
        llava_model.ckpt,
        tmp_path / "c",
        precision="int4",
        calibration_images=photos,
        verify=False,
        quality=False,
        log=lambda s: logged.append(str(s)),
    )
    cal = m.pick("decoder").details["calibration"]
    assert cal["images"] == "3 images from --calibration-images" and cal["sequences"] >= 128
    text = (tmp_path / "c" / "manifest.json").read_text() + "\n".join(logged)
    assert "jane" not in text.lower() and str(photos) not in text
    assert not any(p.suffix == ".png" for p in (tmp_path / "c").iterdir())
    _export(llava_model.ckpt, tmp_path / "d", verify=False, quality=False)
    assert (tmp_path / "c" / "decoder.int4.onnx.data").read_bytes() != (
        tmp_path / "d" / "decoder.int4.onnx.data"
    ).read_bytes()


def test_verification_catches_a_calibrated_weight_from_another_layer(llava_model, tmp_path):
    """A stale or misplaced calibrated weight: layer 1's q_proj codes and scales written where layer 0's go."""
    from skin_offline.export.to_onnx import verify_against_checkpoint
    from skin_offline.export.verify import VerificationError

    _export(llava_model.ckpt, tmp_path / "v", verify=False, quality=False)
    import onnx

    g = onnx.load(str(tmp_path / "v" / "decoder.int4.onnx"), load_external_data=False)
    info = {t.name: {e.key: e.value for e in t.external_data} for t in g.graph.initializer if t.external_data}
    data = bytearray((tmp_path / "v" / "decoder.int4.onnx.data").read_bytes())
    for suffix in ("_Q4", "_scales"):
        src, dst = (info[f"layers.{i}.self_attn.q_proj.weight{suffix}"] for i in (1, 0))
        o1, n1, o0 = int(src["offset"]), int(src["length"]), int(dst["offset"])
        data[o0 : o0 + n1] = data[o1 : o1 + n1]
    (tmp_path / "v" / "decoder.int4.onnx.data").write_bytes(bytes(data))
    from test_verify import _rehash

    _rehash(tmp_path / "v", "decoder.int4.onnx.data")  # so the file hash is not what notices
    with pytest.raises(VerificationError, match="layers.0.self_attn.q_proj.weight.*scales are not what"):
        verify_against_checkpoint(tmp_path / "v", llava_model.ckpt)


def test_config_rules():
    from skin_offline.errors import ConfigError
    from skin_offline.export.quantize import QuantConfig

    assert QuantConfig("int4").method.value == "gptq" and QuantConfig("int4").calibrated
    assert QuantConfig("int8").method.value == "rtn" and not QuantConfig("int8").calibrated
    assert not QuantConfig("int4", method="rtn").calibrated
    assert QuantConfig("int4", method="rtn", scale_search=True).calibrated  # the fixed --scale-search
    assert QuantConfig("int4", symmetric=False).method.value == "rtn"
    with pytest.raises(ConfigError, match="--symmetric"):
        QuantConfig("int4", method="gptq", symmetric=False)
    with pytest.raises(ConfigError, match="--quant-method"):
        QuantConfig("int4", method="awq")
    with pytest.raises(ConfigError, match="int4/int8"):
        QuantConfig("fp16", method="gptq")


def test_each_calibrated_layer_hands_on_what_transformers_computes_with_its_quantized_weights(llava_model):
    """The hidden states a layer of the calibrated pass hands to the next (its calibration inputs) are those of
    transformers' MistralDecoderLayer over the same inputs with the layer's weights replaced by the dequantized codes
    the pass chose: each group's prefix first, each suffix attending to the prefix's keys."""
    from skin_offline.export.calibrate import LINEARS, Calibrator
    from skin_offline.export.layerstream import CheckpointStack, Group
    from skin_offline.export.to_onnx import open_source

    stack = CheckpointStack(open_source(llava_model.ckpt, None))
    h = stack.cfg.hidden_size
    rng = np.random.default_rng(0)
    groups = [  # two prefixes, suffixes of different lengths (one of a single position)
        Group(rng.normal(size=(9, h)).astype(np.float32), [rng.normal(size=(n, h)).astype(np.float32) for n in ns])
        for ns in ((5, 1, 7), (3,))
    ]
    grid = Grid(4, 16)
    cal = Calibrator(stack, stack.weights, groups, grid)
    for i in range(stack.num_layers):
        before = cal.hidden
        weights = stack.weights(i)
        cal._run_layer(i)
        for lin in LINEARS:
            r = cal.result[i]
            weights[lin + ".weight"] = torch_from(dequantize(r.codes[lin], r.scales[lin], grid))
        layer = stack.open(i, weights)
        for (hp, hs), (gp, gs) in zip(before, cal.hidden):
            want_p, k, v = layer(hp, None)
            np.testing.assert_allclose(gp, want_p, rtol=1e-4, atol=1e-4)
            for x, got in zip(hs, gs):
                np.testing.assert_allclose(got, layer(x, (k, v))[0], rtol=1e-4, atol=1e-4)


def torch_from(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, np.float32))
