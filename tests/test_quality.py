"""The quality report is produced, its numbers are recomputed here from the graphs, and the layer-streamed report
`export` computes against the checkpoint equals the one computed against the fp32 bundle's graphs.

The recomputation is independent of export/quality.py's code path: whole graphs loaded by the runtime (the report
cuts them per layer), the quantized answer from the runtime's own decoder (prefill + decode steps), fp32 logits
along it from `Decoder.logits_all` over the whole sequence in one call, fp32's own greedy answer from the public
API (`SkinVL.ask`): the report's greedy figures, computed in one teacher-forced pass, must equal the ones measured
by letting both models answer. KL via torch's log_softmax/kl_div, cosine via torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skin_offline import names
from skin_offline.export.quality import ProbeSet, format_report, probe_image
from skin_offline.export.quantize import QuantConfig, quantize_bundle
from skin_offline.manifest import Precision

from decode_loop import embed_prompt

PROBES = ProbeSet(image_seeds=(0, 1), num_questions=2, new_tokens=12)


def _quantize(llava_model, tmp_path_factory, precision: str):
    out = tmp_path_factory.mktemp("quality") / precision
    r = quantize_bundle(
        llava_model.bundle_dir,
        out,
        QuantConfig(precision, vision="int8"),
        log=lambda m: None,
        probe_kw={"probes": PROBES, "threads": 1},
    )
    return out, r.manifest


@pytest.fixture(scope="module")
def quantized(llava_model, tmp_path_factory):
    return _quantize(llava_model, tmp_path_factory, "int8")


@pytest.fixture(scope="module")
def hybrid(llava_model, tmp_path_factory):
    """int4 decode graph + int8 QGEMM graph for many-row calls (the int4 default, Prefill.INT8)."""
    return _quantize(llava_model, tmp_path_factory, "int4")


def _greedy(decoder, embed, prompt: np.ndarray, n: int) -> list[int]:
    """n greedy tokens after one prefill of the prompt (EOS not special: every probe is n tokens long)."""
    logits, cache = decoder.forward(prompt, decoder.empty_cache(1))
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[0, -1])))
        logits, cache = decoder.forward(embed([out[-1]])[None], cache)
    return out


def _as_it_runs(decoder, embed, prompt: np.ndarray, answer: list[int]) -> np.ndarray:
    """Teacher-forced logits [n,V] the way a request runs: prefill the prompt, then one decode step per token."""
    logits, cache = decoder.forward(prompt, decoder.empty_cache(1))
    rows = [logits[0, -1]]
    for t in answer[:-1]:
        logits, cache = decoder.forward(embed([t])[None], cache)
        rows.append(logits[0, -1])
    return np.stack(rows)


def test_report_is_stored_and_says_what_it_measured(quantized, llava_model):
    out, m = quantized
    q = m.quality
    assert set(q) == {"measured_on", "decoder.int8", "vision.int8"}
    on = q["measured_on"]
    assert on["method"].startswith("fp32 teacher-forced along each quantized model's own greedy answer")
    assert on["probes"] == 4 and on["new_tokens"] == 12 and len(on["questions"]) == 2
    assert on["questions"][0] == "What does the image show?"  # MM-Skin_test.csv row 1
    assert "random-weight" in on["note"]
    lines = format_report(q)
    assert any("decoder.int8" in line and "top-1" in line for line in lines)


@pytest.mark.parametrize(
    "which,precision,multi_row",
    [
        ("quantized", Precision.INT8, "int8"),
        ("hybrid", Precision.INT4, "int8-qgemm"),
        ("hybrid", Precision.INT8, "int8"),
    ],
)
def test_quality_numbers_recompute_from_the_graphs(which, precision, multi_row, llava_model, request):
    """Every figure of the report from the graphs, with an independent loop. The hybrid's int4 entry is the path
    as it runs (int8 QGEMM prefill, int4 decode); its int8 entry is the QGEMM graph alone (the int8-only tier)."""
    from skin_offline.runtime.pipeline import SkinVL
    from skin_offline.runtime.prompt import build_prompt_ids

    out, m = request.getfixturevalue(which)
    ref = SkinVL.load(llava_model.bundle_dir, threads=1, precision=Precision.FP32)
    got = SkinVL.load(out, threads=1, precision=precision, prefill="int8" if multi_row == "int8-qgemm" else None)
    assert (got.bundle.decoder.gemm_session is not None) == (multi_row == "int8-qgemm")
    questions = m.quality["measured_on"]["questions"]
    n = PROBES.new_tokens
    ref_all, got_all, prefix, identical, cos = [], [], [], [], []
    for seed in PROBES.image_seeds:
        img = probe_image(seed)
        f32 = ref.image_features(ref.pixels(img))
        fq = got.image_features(got.pixels(img))
        cos.append(
            float(
                torch.nn.functional.cosine_similarity(
                    torch.from_numpy(f32.reshape(1, -1)).double(), torch.from_numpy(fq.reshape(1, -1)).double()
                )
            )
        )
        for q in questions:
            ids = build_prompt_ids(ref.tokenizer, q)
            p32, pq = embed_prompt(ref, ids, f32), embed_prompt(got, ids, fq)
            mine = _greedy(got.bundle.decoder, got.bundle.embed, pq, n)  # the quantized answer, as a request runs
            got_all.append(_as_it_runs(got.bundle.decoder, got.bundle.embed, pq, mine))
            seq = np.concatenate([p32[0], ref.bundle.embed(mine[:-1])])[None]  # fp32 reads that same answer
            ref_all.append(ref.bundle.decoder.logits_all(seq)[0, -n:])
            answer = ref.ask(img, q, max_new_tokens=n).token_ids  # fp32's own greedy answer
            if len(answer) < n:  # stopped at EOS: the report decodes past it; extend with the same rule
                pytest.skip("fp32 answer hit EOS early on this probe")
            k = next((i for i, (a, b) in enumerate(zip(mine, answer)) if a != b), n)
            prefix.append(k / n)
            identical.append(mine == answer)
    r32, rq = torch.from_numpy(np.concatenate(ref_all)).double(), torch.from_numpy(np.concatenate(got_all)).double()
    lp, lq = torch.log_softmax(r32, -1), torch.log_softmax(rq, -1)
    kl = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)  # KL(fp32 || int8)
    d = m.quality[f"decoder.{precision.value}"]
    assert d["top1_agreement"] == pytest.approx(float((r32.argmax(-1) == rq.argmax(-1)).double().mean()), abs=1e-9)
    assert d["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-9)
    assert d["kl_max"] == pytest.approx(float(kl.max()), rel=1e-3, abs=1e-9)
    assert d["max_abs_logit_diff"] == pytest.approx(float((r32 - rq).abs().max()), rel=1e-3, abs=1e-5)
    assert d["greedy_prefix_agreement"] == pytest.approx(np.mean(prefix))
    assert d["greedy_identical"] == pytest.approx(np.mean(identical))
    assert d["pipeline"] == {"vision": "int8", "embeddings": "int8", "multi_row": multi_row}
    v = m.quality["vision.int8"]
    assert v["feature_cosine_mean"] == pytest.approx(np.mean(cos), abs=1e-7)
    assert v["feature_cosine_min"] == pytest.approx(np.min(cos), abs=1e-7)
    assert 0.99 < v["feature_cosine_min"] <= 1.0


def test_streamed_checkpoint_report_equals_the_fp32_bundle_report(hybrid, llava_model):
    """What `export` stores (fp32 = the checkpoint through transformers' layers, one at a time) against what
    `quantize` stores (fp32 = the fp32 bundle's graphs, cut per layer): the same report within fp32 rounding."""
    from skin_offline.export.checkpoint import open_checkpoint
    from skin_offline.export.quality import CheckpointReference, measure

    out, m = hybrid
    streamed = measure(out, CheckpointReference(open_checkpoint(llava_model.ckpt)), PROBES, threads=1)
    assert set(streamed) == set(m.quality)
    assert streamed["measured_on"]["reference"].startswith("checkpoint")
    assert m.quality["measured_on"]["reference"].startswith("fp32 bundle")
    for key in ("decoder.int4", "decoder.int8"):
        a, b = streamed[key], m.quality[key]
        for fig in ("top1_agreement", "greedy_prefix_agreement", "greedy_identical"):
            assert a[fig] == pytest.approx(b[fig], abs=1e-9), (key, fig)
        for fig in ("kl_mean", "kl_max"):
            assert a[fig] == pytest.approx(b[fig], rel=1e-3), (key, fig)
        assert a["max_abs_logit_diff"] == pytest.approx(b["max_abs_logit_diff"], abs=1e-4)
        assert a["pipeline"] == b["pipeline"]
    assert streamed["vision.int8"]["feature_cosine_min"] == pytest.approx(
        m.quality["vision.int8"]["feature_cosine_min"], abs=1e-6
    )


def test_report_names_no_paths(hybrid):
    import json

    out, m = hybrid
    text = json.dumps(m.quality)
    assert str(out.parent) not in text and "/tmp" not in text and "source_bundle" not in text


def test_fp32_against_itself_is_perfect(llava_model, tmp_path):
    """The metric code on identical graphs: agreement 1, KL 0 (fp16 carries only fp16 rounding)."""
    from skin_offline.export.quality import quality_report

    out = tmp_path / "fp16"
    quantize_bundle(llava_model.bundle_dir, out, QuantConfig("fp16"), quality=False, log=lambda m: None)
    rep = quality_report(
        llava_model.bundle_dir, out, ProbeSet(image_seeds=(0,), num_questions=1, new_tokens=8), threads=1
    )
    d = rep["decoder.fp16"]
    assert d["top1_agreement"] == 1.0 and d["greedy_identical"] == 1.0
    assert d["kl_max"] < 1e-5 and d["max_abs_logit_diff"] < 0.02
    assert names.ROLE_DECODER + ".fp16" in rep
