"""Parity of the exported bundle + NumPy runtime with transformers on the same random weights.

Tolerances (fp32 everywhere): onnxruntime's MLAS GEMMs and torch's kernels sum in different orders, so
each dot product of length K carries ~sqrt(K) * 6e-8 relative error; over a few layers that stays
below 1e-5 relative to the logit scale (~3 here). 1e-4 absolute leaves 10x headroom yet would catch
any real mistake (a wrong mask, RoPE or norm moves logits by >1e-2). Greedy tokens must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_verified, random_image, reference_embeds, reference_generate, reference_pixels
from decode_loop import embed_prompt

ATOL = 1e-4
QUESTIONS = [
    "What is this lesion?",
    "Describe the morphology, colour and border of the lesion in this dermoscopy image.",
    " leading space, digits 12345 and unicode: café naïve 皮膚",
]


@pytest.mark.parametrize("layout", ["llava", "hf", "hf-old"])
def test_image_features_match_transformers(models, layout):
    m = models[layout]
    pixels = reference_pixels(random_image(1), m.spec.image_size)
    ours = m.runtime.bundle.vision.encode(pixels)
    with torch.no_grad():
        ref = m.ref.model.get_image_features(pixel_values=torch.from_numpy(pixels))
        ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
        ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    ref = ref.reshape(ours.shape).numpy()
    assert np.abs(ours - ref).max() < ATOL


@pytest.mark.parametrize("layout", ["llava", "hf"])
def test_merged_embeddings_and_first_logits_match(models, layout):
    from skin_offline.runtime.prompt import build_prompt_ids

    m = models[layout]
    rt = m.runtime
    img = random_image(2, size=(50, 90))
    ids = build_prompt_ids(rt.tokenizer, QUESTIONS[0])
    pixels = rt.pixels(img)
    np.testing.assert_allclose(pixels, reference_pixels(img, m.spec.image_size), atol=1e-5)
    embeds = embed_prompt(rt, ids, rt.image_features(pixels))
    input_ids, ref_embeds = reference_embeds(m.ref, ids, pixels)
    with torch.no_grad():
        if ref_embeds is None:  # llava-hf: the model splices itself; compare its logits from input_ids
            out = m.ref(input_ids=input_ids, pixel_values=torch.from_numpy(pixels))
        else:
            out = m.ref(inputs_embeds=ref_embeds)
            assert np.abs(embeds - ref_embeds.numpy()).max() < ATOL
    ref_logits = out.logits.numpy()
    logits = rt.bundle.decoder.logits_all(embeds)
    assert logits.shape == ref_logits.shape
    assert np.abs(logits - ref_logits).max() < ATOL


@pytest.mark.parametrize("layout", ["llava", "hf", "hf-old"])
@pytest.mark.parametrize("case", range(3))
def test_greedy_tokens_identical_to_transformers(models, layout, case):
    from skin_offline.runtime.prompt import build_prompt_ids

    m = models[layout]
    rt = m.runtime
    img = random_image(10 + case, size=[(97, 61), (64, 128), (200, 200)][case])
    ans = rt.ask(img, QUESTIONS[case], max_new_tokens=32)
    ids = build_prompt_ids(rt.tokenizer, QUESTIONS[case])
    ref_tokens, ref_logits = reference_generate(m.ref, ids, reference_pixels(img, m.spec.image_size), 32)
    assert ans.token_ids == ref_tokens
    assert len(ans.token_ids) == 32 or ans.token_ids[-1] == 2


def test_step_logits_match_generate(llava_model):
    """Every decode step's logits (not only the argmax) agree with transformers' generate."""
    from skin_offline.runtime.prompt import build_prompt_ids
    from skin_offline.runtime.sampling import SamplingConfig, make_sampler

    from decode_loop import generate_step

    m = llava_model
    rt = m.runtime
    img = random_image(5)
    ids = build_prompt_ids(rt.tokenizer, QUESTIONS[1])
    pixels = reference_pixels(img, m.spec.image_size)
    embeds = embed_prompt(rt, ids, rt.bundle.vision.encode(pixels)[0])
    seen = []
    base = make_sampler(SamplingConfig())

    def recording(logits):
        seen.append(logits.copy())
        return base(logits)

    tokens = list(generate_step(rt.bundle.decoder, embeds, rt.bundle.embed, recording, 32, eos_id=2))
    ref_tokens, ref_logits = reference_generate(m.ref, ids, pixels, 32)
    assert tokens == ref_tokens
    assert np.abs(np.stack(seen) - ref_logits[: len(seen)]).max() < ATOL


def test_cached_decoding_equals_recomputation(llava_model):
    """Prefill + one-token cached steps give the logits of a full no-cache pass over the same sequence."""
    rt = llava_model.runtime
    dec = rt.bundle.decoder
    rng = np.random.default_rng(0)
    embeds = rt.bundle.embed(rng.integers(3, 32000, 20))[None]  # [1,20,H]
    full = dec.logits_all(embeds)[0]  # [20,V]
    logits, cache = dec.forward(embeds[:, :7], dec.empty_cache(), keep=7)
    steps = [logits[0]]
    for i in range(7, 20, 3):  # mixed chunk sizes: chunked prefill == one-shot as well
        logits, cache = dec.forward(embeds[:, i : i + 3], cache, keep=min(3, 20 - i))
        steps.append(logits[0])
    assert np.abs(np.concatenate(steps) - full).max() < ATOL
    assert cache.length == 20


def test_batch_with_left_padding_equals_single(llava_model):
    """A left-padded batch row gives the logits of the sequence run alone (mask + positions in the graph)."""
    dec = llava_model.runtime.bundle.decoder
    rng = np.random.default_rng(1)
    a = llava_model.runtime.bundle.embed(rng.integers(3, 32000, 9))
    b = llava_model.runtime.bundle.embed(rng.integers(3, 32000, 6))
    batch = np.stack([a, np.concatenate([np.zeros((3, a.shape[1]), np.float32), b])])  # [2,9,H]
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0
    logits = _forward_with_mask(dec, batch, dec.empty_cache(2), mask)
    assert np.abs(logits[0, -1] - dec.logits_all(a[None])[0, -1]).max() < ATOL
    assert np.abs(logits[1, -1] - dec.logits_all(b[None])[0, -1]).max() < ATOL


def _forward_with_mask(dec, embeds, cache, mask):
    from skin_offline import names

    b, s, _ = embeds.shape
    positions = (np.cumsum(mask, axis=1) - 1).clip(min=0)
    feed = {
        names.INPUTS_EMBEDS: embeds,
        names.ATTENTION_MASK: mask,
        names.POSITION_IDS: positions,
        names.NUM_LOGITS_TO_KEEP: np.array(1, np.int64),
    }
    for i in range(dec.dims.num_layers):
        feed[names.past_key(i)] = cache.keys[i]
        feed[names.past_value(i)] = cache.values[i]
    return dec.session.run([names.LOGITS], feed)[0]


def test_export_verification_recorded(llava_model):
    assert_verified(llava_model.manifest, ATOL)
