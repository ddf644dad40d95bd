"""Typed graph-variant fields (attention, kernel) and the random-weights mark: written, read back, and derived
for bundles exported before the fields existed."""

from __future__ import annotations

import json

from skin_offline import names
from skin_offline.manifest import Attention, Flavor, GraphVariant, Kernel, Manifest, Precision


def test_legacy_variants_get_typed_fields_derived():
    old_int4 = GraphVariant(
        names.ROLE_DECODER,
        Precision.INT4,
        Flavor.CONTRIB,
        "d.onnx",
        details={"op": "MatMulNBits", "attention": "standard"},
    )
    assert old_int4.attention == Attention.CONCAT and old_int4.kernel == Kernel.NBITS
    gqa = GraphVariant(names.ROLE_DECODER, Precision.FP32, Flavor.CONTRIB, "c.onnx")
    assert gqa.attention == Attention.GQA_UNIFORM and gqa.kernel == Kernel.FLOAT  # exported before per-row lengths
    std = GraphVariant(names.ROLE_DECODER, Precision.FP32, Flavor.STANDARD, "s.onnx")
    assert std.attention == Attention.CONCAT
    vis = GraphVariant(names.ROLE_VISION, Precision.INT8, Flavor.CONTRIB, "v.onnx", details={"op": "MatMulInteger"})
    assert vis.attention is None and vis.kernel == Kernel.QGEMM


def test_export_records_fields_and_random_weights(llava_model):
    m = Manifest.read(llava_model.bundle_dir)
    assert m.random_weights  # the factory's checkpoint marked itself, export carried it
    raw = json.loads((llava_model.bundle_dir / names.MANIFEST).read_text())
    dec = {g["file"]: g for g in raw[names.K_GRAPHS] if g["role"] == names.ROLE_DECODER}
    assert dec[names.DECODER_GRAPH]["attention"] == "concat" and dec[names.DECODER_CONTRIB_GRAPH]["attention"] == "gqa"
    assert Manifest.from_dict(m.to_dict()) == m  # round trip


def test_unmarked_checkpoint_is_not_random(tmp_path):
    raw = {
        names.K_SCHEMA: 1,
        names.K_MODEL: dict(
            vocab_size=8,
            hidden_size=4,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=4,
            intermediate_size=8,
            rms_norm_eps=1e-5,
            rope_theta=1e4,
            max_context=16,
            image_tokens=1,
            vision_hidden_size=4,
        ),
        names.K_PREPROCESS: {},
        names.K_TOKENS: {},
        names.K_GRAPHS: [],
        names.K_FILES: {},
        names.K_SOURCE: {},
    }
    assert not Manifest.from_dict(raw).random_weights
