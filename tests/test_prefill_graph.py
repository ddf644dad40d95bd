"""Many-row calls through a second graph (issue 12): the int8 QGEMM prefill graph beside the int4 decode graph.

Exactness of the handover is tested with two graphs that compute the same function (the fp32 contrib graph
loaded twice): prefill through one, decode through the other, tokens identical to transformers. The kernel
rule (runtime/kernels/policy.py) picks by rows per call, and a hybrid bundle's calls go where the rule says."""

from __future__ import annotations

import onnx
import pytest

from skin_offline import names
from skin_offline.errors import BundleError
from skin_offline.export.quantize import QuantConfig, quantize_bundle
from skin_offline.manifest import Flavor, Kernel, Precision
from skin_offline.runtime.kernels import policy
from skin_offline.runtime.kernels.policy import KernelPolicy

from conftest import decoder_greedy_vs_reference, random_image
from decode_loop import embed_prompt


class Counting:
    """A session proxy that counts its runs."""

    def __init__(self, session):
        self._s = session
        self.runs = 0

    def __getattr__(self, name):
        return getattr(self._s, name)

    def run_with_iobinding(self, binding, *a, **kw):
        self.runs += 1
        return self._s.run_with_iobinding(binding, *a, **kw)


def _fast(session, dims, gemm, min_rows):
    from skin_offline.runtime.decoder import FastDecoder

    return FastDecoder(session, dims, gemm_session=gemm, policy=KernelPolicy(min_rows))


def test_policy_rule_and_machine_default(monkeypatch):
    p = KernelPolicy(4)
    assert [p.multi_row(r) for r in (1, 3, 4, 600)] == [False, False, True, True]
    monkeypatch.delenv(policy.GEMM_MIN_ROWS_ENV, raising=False)
    assert policy.default_gemm_min_rows({"avx512_vnni", "amx_int8"}) == policy.AMX_GEMM_MIN_ROWS
    assert policy.default_gemm_min_rows({"avx2"}) == policy.DEFAULT_GEMM_MIN_ROWS
    monkeypatch.setenv(policy.GEMM_MIN_ROWS_ENV, "3")
    assert KernelPolicy.for_this_machine().gemm_min_rows == 3
    from skin_offline.errors import UsageError

    monkeypatch.setenv(policy.GEMM_MIN_ROWS_ENV, "many")
    with pytest.raises(UsageError, match=policy.GEMM_MIN_ROWS_ENV):
        KernelPolicy.for_this_machine()


def test_handover_between_two_graphs_is_exact(llava_model):
    """Prefill through the 'multi-row' session, decode through the other: same tokens as transformers, logits
    within fp32 noise, and each session ran exactly the calls the rule gives it."""
    from skin_offline.runtime.sessions import SessionFactory

    m = llava_model.runtime.manifest
    g = m.pick(names.ROLE_DECODER, Precision.FP32, Flavor.CONTRIB)
    make = SessionFactory(threads=1)
    one, many = (
        Counting(make.create(llava_model.bundle_dir / g.file)),
        Counting(make.create(llava_model.bundle_dir / g.file)),
    )
    dec = _fast(one, m.model, many, min_rows=2)
    tokens, ref_tokens, diff = decoder_greedy_vs_reference(dec, llava_model, "What is this lesion?", 1, 16)
    assert tokens == ref_tokens[: len(tokens)] and len(tokens) >= 8
    assert diff < 1e-4
    assert many.runs == 1  # the prompt: one prefill call
    assert one.runs == len(tokens) - 1  # every decode step (the last token is not fed back)


def test_chunked_prefill_across_graphs_equals_one_shot(llava_model):
    """A prompt prefilled in chunks that alternate graphs (1-row chunks on one, longer on the other) leaves the
    same cache and logits as one call: both graphs write the one shared buffer in place."""
    import numpy as np

    from skin_offline.runtime.sessions import SessionFactory

    rt = llava_model.runtime
    m = rt.manifest
    g = m.pick(names.ROLE_DECODER, Precision.FP32, Flavor.CONTRIB)
    make = SessionFactory(threads=1)
    dec = _fast(make.create(llava_model.bundle_dir / g.file), m.model, make.create(llava_model.bundle_dir / g.file), 3)
    from skin_offline.runtime.prompt import build_prompt_ids

    ids = build_prompt_ids(rt.tokenizer, "Is the border regular?")
    embeds = embed_prompt(rt, ids, rt.image_features(rt.pixels(random_image(2))))  # [1,S,H]
    one_logits, one_cache = dec.forward(embeds, dec.empty_cache())
    cache, start = dec.empty_cache(), 0
    for size in (1, 5, 1, 2, 7, 1, 10**6):
        chunk = embeds[:, start : start + size]
        if not chunk.shape[1]:
            break
        logits, cache = dec.forward(chunk, cache)
        start += chunk.shape[1]
    assert np.abs(logits - one_logits).max() < 1e-4
    for a, b in zip(one_cache.keys + one_cache.values, cache.keys + cache.values):
        assert np.abs(a - b).max() < 1e-4


