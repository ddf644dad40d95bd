"""Deterministic random-weight checkpoints of the exact SkinVL architecture (tests, demo, benchmarks).

No weights can be downloaded here, so every test builds a model of the real architecture (CLIP vision
tower, select layer -2, CLS dropped, mlp2x_gelu projector, Mistral decoder with GQA, rope_theta 1e6)
with small random weights, plus the real Mistral tokenizer, and writes it in the layouts users bring:

- ``llava``: the original LLaVA / LLaVA-Med layout SkinVL ships (``LlavaMistralForCausalLM``,
  ``model.mm_projector.0/2``, CLIP tower in its own folder named by ``mm_vision_tower``);
- ``hf``: transformers' ``LlavaForConditionalGeneration`` (new key nesting under ``model.``),
  with ``<image>``=32000 / ``<pad>``=32001 added and the vocabulary padded to a multiple of 64;
- ``hf-old``: the same with the older key nesting (``language_model.model.*``, ``vision_tower.vision_model.*``).

The reference model (a transformers ``LlavaForConditionalGeneration``) is returned alongside, so
parity tests compare the exported bundle with exactly the weights that were written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import names
from .choices import DemoLayout, DemoPreset

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LAYOUTS = tuple(layout.value for layout in DemoLayout)
# Every checkpoint this factory writes says so in its config.json (names.CKPT_RANDOM_WEIGHTS)
RANDOM_WEIGHTS_KEY = names.CKPT_RANDOM_WEIGHTS


@dataclass(frozen=True)
class ModelSpec:
    # vision tower (CLIP)
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    vision_mlp: int = 64
    image_size: int = 56
    patch_size: int = 14
    # language model (Mistral)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 128
    vocab: int = 32000
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_context: int = 2048
    # a wider init than HF's 0.02 keeps random logits well separated, so greedy ties are rare
    init_std: float = 0.08


PRESETS = {
    DemoPreset.TINY.value: ModelSpec(),
    # exact SkinVL widths (CLIP ViT-L/14-336 in full, Mistral-7B widths) with a few decoder layers
    DemoPreset.BENCH.value: ModelSpec(
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        vision_mlp=4096,
        image_size=336,
        hidden=4096,
        layers=4,
        heads=32,
        kv_heads=8,
        mlp=14336,
        init_std=0.02,
    ),
}


def preset(name: str, **overrides) -> ModelSpec:
    return replace(PRESETS[name], **overrides)


def _hf_config(spec: ModelSpec, vocab: int):
    from transformers import CLIPVisionConfig, LlavaConfig, MistralConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.hidden,
        hidden_act="quick_gelu",
    )
    text = MistralConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.mlp,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=32768,
        sliding_window=None,
        tie_word_embeddings=False,
        initializer_range=spec.init_std,
        bos_token_id=1,
        eos_token_id=2,
    )
    n_img = (spec.image_size // spec.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=n_img,
        tie_word_embeddings=False,
    )


def build_reference(spec: ModelSpec, seed: int = 0, padded_vocab: bool = False):
    """A transformers LlavaForConditionalGeneration with deterministic random weights (fp32, eval mode)."""
    from transformers import LlavaForConditionalGeneration

    vocab = spec.vocab
    if padded_vocab:  # llava-hf adds <image>, <pad> and pads to a multiple of 64
        vocab = ((spec.vocab + 2 + 63) // 64) * 64
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(_hf_config(spec, vocab)).eval()
    with torch.no_grad():  # HF's init is already seeded; widen the LM's weights for separated logits
        for name, p in model.named_parameters():
            if "language_model" in name and p.dim() == 2:
                p.normal_(0.0, spec.init_std)
            elif "norm" in name and "language_model" in name:
                p.uniform_(0.5, 1.5)  # non-trivial RMSNorm weights so a missing norm would show
            elif "multi_modal_projector" in name and name.endswith("bias"):
                p.normal_(0.0, 0.02)
        model.lm_head.weight.normal_(0.0, spec.init_std)
    return model


def _canonical_state(model) -> dict[str, dict[str, torch.Tensor]]:
    """Split the HF state dict into vision / projector / text parts with short canonical names."""
    parts = {"vision": {}, "projector": {}, "text": {}}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous()
        if k.startswith("model.vision_tower."):
            parts["vision"][k[len("model.vision_tower.") :]] = v
        elif k.startswith("model.multi_modal_projector."):
            parts["projector"][k[len("model.multi_modal_projector.") :]] = v
        elif k.startswith("model.language_model."):
            parts["text"]["model." + k[len("model.language_model.") :]] = v
        elif k == "lm_head.weight":
            parts["text"]["lm_head.weight"] = v
        else:
            raise AssertionError(f"unexpected key {k}")
    return parts


def save_tensors(
    tensors: dict[str, torch.Tensor],
    folder: Path,
    shards: int = 1,
    fmt: str = "safetensors",
    dtype: torch.dtype | None = None,
) -> None:
    """Write tensors as one file or `shards` files plus the HF index file (safetensors or .bin)."""
    from safetensors.torch import save_file

    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    keys = list(tensors)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"

    def write(part: dict, path: Path):
        if fmt == "safetensors":
            save_file(part, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, path)

    if shards <= 1:
        write(tensors, folder / f"{stem}.{ext}")
        return
    weight_map, total = {}, 0
    per = (len(keys) + shards - 1) // shards
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: tensors[k] for k in keys[i * per : (i + 1) * per]}
        write(part, folder / name)
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def _write_tokenizer(folder: Path, tokenizer_model: Path, hf_added: bool) -> None:
    shutil.copyfile(tokenizer_model, folder / "tokenizer.model")
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": True,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "model_max_length": 2048,
        "padding_side": "right",
    }
    if hf_added:
        cfg["pad_token"] = "<pad>"
        cfg["added_tokens_decoder"] = {
            "32000": {
                "content": "<image>",
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            },
            "32001": {
                "content": "<pad>",
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            },
        }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def _write_clip_tower(folder: Path, spec: ModelSpec, vision: dict[str, torch.Tensor], dtype) -> None:
    """A CLIP checkpoint folder laid out like openai/clip-vit-large-patch14-336 (vision half only)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": spec.hidden,
        "vision_config": {
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_mlp,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "model_type": "clip_vision_model",
        },
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    pre = {
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": {"shortest_edge": spec.image_size},
        "image_processor_type": "CLIPImageProcessor",
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    save_tensors({"vision_model." + k: v for k, v in vision.items()}, folder, dtype=dtype)


def _llava_config(spec: ModelSpec, vocab: int, tower: str, dtype: torch.dtype | None) -> dict:
    """config.json of the original LLaVA layout (LlavaMistralForCausalLM, as SkinVL ships it)."""
    return {
        "architectures": ["LlavaMistralForCausalLM"],
        "model_type": "llava_mistral",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.mlp,
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "vocab_size": vocab,
        "max_position_embeddings": 32768,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "mm_vision_tower": tower,
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": spec.vision_hidden,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tokenizer_model_max_length": spec.max_context,
        "torch_dtype": "float32" if dtype is None else str(dtype).split(".")[-1],
        RANDOM_WEIGHTS_KEY: True,
    }


def write_checkpoint(
    model,
    spec: ModelSpec,
    out: Path,
    layout: str,
    tokenizer_model: Path,
    *,
    shards: int = 1,
    fmt: str = "safetensors",
    dtype: torch.dtype | None = None,
    vision_tower: Path | None = None,
    vision_tower_name: str | None = None,
) -> Path:
    """Write `model` (from build_reference) to `out` in `layout`. Returns `out`.

    For the llava layout the CLIP tower goes to `vision_tower` (default: `out`/../<out.name>-clip) and
    config.json names it by absolute path unless `vision_tower_name` (e.g. a hub id) is given.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = _canonical_state(model)
    text_cfg = model.config.text_config
    if layout == "llava":
        tower = Path(vision_tower or out.parent / f"{out.name}-clip").resolve()
        _write_clip_tower(tower, spec, parts["vision"], dtype)
        tensors = dict(parts["text"])
        tensors["model.mm_projector.0.weight"] = parts["projector"]["linear_1.weight"]
        tensors["model.mm_projector.0.bias"] = parts["projector"]["linear_1.bias"]
        tensors["model.mm_projector.2.weight"] = parts["projector"]["linear_2.weight"]
        tensors["model.mm_projector.2.bias"] = parts["projector"]["linear_2.bias"]
        cfg = _llava_config(spec, text_cfg.vocab_size, vision_tower_name or str(tower), dtype)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    else:
        if layout == "hf":
            tensors = {"model.vision_tower." + k: v for k, v in parts["vision"].items()}
            tensors.update({"model.multi_modal_projector." + k: v for k, v in parts["projector"].items()})
            tensors.update(
                {
                    ("model.language_model." + k[len("model.") :] if k.startswith("model.") else k): v
                    for k, v in parts["text"].items()
                }
            )
        else:  # hf-old: transformers < 4.52 nesting
            tensors = {"vision_tower.vision_model." + k: v for k, v in parts["vision"].items()}
            tensors.update({"multi_modal_projector." + k: v for k, v in parts["projector"].items()})
            tensors.update({"language_model." + k: v for k, v in parts["text"].items()})
        cfg = model.config.to_dict()
        cfg["architectures"] = ["LlavaForConditionalGeneration"]
        cfg[RANDOM_WEIGHTS_KEY] = True
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        pre = {
            "crop_size": {"height": spec.image_size, "width": spec.image_size},
            "do_center_crop": True,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "resample": 3,
            "size": {"shortest_edge": spec.image_size},
            "image_processor_type": "CLIPImageProcessor",
        }
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    save_tensors(tensors, out, shards=shards, fmt=fmt, dtype=dtype)
    _write_tokenizer(out, tokenizer_model, hf_added=layout != "llava")
    return out


def make_checkpoint(out: Path, layout: str = "llava", preset_name: str = "tiny", seed: int = 0, **kw):
    """Build + write in one go. Returns (reference model, spec)."""
    from .tokenizer import find_mistral_tokenizer_model

    spec = PRESETS[preset_name]
    model = build_reference(spec, seed=seed, padded_vocab=layout != "llava")
    write_checkpoint(model, spec, Path(out), layout, find_mistral_tokenizer_model(), **kw)
    return model, spec


# --- LoRA training output (MM-Skin's finetune_lora.sh): PEFT adapter + non_lora_trainables.bin ---
LORA_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def write_lora_adapter(
    model,
    spec: ModelSpec,
    out: Path,
    *,
    r: int = 8,
    alpha: float = 16.0,
    seed: int = 1,
    fmt: str = "safetensors",
    with_non_lora: bool = True,
    std: float = 0.05,
):
    """Write a PEFT LoRA adapter for a llava-layout base made from `model` (+ a retrained projector in
    non_lora_trainables.bin, keyed as LLaVA saves it). Returns the merged reference model: a copy of
    `model` with W + (alpha/r) * B @ A on every target and the new projector, computed with plain torch.
    """
    import copy

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    merged = copy.deepcopy(model)
    lm = merged.model.language_model
    scale = alpha / r
    adapter = {}
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            for target in LORA_TARGETS:
                lin = layer.get_submodule(target)
                a = torch.randn(r, lin.in_features, generator=gen) * std  # [r,in]
                b = torch.randn(lin.out_features, r, generator=gen) * std  # [out,r] (non-zero: a trained adapter)
                key = f"base_model.model.model.layers.{i}.{target}"
                adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"] = a, b
                lin.weight.copy_(lin.weight + scale * (b @ a))
        proj = merged.model.multi_modal_projector
        non_lora = {}
        for idx, lin in (("0", proj.linear_1), ("2", proj.linear_2)):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.05)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.02)
            non_lora[f"base_model.model.model.mm_projector.{idx}.weight"] = lin.weight.detach().clone()
            non_lora[f"base_model.model.model.mm_projector.{idx}.bias"] = lin.bias.detach().clone()
    if fmt == "safetensors":
        save_file(adapter, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(adapter, out / "adapter_model.bin")
    if with_non_lora:
        torch.save(non_lora, out / "non_lora_trainables.bin")
    _write_adapter_config(out, r, alpha)
    return merged


def _write_adapter_config(out: Path, r: int, alpha: float) -> None:
    """PEFT's adapter_config.json as MM-Skin's finetune_lora.sh leaves it."""
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "target_modules": sorted({t.split(".")[1] for t in LORA_TARGETS}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "base_model_name_or_path": "llava-med-v1.5-mistral-7b",
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


# --- full-size random checkpoints, streamed straight to disk ---
# Exact SkinVL shapes: CLIP ViT-L/14-336 + Mistral-7B (32 layers). Never built as a torch model (29 GB fp32).
FULL_SPEC = replace(PRESETS["bench"], layers=32)
_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def llava_tensor_shapes(spec: ModelSpec, vocab: int | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a llava-layout checkpoint's tensors (LlavaMistralForCausalLM order)."""
    H, D, V = spec.hidden, spec.hidden // spec.heads, vocab or spec.vocab
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (spec.heads * D, H),
                p + "self_attn.k_proj.weight": (spec.kv_heads * D, H),
                p + "self_attn.v_proj.weight": (spec.kv_heads * D, H),
                p + "self_attn.o_proj.weight": (H, spec.heads * D),
                p + "mlp.gate_proj.weight": (spec.mlp, H),
                p + "mlp.up_proj.weight": (spec.mlp, H),
                p + "mlp.down_proj.weight": (H, spec.mlp),
                p + "input_layernorm.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
            }
        )
    shapes.update(
        {
            "model.norm.weight": (H,),
            "lm_head.weight": (V, H),
            "model.mm_projector.0.weight": (H, spec.vision_hidden),
            "model.mm_projector.0.bias": (H,),
            "model.mm_projector.2.weight": (H, H),
            "model.mm_projector.2.bias": (H,),
        }
    )
    return shapes


