"""The int8 prefill graph's quality gate (export/prefill_gate.py): measured at export, kept by default only when its
next-token distributions are no further from fp32 than the decode graph's; on the real-weights proxy it must be
rejected (test_proxy.py checks that bundle). Round-to-nearest int4 here: the gate does not depend on how the int4
weights were chosen, and the calibrated pass would only add time."""

from __future__ import annotations

import numpy as np

from skin_offline import names
from skin_offline.export.quantize import QuantConfig, quantize_bundle
from skin_offline.manifest import Kernel, Precision

from conftest import random_image


def _decoders(m):
    return [(g.precision, g.kernel) for g in m.variants(names.ROLE_DECODER)]


def test_default_hybrid_keeps_its_prefill_graph_as_its_measurement_says(llava_model, tmp_path, monkeypatch):
    import skin_offline.export.prefill_gate as pg
    from skin_offline.runtime.pipeline import SkinVL

    said: list[str] = []
    m = quantize_bundle(
        llava_model.bundle_dir, tmp_path / "a", QuantConfig("int4", method="rtn"), quality=False, log=said.append
    ).manifest
    gate = m.pick(names.ROLE_DECODER).details["prefill_gate"]
    assert gate["positions"] > 50 and 0 <= gate["top1_agreement"] <= 1 and gate["kl_mean"] >= 0
    assert gate["passed"] == (gate["kl_mean"] <= gate["decode_kl_mean"] + pg.KL_SLACK)
    assert gate["prefill_graph_kept"] == gate["passed"]
    assert ((Precision.INT8, Kernel.QGEMM) in _decoders(m)) == gate["passed"]

    monkeypatch.setattr(pg, "KL_SLACK", -1.0)  # unreachable: a defaulted graph must go
    said.clear()
    m = quantize_bundle(
        llava_model.bundle_dir, tmp_path / "b", QuantConfig("int4", method="rtn"), quality=False, log=said.append
    ).manifest
    assert _decoders(m) == [(Precision.INT4, Kernel.NBITS)]
    assert not [p for p in (tmp_path / "b").iterdir() if "qgemm" in p.name]  # its files are gone, listed nowhere
    assert set(m.files) == {p.name for p in (tmp_path / "b").iterdir()} - {names.MANIFEST}
    g = m.pick(names.ROLE_DECODER).details["prefill_gate"]
    assert g["passed"] is False and g["prefill_graph_kept"] is False
    assert any(line.startswith("int8 prefill graph rejected: top-1 agreement with fp32") for line in said)
    vl = SkinVL.load(tmp_path / "b", threads=1)
    assert (
        "multi_row" not in vl.bundle.picked
        and vl.ask(random_image(3), "What is this lesion?", max_new_tokens=4).token_ids
    )

    # asked for by name: kept whatever the measurement, which is recorded all the same
    m = quantize_bundle(
        llava_model.bundle_dir,
        tmp_path / "c",
        QuantConfig("int4", method="rtn", prefill="int8"),
        quality=False,
        log=lambda s: None,
    ).manifest
    assert _decoders(m) == [(Precision.INT4, Kernel.NBITS), (Precision.INT8, Kernel.QGEMM)]
    g = m.pick(names.ROLE_DECODER).details["prefill_gate"]
    assert g["passed"] is False and g["prefill_graph_kept"] is True


def test_the_measurement_compares_each_graph_with_fp32(llava_model, tmp_path):
    """The decode graph measured as its own prefill graph scores exactly as itself; the fp32 graph as the decode
    graph agrees with the reference completely."""
    from skin_offline.export.layerstream import GraphStack
    from skin_offline.export.prefill_gate import measure_prefill, probe_groups
    from skin_offline.manifest import Manifest
    from skin_offline.runtime.bundle import _load_table
    from skin_offline.runtime.tokenizer import TextTokenizer

    src = llava_model.bundle_dir
    m = quantize_bundle(
        src, tmp_path / "q", QuantConfig("int4", method="rtn", prefill="decoder"), quality=False, log=lambda s: None
    ).manifest
    s = Manifest.read(src)
    dec32 = s.pick(names.ROLE_DECODER, Precision.FP32)
    table, _ = _load_table(src, s, s.pick(names.ROLE_EMBEDDINGS, Precision.FP32))
    groups = probe_groups(
        TextTokenizer.from_file(src / names.TOKENIZER, s.tokens),
        lambda ids: np.asarray(table[np.asarray(ids, np.int64)], np.float32),
        src / s.pick(names.ROLE_VISION, Precision.FP32).file,
        s.preprocess,
        1,
    )
    int4 = tmp_path / "q" / m.pick(names.ROLE_DECODER).file
    same = measure_prefill(GraphStack(src / dec32.file, 1), int4, int4, groups, 1)
    assert same.prefill_kl == same.decode_kl and same.prefill_top1 == same.decode_top1 and same.passed
    exact = measure_prefill(GraphStack(src / dec32.file, 1), src / dec32.file, int4, groups, 1)
    assert exact.decode_top1 == 1.0 and exact.decode_kl < 1e-6
    assert exact.prefill_kl > exact.decode_kl  # int4 is measurably further from fp32 than fp32 itself
