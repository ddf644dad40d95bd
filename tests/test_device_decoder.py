"""DeviceDecoder: the standard graph with IO-bound outputs left where the session runs (the CUDA/TensorRT path).

CI has no GPU, so these run the exact binding logic with device_type="cpu": the cache must stay OrtValues
between steps (never numpy), and the tokens/logits must match transformers and the plain Decoder. The GPU
itself is checked by scripts/gpu_check.sh.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import decoder_greedy_vs_reference, random_image

ATOL = 1e-4  # fp32, same budget as test_parity.py
QUESTION = "Is the border of this lesion regular?"


@pytest.fixture(scope="module")
def decoders(llava_model):
    from skin_offline import names
    from skin_offline.manifest import Flavor
    from skin_offline.runtime.decoder import Decoder, DeviceDecoder
    from skin_offline.runtime.sessions import SessionFactory

    man = llava_model.manifest
    std = man.pick(names.ROLE_DECODER, flavor=Flavor.STANDARD)
    session = SessionFactory(threads=1).create(llava_model.bundle_dir / std.file)
    return Decoder(session, man.model), DeviceDecoder(session, man.model, "cpu", 0)


def test_greedy_tokens_and_step_logits_match_transformers(llava_model, decoders):
    tokens, ref_tokens, diff = decoder_greedy_vs_reference(decoders[1], llava_model, QUESTION, 11, 24)
    assert tokens == ref_tokens
    assert diff < ATOL


def test_cache_stays_ortvalues_between_steps_and_equals_host_decoder(llava_model, decoders):
    import onnxruntime as ort

    host, dev = decoders
    rng = np.random.default_rng(3)
    embeds = llava_model.runtime.bundle.embed(rng.integers(3, 32000, 12))[None]  # [1,12,H]
    lh, ch = host.forward(embeds[:, :8], host.empty_cache(), keep=8)
    ld, cd = dev.forward(embeds[:, :8], dev.empty_cache(), keep=8)
    assert ld.shape == lh.shape == (1, 8, llava_model.manifest.model.vocab_size)
    for i in range(8, 12):
        lh, ch = host.forward(embeds[:, i : i + 1], ch)
        ld, cd = dev.forward(embeds[:, i : i + 1], cd)
        # presents come back as OrtValues and go straight back in: no host copy of the cache per step
        assert cd.device_kv is not None and all(isinstance(v, ort.OrtValue) for v in cd.device_kv)
        assert len(cd.device_kv) == 2 * llava_model.manifest.model.num_layers
        assert all(v.device_name().lower() == "cpu" for v in cd.device_kv)
        assert np.abs(ld - lh).max() < ATOL
    assert cd.length == ch.length == 12
    assert np.abs(cd.keys[1] - ch.keys[1]).max() < ATOL  # the host view, fetched only on request
    with torch.no_grad():
        ref = llava_model.ref(inputs_embeds=torch.from_numpy(embeds)).logits.numpy()[0, -1]
    assert np.abs(ld[0, 0] - ref).max() < ATOL


def test_prefix_reuse_and_gathered_rows(llava_model, decoders):
    from decode_loop import gather

    host, dev = decoders
    rng = np.random.default_rng(4)
    a = llava_model.runtime.bundle.embed(rng.integers(3, 32000, 10))[None]
    _, prefix = dev.forward(a[:, :6], dev.empty_cache())
    la, _ = dev.forward(a[:, 6:], prefix, keep=4)
    la2, _ = dev.forward(a[:, 6:], prefix, keep=4)  # the same prefix continued twice: device caches are values
    assert np.array_equal(la, la2)
    rows = gather(prefix, [0, 0, 0])  # rows gathered on the host, uploaded by the next step
    lr, cr = dev.forward(np.repeat(a[:, 6:7], 3, axis=0), rows)
    assert cr.device_kv is not None and lr.shape[0] == 3
    lh, _ = host.forward(a[:, :7], host.empty_cache())
    for r in range(3):
        assert np.abs(lr[r, 0] - lh[0, 0]).max() < ATOL


def test_make_decoder_picks_device_decoder_only_for_gpu_providers(llava_model, decoders):
    from skin_offline.runtime import decoder as dm

    class FakeGPU:
        def __init__(self, provider, opts):
            self.provider, self.opts, self.inner = provider, opts, decoders[0].session

        def get_providers(self):
            return [self.provider, "CPUExecutionProvider"]

        def get_provider_options(self):
            return {self.provider: self.opts}

        def __getattr__(self, name):
            return getattr(self.inner, name)

    dims = llava_model.manifest.model
    d = dm.make_decoder(FakeGPU("CUDAExecutionProvider", {"device_id": "1"}), dims, share_buffer=False)
    assert isinstance(d, dm.DeviceDecoder) and (d.device_type, d.device_id) == ("cuda", 1)
    d = dm.make_decoder(FakeGPU("TensorrtExecutionProvider", {}), dims, share_buffer=False)
    assert isinstance(d, dm.DeviceDecoder) and d.device_id == 0
    assert type(dm.make_decoder(decoders[0].session, dims, share_buffer=False)) is dm.Decoder


def test_pipeline_ask_twice_with_prefix_cache_matches_host_decoder(llava_model, decoders):
    """ask -> prefix cache (shared device cache) -> a follow-up question: same tokens as the CPU decoder."""
    from dataclasses import replace

    from skin_offline.runtime.pipeline import SkinVL

    rt = llava_model.runtime
    host_vl = SkinVL(replace(rt.bundle, decoder=decoders[0]), rt.tokenizer)
    dev_vl = SkinVL(replace(rt.bundle, decoder=decoders[1]), rt.tokenizer)
    img = random_image(12)
    for q in (QUESTION, "What colour is it?"):
        want = host_vl.ask(img, q, max_new_tokens=12)
        got = dev_vl.ask(img, q, max_new_tokens=12)
        assert got.token_ids == want.token_ids
    assert got.timings.prefix_cached
