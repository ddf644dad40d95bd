"""The quality report stored by `quantize` is produced, and its numbers are recomputed here from the graphs.

The recomputation is independent of export/quality.py's code path: fp32 answers come from the public API
(`SkinVL.ask`, greedy), logits from `Decoder.logits_all` over the whole sequence (not the keep=n call the
report uses), KL via torch's log_softmax/kl_div, cosine via torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skin_offline import names
from skin_offline.export.quality import ProbeSet, format_report, probe_image
from skin_offline.export.quantize import QuantConfig, quantize_bundle
from skin_offline.manifest import Precision

PROBES = ProbeSet(image_seeds=(0, 1), num_questions=2, new_tokens=12)


@pytest.fixture(scope="module")
def quantized(llava_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "int8"
    r = quantize_bundle(llava_model.bundle_dir, out, QuantConfig("int8", vision="int8"), log=lambda m: None,
                        probe_kw={"probes": PROBES, "threads": 1})
    return out, r.manifest


def test_report_is_stored_and_says_what_it_measured(quantized, llava_model):
    out, m = quantized
    q = m.quality
    assert set(q) == {"measured_on", "decoder.int8", "vision.int8"}
    on = q["measured_on"]
    assert on["probes"] == 4 and on["new_tokens"] == 12 and len(on["questions"]) == 2
    assert on["questions"][0] == "What does the image show?"  # MM-Skin_test.csv row 1
    assert "random-weight" in on["note"]
    lines = format_report(q)
    assert any("decoder.int8" in line and "top-1" in line for line in lines)


def test_quality_numbers_recompute_from_the_graphs(quantized, llava_model):
    from skin_offline.runtime.pipeline import SkinVL
    from skin_offline.runtime.prompt import build_prompt_ids

    out, m = quantized
    ref = SkinVL.load(llava_model.bundle_dir, threads=1, precision=Precision.FP32)
    got = SkinVL.load(out, threads=1, precision=Precision.INT8)
    questions = m.quality["measured_on"]["questions"]
    n = PROBES.new_tokens
    ref_all, got_all, prefix, identical, cos = [], [], [], [], []
    for seed in PROBES.image_seeds:
        img = probe_image(seed)
        f32 = ref.image_features(ref.pixels(img))
        fq = got.image_features(got.pixels(img))
        cos.append(float(torch.nn.functional.cosine_similarity(torch.from_numpy(f32.reshape(1, -1)).double(),
                                                               torch.from_numpy(fq.reshape(1, -1)).double())))
        for q in questions:
            ids = build_prompt_ids(ref.tokenizer, q)
            answer = ref.ask(img, q, max_new_tokens=n).token_ids
            if len(answer) < n:  # stopped at EOS: the report decodes past it; extend with the same rule
                pytest.skip("fp32 answer hit EOS early on this probe")
            seq32 = np.concatenate([ref.prompt_embeddings(ids, f32)[0], ref.bundle.embed(answer[:-1])])[None]
            seqq = np.concatenate([got.prompt_embeddings(ids, fq)[0], got.bundle.embed(answer[:-1])])[None]
            ref_all.append(ref.bundle.decoder.logits_all(seq32)[0, -n:])
            got_all.append(got.bundle.decoder.logits_all(seqq)[0, -n:])
            mine = got.ask(img, q, max_new_tokens=n).token_ids
            k = next((i for i, (a, b) in enumerate(zip(mine, answer)) if a != b), min(len(mine), n))
            prefix.append(k / n)
            identical.append(mine == answer)
    r32, rq = torch.from_numpy(np.concatenate(ref_all)).double(), torch.from_numpy(np.concatenate(got_all)).double()
    lp, lq = torch.log_softmax(r32, -1), torch.log_softmax(rq, -1)
    kl = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)  # KL(fp32 || int8)
    d = m.quality["decoder.int8"]
    assert d["top1_agreement"] == pytest.approx(float((r32.argmax(-1) == rq.argmax(-1)).double().mean()), abs=1e-9)
    assert d["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-9)
    assert d["kl_max"] == pytest.approx(float(kl.max()), rel=1e-3, abs=1e-9)
    assert d["max_abs_logit_diff"] == pytest.approx(float((r32 - rq).abs().max()), rel=1e-3, abs=1e-5)
    assert d["greedy_prefix_agreement"] == pytest.approx(np.mean(prefix))
    assert d["greedy_identical"] == pytest.approx(np.mean(identical))
    assert d["pipeline"] == {"vision": "int8", "embeddings": "int8"}
    v = m.quality["vision.int8"]
    assert v["feature_cosine_mean"] == pytest.approx(np.mean(cos), abs=1e-7)
    assert v["feature_cosine_min"] == pytest.approx(np.min(cos), abs=1e-7)
    assert 0.99 < v["feature_cosine_min"] <= 1.0


def test_fp32_against_itself_is_perfect(llava_model, tmp_path):
    """The metric code on identical graphs: agreement 1, KL 0 (fp16 carries only fp16 rounding)."""
    from skin_offline.export.quality import quality_report

    out = tmp_path / "fp16"
    quantize_bundle(llava_model.bundle_dir, out, QuantConfig("fp16"), quality=False, log=lambda m: None)
    rep = quality_report(llava_model.bundle_dir, out, ProbeSet(image_seeds=(0,), num_questions=1, new_tokens=8), threads=1)
    d = rep["decoder.fp16"]
    assert d["top1_agreement"] == 1.0 and d["greedy_identical"] == 1.0
    assert d["kl_max"] < 1e-5 and d["max_abs_logit_diff"] < 0.02
    assert names.ROLE_DECODER + ".fp16" in rep
