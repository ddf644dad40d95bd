"""Shared fixtures: random-weight SkinVL checkpoints in every layout, their bundles, and the
transformers reference (the same weights in a LlavaForConditionalGeneration)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skin_offline.export.tokenizer import find_mistral_tokenizer_model

IMAGE_TOKEN = 32000  # llava-hf's <image> id


@pytest.fixture(scope="session")
def tokenizer_model() -> Path:
    return find_mistral_tokenizer_model()


class Model:
    """A checkpoint written in one layout + its exported bundle + the transformers reference."""

    def __init__(self, root: Path, layout: str, seed: int = 0, **export_kw):
        from skin_offline.export.factory import PRESETS, build_reference, write_checkpoint
        from skin_offline.export.to_onnx import export_bundle

        self.spec = PRESETS["tiny"]
        self.layout = layout
        self.ref = build_reference(self.spec, seed=seed, padded_vocab=layout != "llava")
        self.ckpt = write_checkpoint(
            self.ref, self.spec, root / f"ckpt-{layout}", layout, find_mistral_tokenizer_model()
        )
        self.bundle_dir = root / f"bundle-{layout}"
        self.manifest = export_bundle(self.ckpt, self.bundle_dir, log=lambda m: None, **export_kw)
        self._model = None

    @property
    def runtime(self):
        if self._model is None:
            from skin_offline.runtime.pipeline import SkinVL

            self._model = SkinVL.load(self.bundle_dir, threads=1)
        return self._model


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Model]:
    root = tmp_path_factory.mktemp("models")
    return {layout: Model(root, layout) for layout in ("llava", "hf", "hf-old")}


@pytest.fixture(scope="session")
def llava_model(models) -> Model:
    return models["llava"]


def random_image(seed: int, size=(97, 61), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def expand2square(pil_img, background_color):
    """LLaVA's expand2square (llava/mm_utils.py), the reference for pad mode."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def reference_pixels(image: Image.Image, size: int, pad: bool = True) -> np.ndarray:
    """LLaVA's process_images: expand2square with the mean colour, then CLIPImageProcessor."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    image = image.convert("RGB")
    if pad:
        image = expand2square(image, tuple(int(x * 255) for x in proc.image_mean))
    return np.asarray(proc(images=image, return_tensors="np")["pixel_values"], dtype=np.float32)


def reference_embeds(ref, ids: list[int], pixels: np.ndarray):
    """transformers' own splice (get_image_features + masked_scatter) -> [1, S, H] torch tensor."""
    import torch

    n = ref.config.image_seq_length
    expanded = []
    for t in ids:
        expanded += [IMAGE_TOKEN] * n if t == -200 else [t]
    input_ids = torch.tensor([expanded])
    with torch.no_grad():
        if IMAGE_TOKEN < ref.config.text_config.vocab_size:
            # llava-hf layout: the reference path is the model's own forward from input_ids
            return input_ids, None
        embeds = ref.get_input_embeddings()(input_ids.clamp(max=IMAGE_TOKEN - 1))
        feats = ref.model.get_image_features(pixel_values=torch.from_numpy(pixels))
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        mask = (input_ids == IMAGE_TOKEN)[..., None].expand_as(embeds)
        return input_ids, embeds.masked_scatter(mask, feats.reshape(-1, embeds.shape[-1]))


def reference_generate(ref, ids: list[int], pixels: np.ndarray, max_new_tokens: int):
    """Greedy tokens + per-step logits from transformers' generate()."""
    import torch

    input_ids, embeds = reference_embeds(ref, ids, pixels)
    kw = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=2,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        if embeds is None:
            out = ref.generate(
                input_ids=input_ids,
                pixel_values=torch.from_numpy(pixels),
                attention_mask=torch.ones_like(input_ids),
                **kw,
            )
            tokens = out.sequences[0, input_ids.shape[1] :].tolist()
        else:
            out = ref.generate(
                inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), **kw
            )
            tokens = out.sequences[0].tolist()
            tokens = tokens[-len(out.logits) :]
    return tokens, np.stack([lg[0].numpy() for lg in out.logits])


def decoder_greedy_vs_reference(decoder, model, question: str, image_seed: int, n: int):
    """Greedy-decode `question` about random_image(image_seed) through `decoder` (the runtime's generate_step)
    and through transformers: (tokens, reference tokens, max |step logits - reference logits|)."""
    from skin_offline.runtime.prompt import build_prompt_ids
    from skin_offline.runtime.sampling import SamplingConfig, make_sampler

    from decode_loop import embed_prompt, generate_step

    rt = model.runtime
    ids = build_prompt_ids(rt.tokenizer, question)
    pixels = reference_pixels(random_image(image_seed), model.spec.image_size)
    embeds = embed_prompt(rt, ids, rt.bundle.vision.encode(pixels)[0])
    seen, base = [], make_sampler(SamplingConfig())

    def recording(logits):
        seen.append(logits.copy())
        return base(logits)

    tokens = list(generate_step(decoder, embeds, rt.bundle.embed, recording, n, eos_id=2))
    ref_tokens, ref_logits = reference_generate(model.ref, ids, pixels, n)
    return tokens, ref_tokens, float(np.abs(np.stack(seen) - ref_logits[: len(seen)]).max())


def assert_verified(manifest, bound: float = 1e-4) -> dict:
    """The export's verification ran on every graph of the bundle, layer by layer, and passed within `bound`."""
    from skin_offline import names

    v = manifest.verification
    assert v["passed"] and not v["failures"], v
    graphs = v["graphs"]
    for g in manifest.variants(names.ROLE_DECODER):
        d = graphs[g.file]
        assert d["layers_checked"] == manifest.model.num_layers, (g.file, d)
        assert d["max_layer_rel_diff"] < bound and d["head_rel_diff"] < bound, (g.file, d)
        assert d["weights_checked"] > 0 or g.flavor.value == "contrib", (g.file, d)  # contrib shares the standard's
    for g in manifest.variants(names.ROLE_VISION):
        assert graphs[g.file]["max_abs_diff_rel"] < bound or graphs[g.file]["feature_cosine"] > 0.99, (
            g.file,
            graphs[g.file],
        )
    for g in manifest.variants(names.ROLE_EMBEDDINGS):
        assert graphs[g.file]["values_checked"] == manifest.model.vocab_size * manifest.model.hidden_size
    return v