def clip_tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a CLIP checkpoint's vision half (`vision_model.*`)."""
    Hv, M = spec.vision_hidden, spec.vision_mlp
    n_pos = (spec.image_size // spec.patch_size) ** 2 + 1
    p = "vision_model."
    shapes = {
        p + "embeddings.class_embedding": (Hv,),
        p + "embeddings.patch_embedding.weight": (Hv, 3, spec.patch_size, spec.patch_size),
        p + "embeddings.position_embedding.weight": (n_pos, Hv),
        p + "pre_layrnorm.weight": (Hv,),
        p + "pre_layrnorm.bias": (Hv,),
    }
    for i in range(spec.vision_layers):
        q = f"{p}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[q + f"self_attn.{proj}.weight"], shapes[q + f"self_attn.{proj}.bias"] = (Hv, Hv), (Hv,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[q + f"{ln}.weight"], shapes[q + f"{ln}.bias"] = (Hv,), (Hv,)
        shapes.update(
            {
                q + "mlp.fc1.weight": (M, Hv),
                q + "mlp.fc1.bias": (M,),
                q + "mlp.fc2.weight": (Hv, M),
                q + "mlp.fc2.bias": (Hv,),
            }
        )
    shapes.update({p + "post_layernorm.weight": (Hv,), p + "post_layernorm.bias": (Hv,)})
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], std: float, gen: torch.Generator, dtype) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name:  # RMSNorm / LayerNorm scales near 1 keep activations in range
        return torch.empty(shape).uniform_(0.8, 1.2, generator=gen).to(dtype)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)


