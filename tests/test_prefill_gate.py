"""The int8 prefill graph's quality gate (export/prefill_gate.py): measured at export, kept by default only when its
next-token distributions are no further from fp32 than the decode graph's; on the real-weights proxy it must be
rejected (test_proxy.py checks that bundle). Round-to-nearest int4 here: the gate does not depend on how the int4
weights were chosen, and the calibrated pass would only add time."""

from __future__ import annotations

import numpy as np

from skin_offline import names
from skin_offline.export.quantize import QuantConfig, quantize_bundle
from skin_offline.manifest import Flavor, Kernel, Precision

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
    import skin_offline.export.quantize as q

    written: list[str] = []
    real = q.quantize_graphs

    def spy(plans, *a, **kw):
        written.extend(p.dst_name for p in plans)
        return real(plans, *a, **kw)

    monkeypatch.setattr(q, "quantize_graphs", spy)
    m = quantize_bundle(
        llava_model.bundle_dir, tmp_path / "b", QuantConfig("int4", method="rtn"), quality=False, log=said.append
    ).manifest
    assert _decoders(m) == [(Precision.INT4, Kernel.NBITS)]
    # measured before it was written, then never written
    assert [w for w in written if w.startswith("decoder")] == [names.variant_file(names.DECODER_GRAPH, "int4")]
    assert not [p for p in (tmp_path / "b").iterdir() if "qgemm" in p.name]  # no files, listed nowhere
    assert set(m.files) == {p.name for p in (tmp_path / "b").iterdir()} - {names.MANIFEST}
    g = m.pick(names.ROLE_DECODER).details["prefill_gate"]
    assert g["passed"] is False and g["prefill_graph_kept"] is False
    assert any(line.startswith("int8 prefill graph rejected, not written: top-1 agreement with fp32") for line in said)
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


def _probe(src):
    from skin_offline.export.prefill_gate import probe_groups
    from skin_offline.manifest import Manifest
    from skin_offline.runtime.bundle import _load_table
    from skin_offline.runtime.tokenizer import TextTokenizer

    s = Manifest.read(src)
    table, _ = _load_table(src, s, s.pick(names.ROLE_EMBEDDINGS, Precision.FP32))
    groups = probe_groups(
        TextTokenizer.from_file(src / names.TOKENIZER, s.tokens),
        lambda ids: np.asarray(table[np.asarray(ids, np.int64)], np.float32),
        src / s.pick(names.ROLE_VISION, Precision.FP32).file,
        s.preprocess,
        1,
    )
    return s, groups


def test_the_measurement_compares_each_graph_with_fp32(llava_model, tmp_path):
    """The decode graph measured as its own prefill graph scores exactly as itself; the fp32 graph as the decode
    graph agrees with the reference completely."""
    from skin_offline.export.layerstream import GraphStack
    from skin_offline.export.prefill_gate import measure_prefill

    src = llava_model.bundle_dir
    m = quantize_bundle(
        src, tmp_path / "q", QuantConfig("int4", method="rtn", prefill="decoder"), quality=False, log=lambda s: None
    ).manifest
    s, groups = _probe(src)
    fp32 = src / s.pick(names.ROLE_DECODER, Precision.FP32).file
    int4 = tmp_path / "q" / m.pick(names.ROLE_DECODER).file
    same = measure_prefill(GraphStack(fp32, 1), GraphStack(int4, 1), GraphStack(int4, 1), groups)
    assert same.prefill_kl == same.decode_kl and same.prefill_top1 == same.decode_top1 and same.passed
    exact = measure_prefill(GraphStack(fp32, 1), GraphStack(fp32, 1), GraphStack(int4, 1), groups)
    assert exact.decode_top1 == 1.0 and exact.decode_kl < 1e-6
    assert exact.prefill_kl > exact.decode_kl  # int4 is measurably further from fp32 than fp32 itself


def test_the_unwritten_candidate_computes_what_the_written_graph_does(llava_model, tmp_path):
    """The gate runs a defaulted prefill graph before writing it, each layer encoded in memory from the fp32 source
    (quantize.encode_cut): its logits on the probe turns must be those of the graph `--prefill int8` writes, bit for
    bit (same nodes, same bytes, one thread)."""
    from skin_offline.export.layerstream import GraphStack
    from skin_offline.export.prefill_gate import _turn_logits
    from skin_offline.export.quantize import GraphSource, decoder_plans, encode_cut

    src = llava_model.bundle_dir
    m = quantize_bundle(
        src, tmp_path / "q", QuantConfig("int4", method="rtn", prefill="int8"), quality=False, log=lambda s: None
    ).manifest
    s, groups = _probe(src)
    dec32 = s.pick(names.ROLE_DECODER, Precision.FP32, Flavor.CONTRIB)
    _, plans = decoder_plans(
        QuantConfig("int4", method="rtn", prefill="int8"), GraphSource.from_file(src / dec32.file), dec32, "src"
    )
    (plan,) = [p for p in plans if p.kernel == Kernel.QGEMM]
    written = tmp_path / "q" / next(g.file for g in m.variants(names.ROLE_DECODER) if g.kernel == Kernel.QGEMM)
    assert written.name == plan.dst_name
    candidate = GraphStack(
        tmp_path / "nowhere" / plan.dst_name, 1, model=plan.source.model, fill=lambda c: encode_cut(plan, c)
    )
    got, want = _turn_logits(candidate, groups), _turn_logits(GraphStack(written, 1), groups)
    assert got.shape == want.shape and got.shape[0] > 50
    np.testing.assert_array_equal(got, want)