@pytest.fixture(scope="module")
def hybrid(llava_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid") / "int4"
    quantize_bundle(llava_model.bundle_dir, out, QuantConfig("int4"), quality=False, log=lambda m: None)
    return out


def test_hybrid_bundle_layout(hybrid):
    from skin_offline.manifest import Manifest

    m = Manifest.read(hybrid)
    dec, partner = m.variants(names.ROLE_DECODER)
    assert (dec.precision, dec.kernel) == (Precision.INT4, Kernel.NBITS)
    assert (partner.precision, partner.kernel) == (Precision.INT8, Kernel.QGEMM)
    assert m.multi_row_partner(dec) == partner and m.multi_row_partner(partner) is None
    g = onnx.load(str(hybrid / partner.file), load_external_data=False).graph
    weights = {t.name for t in g.initializer}
    assert not [n for n in g.node if n.op_type in ("MatMul", "MatMulNBits") and n.input[1] in weights]
    qg = [n for n in g.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(qg) == 7 * m.model.num_layers + 1  # every projection and the lm_head
    codes = next(t for t in g.initializer if t.name == qg[0].input[1])
    assert codes.data_type == onnx.TensorProto.INT8


def test_hybrid_runs_many_rows_on_int8_and_one_row_on_int4(hybrid, monkeypatch):
    from skin_offline.runtime.pipeline import SkinVL

    monkeypatch.setenv(policy.GEMM_MIN_ROWS_ENV, "2")
    model = SkinVL.load(hybrid, threads=1, prefill="int8")
    dec = model.bundle.decoder
    dec.session, dec.gemm_session = Counting(dec.session), Counting(dec.gemm_session)
    a = model.ask(random_image(4), "What is this lesion?", max_new_tokens=8)
    n = len(a.token_ids)
    # the image prefix and the question (both >= 2 rows) through int8; every decode step through int4
    assert dec.gemm_session.runs == 2 and dec.session.runs == n - 1
    assert SkinVL.load(hybrid, threads=1, prefill="decoder").bundle.decoder.gemm_session is None


def test_prefill_choices_and_memory_guard(hybrid, llava_model, monkeypatch):
    from skin_offline.runtime import bundle as bundle_mod
    from skin_offline.runtime.bundle import Bundle

    with pytest.raises(BundleError, match="no int8 prefill graph"):
        Bundle.load(llava_model.bundle_dir, threads=1, prefill="int8")
    monkeypatch.setattr(bundle_mod, "_available_memory", lambda: 1 << 20)  # 1 MB free: auto leaves it out
    b = Bundle.load(hybrid, threads=1)
    assert b.decoder.gemm_session is None and len(b.notices) == 1 and "left unloaded" in b.notices[0]
    assert Bundle.load(hybrid, threads=1, prefill="int8").decoder.gemm_session is not None  # asked for: loaded


def test_bench_measures_either_tier_of_a_hybrid_bundle(hybrid):
    """`bench --prefill decoder|int8`: the int4-only tier and the hybrid timed on one bundle, each saying which
    graph its prefill ran through."""
    import json

    from typer.testing import CliRunner

    from skin_offline.cli import app

    seen = {}
    for choice in ("decoder", "int8"):
        r = CliRunner().invoke(
            app,
            [
                "bench",
                str(hybrid),
                "--runs",
                "1",
                "--warmup",
                "0",
                "--new-tokens",
                "2",
                "--threads",
                "1",
                "--no-probe",
                "--json",
                "--device",
                "cpu",
                "--prefill",
                choice,
            ],
        )
        assert r.exit_code == 0, r.output
        seen[choice] = json.loads(r.stdout)["model"]
    assert seen["decoder"]["prefill"] == "int4" and seen["int8"]["prefill"] == "int8 qgemm"
    bad = CliRunner().invoke(app, ["bench", str(hybrid), "--prefill", "fast"])
    assert bad.exit_code == 2


def test_eval_batch_on_a_quantized_bundle_says_answers_can_differ(hybrid, tmp_path):
    from typer.testing import CliRunner

    from skin_offline.cli import app

    (tmp_path / "images").mkdir()
    random_image(5).save(tmp_path / "images" / "a.png")
    (tmp_path / "q.csv").write_text("image,question,answer\na.png,What is this?,A nevus.\na.png,Is it raised?,No.\n")
    args = [
        "eval",
        str(hybrid),
        "--csv",
        str(tmp_path / "q.csv"),
        "--images",
        str(tmp_path / "images"),
        "--protocol",
        "greedy",
        "--max-new-tokens",
        "3",
        "--threads",
        "1",
    ]
    r = CliRunner().invoke(app, [*args, "--batch", "2", "--out", str(tmp_path / "b2")])
    assert r.exit_code == 0, r.output
    assert "note: --batch 2 on an int4 bundle" in r.stderr and "can differ from --batch 1" in r.stderr
    r = CliRunner().invoke(app, [*args, "--batch", "1", "--out", str(tmp_path / "b1")])
    assert r.exit_code == 0 and "note: --batch" not in r.stderr