def stream_safetensors(
    shapes: dict[str, tuple[int, ...]],
    folder: Path,
    make,
    *,
    dtype=torch.bfloat16,
    shard_bytes: int = 4 << 30,
    stem: str = "model",
    progress=None,
) -> list[Path]:
    """Write tensors produced one at a time by `make(name, shape)` into safetensors shards (+ index).

    Hand-written writer: safetensors' save_file wants every tensor of a shard in memory at once; the format
    (8-byte header length, JSON header with offsets, raw little-endian bytes) lets us write the header first
    and then each tensor as it is made, so memory stays at one tensor.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, cur, size = [], [], 0
    for name, shape in shapes.items():
        n = itemsize * int(torch.Size(shape).numel())
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    shards.append(cur)
    files, weight_map, total = [], {}, 0
    for s, names_ in enumerate(shards):
        fname = f"{stem}.safetensors" if len(shards) == 1 else f"{stem}-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name in names_:
            n = itemsize * int(torch.Size(shapes[name]).numel())
            header[name] = {
                "dtype": _SAFETENSORS_DTYPE[dtype],
                "shape": list(shapes[name]),
                "data_offsets": [off, off + n],
            }
            off += n
            weight_map[name] = fname
        total += off
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            for name in names_:
                t = make(name, shapes[name]).to(dtype).contiguous()
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
                if progress:
                    progress(t.numel() * itemsize)
                del t
        files.append(folder / fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


def write_streaming_checkpoint(
    out: Path,
    spec: ModelSpec,
    tokenizer_model: Path,
    *,
    dtype=torch.bfloat16,
    seed: int = 0,
    shard_bytes: int = 4 << 30,
    tokenizer: str = "model",
    vision_tower: Path | None = None,
    progress=None,
) -> Path:
    """A random-weight llava-layout checkpoint of any size, one tensor in memory at a time.

    `tokenizer`: "model" (tokenizer.model, as SkinVL ships), "json" (only a tokenizer.json, as some
    conversions ship) or "both".
    """
    from .tokenizer import sentencepiece_to_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tower = Path(vision_tower or out.parent / f"{out.name}-clip").resolve()
    tower.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def make(name, shape):
        return _random_tensor(name, shape, spec.init_std, gen, torch.float32)

    # CLIP tower folder: config + preprocessor as openai/clip-vit-large-patch14-336, weights streamed
    _write_clip_tower(tower, spec, {}, None)
    (tower / "model.safetensors").unlink()
    stream_safetensors(clip_tensor_shapes(spec), tower, make, dtype=dtype, shard_bytes=shard_bytes, progress=progress)
    (out / "config.json").write_text(json.dumps(_llava_config(spec, spec.vocab, str(tower), dtype), indent=2))
    stream_safetensors(llava_tensor_shapes(spec), out, make, dtype=dtype, shard_bytes=shard_bytes, progress=progress)
    _write_tokenizer(out, tokenizer_model, hf_added=False)
    if tokenizer in ("json", "both"):
        sentencepiece_to_tokenizer(tokenizer_model).save(str(out / "tokenizer.json"))
    if tokenizer == "json":
        (out / "tokenizer.model").unlink()
    return out


def checkpoint_bytes(spec: ModelSpec, dtype=torch.bfloat16) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    shapes = {**llava_tensor_shapes(spec), **clip_tensor_shapes(spec)}
    return itemsize * sum(int(torch.Size(s).numel()) for s in shapes.values())


def write_streaming_lora_adapter(
    out: Path,
    spec: ModelSpec,
    *,
    r: int = 128,
    alpha: float = 64.0,
    dtype=torch.bfloat16,
    seed: int = 1,
    std: float = 0.01,
    progress=None,
) -> Path:
    """An MM-Skin-shaped LoRA output (r=128, alpha=64 on every LLM linear + non_lora_trainables.bin with the
    projector) for a llava-layout base of `spec`, written one tensor at a time (~0.75 GB at 7B)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = llava_tensor_shapes(spec)
    shapes = {}
    for i in range(spec.layers):
        for target in LORA_TARGETS:
            n_out, n_in = base[f"model.layers.{i}.{target}.weight"]
            key = f"base_model.model.model.layers.{i}.{target}"
            shapes[f"{key}.lora_A.weight"], shapes[f"{key}.lora_B.weight"] = (r, n_in), (n_out, r)
    gen = torch.Generator().manual_seed(seed)
    stream_safetensors(
        shapes,
        out,
        lambda name, shape: _random_tensor(name, shape, std, gen, torch.float32),
        dtype=dtype,
        shard_bytes=1 << 40,
        stem="adapter_model",
        progress=progress,
    )
    non_lora = {
        f"base_model.model.{k}": _random_tensor(k, s, spec.init_std, gen, torch.float32)
        for k, s in base.items()
        if k.startswith("model.mm_projector.")
    }
    torch.save(non_lora, out / "non_lora_trainables.bin")
    _write_adapter_config(out, r, alpha)
    return out
