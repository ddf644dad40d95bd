"""Read a SkinVL / LLaVA checkpoint folder lazily: layout detection, dims, one tensor at a time.

Weights are never materialised as a whole model: safetensors shards are memory-mapped and each tensor is
read (and upcast to fp32) only when the exporter asks for it, so export memory is bounded by the largest
tensor rather than the model. `.bin` shards are pickles and are only ever opened with
`torch.load(weights_only=True, mmap=True)` (no code from the checkpoint runs).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import names
from ..errors import CheckpointError
from ..manifest import PadMode, PreprocessConfig

# Prefixes under which each layout keeps its parts. Canonical names: text = Mistral names without the
# leading "model." ("layers.0.self_attn.q_proj.weight", "embed_tokens.weight", "norm.weight",
# "lm_head.weight"); vision = CLIPVisionModel names ("encoder.layers.0...."); projector = linear_1/linear_2.
_TEXT_PREFIXES = {
    "llava": ("model.",),
    "hf": ("model.language_model.",),
    "hf-old": ("language_model.model.",),
}
_LM_HEAD = {"llava": "lm_head.weight", "hf": "lm_head.weight", "hf-old": "language_model.lm_head.weight"}
_VISION_PREFIXES = {
    "llava": ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_tower."),
    "hf": ("model.vision_tower.vision_model.", "model.vision_tower."),
    "hf-old": ("vision_tower.vision_model.", "vision_tower."),
    "clip": ("vision_model.", ""),
}
_PROJECTOR = {
    "llava": {"linear_1": "model.mm_projector.0", "linear_2": "model.mm_projector.2"},
    "hf": {"linear_1": "model.multi_modal_projector.linear_1", "linear_2": "model.multi_modal_projector.linear_2"},
    "hf-old": {"linear_1": "multi_modal_projector.linear_1", "linear_2": "multi_modal_projector.linear_2"},
}


_NOT_WEIGHTS = ("non_lora_trainables.bin", "training_args.bin", "adapter_model.bin", "adapter_model.safetensors")


def _weight_files(folder: Path) -> list[Path]:
    """The shards to read: those an index names (safetensors preferred), else every weight file."""
    for index in (folder / "model.safetensors.index.json", folder / "pytorch_model.bin.index.json"):
        if index.is_file():
            weight_map = _read_json(index).get("weight_map") or {}
            files = [folder / n for n in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(
                    f"{index.name} names shards that are missing from {folder}: "
                    f"{', '.join(missing[:3])}; the download is incomplete"
                )
            if files:
                return files
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return [f for f in files if f.name not in _NOT_WEIGHTS]


class TensorStore:
    """name -> tensor over a folder's safetensors / .bin files (single file or sharded with index).

    With an index file (`*.index.json`) only the shards it names are read, and a missing shard is an error;
    without one every weight file in the folder is. Memory-mapped pages of a file count towards the
    process's RSS for as long as the file stays mapped, so a handle is dropped (unmapped) once
    RELEASE_BYTES have been read through it or reading moves on to another shard: the resident part of the
    checkpoint stays below RELEASE_BYTES + one tensor instead of growing to the whole 15 GB.
    """

    RELEASE_BYTES = 64 << 20

    def __init__(self, folder: Path, files: list[Path] | None = None):
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self._read: dict[Path, int] = {}
        self._last: Path | None = None
        if files is None:
            files = _weight_files(self.folder)
        if not files:
            found = sorted(p.name for p in self.folder.iterdir())[:12] if self.folder.is_dir() else []
            raise CheckpointError(
                f"no weights in {self.folder} (found: {', '.join(found) or 'nothing'}); expected *.safetensors "
                f"or pytorch_model*.bin shards"
            )
        self.files = files
        for f in files:
            for k in self._keys_of(f):
                self._where[k] = f
            self._release(f)

    def _handle(self, f: Path):
        if f not in self._open:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    self._open[f] = safe_open(str(f), framework="pt")
                except Exception as e:  # safetensors raises its own SafetensorError type
                    raise CheckpointError(f"cannot read {f}: {e}; re-download the checkpoint") from None
            else:
                try:
                    self._open[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # weights_only refuses anything but tensors: report, never execute
                    raise CheckpointError(f"cannot read {f} safely (weights_only): {str(e).splitlines()[0]}") from None
        return self._open[f]

    def _keys_of(self, f: Path) -> list[str]:
        return list(self._handle(f).keys())

    def _release(self, f: Path) -> None:
        self._open.pop(f, None)  # dropping the last reference unmaps the file
        self._read[f] = 0

    def _account(self, f: Path, nbytes: int) -> None:
        self._read[f] = self._read.get(f, 0) + nbytes
        if self._read[f] >= self.RELEASE_BYTES:
            self._release(f)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self):
        return self._where.keys()

    def get(self, name: str) -> torch.Tensor:
        """One tensor, upcast to fp32 (bf16/fp16 -> fp32 is exact)."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} missing from {self.folder}; the checkpoint is incomplete")
        f = self._where[name]
        if self._last is not None and self._last != f:
            self._release(self._last)
        self._last = f
        h = self._handle(f)
        t = h.get_tensor(name) if hasattr(h, "get_tensor") else h[name]
        out = t.to(torch.float32)
        if out.data_ptr() == t.data_ptr():  # fp32 in the file: copy so the result does not pin the mapping
            out = out.clone()
        del t, h
        self._account(f, out.numel() * out.element_size())
        return out

    def dtype(self, name: str) -> torch.dtype:
        h = self._handle(self._where[name])
        if hasattr(h, "get_slice"):
            return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}.get(
                h.get_slice(name).get_dtype(), torch.float32
            )
        return h[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        h = self._handle(self._where[name])
        return tuple(h.get_slice(name).get_shape()) if hasattr(h, "get_slice") else tuple(h[name].shape)

    def fingerprint(self) -> str:
        """sha256 over config, file names, sizes, and the first/last MiB of each weight file.

        Cheap (a full hash of 15 GB takes minutes) yet changes if any file is replaced or re-saved.
        """
        h = hashlib.sha256()
        for f in sorted(self.folder.glob("*.json")) + self.files:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}\n".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
        return h.hexdigest()


@dataclass
class VisionSpec:
    hidden: int
    layers: int
    heads: int
    mlp: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    select_layer: int  # LLaVA's mm_vision_select_layer (-2)

    @property
    def kept_layers(self) -> int:
        """Encoder layers needed for hidden_states[select_layer] (hidden_states has layers + 1 entries)."""
        n = self.layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
        if not 0 < n <= self.layers:
            raise CheckpointError(
                f"mm_vision_select_layer {self.select_layer} is out of range for {self.layers} layers"
            )
        return n

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextSpec:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    rms_norm_eps: float
    rope_theta: float
    max_context: int


@dataclass
class Checkpoint:
    folder: Path
    layout: str
    text: TextSpec
    vision: VisionSpec
    preprocess: PreprocessConfig
    store: TensorStore
    vision_store: TensorStore
    vision_prefix: str
    projector_names: dict[str, str]
    notes: dict = field(default_factory=dict)
    random_weights: bool = False  # config.json carries the factory's mark (names.CKPT_RANDOM_WEIGHTS)

    # --- canonical tensor access (fp32 torch tensors) ---
    def text_tensor(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight":
            return self.store.get(_LM_HEAD[self.layout])
        return self.store.get(_TEXT_PREFIXES[self.layout][0] + name)

    def projector_tensor(self, name: str) -> torch.Tensor:
        layer, kind = name.split(".")
        return self.store.get(f"{self.projector_names[layer]}.{kind}")

    def vision_tensor(self, name: str) -> torch.Tensor:
        return self.vision_store.get(self.vision_prefix + name)

    def vision_state_dict(self, kept_layers: int | None = None) -> dict[str, torch.Tensor]:
        """CLIPVisionModel-named tensors of the layers the features need (post_layernorm unused)."""
        return {short: self.vision_store.get(self.vision_prefix + short) for short in self.vision_names(kept_layers)}

    def vision_names(self, kept_layers: int | None = None) -> list[str]:
        keep = self.vision.kept_layers if kept_layers is None else kept_layers
        out = []
        for k in self.vision_store.keys():
            if not k.startswith(self.vision_prefix):
                continue
            short = k[len(self.vision_prefix) :]
            if short.startswith("encoder.layers.") and int(short.split(".")[2]) >= keep:
                continue
            if short.startswith(("post_layernorm", "head.")) or "position_ids" in short:
                continue
            out.append(short)
        return out

    def text_shape(self, name: str) -> tuple[int, ...]:
        return self.store.shape(
            _LM_HEAD[self.layout] if name == "lm_head.weight" else _TEXT_PREFIXES[self.layout][0] + name
        )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: a checkpoint folder needs config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def detect_layout(folder: Path, cfg: dict) -> str:
    arch = " ".join(cfg.get("architectures") or [])
    mt = cfg.get("model_type", "")
    if "mm_vision_tower" in cfg or mt in ("llava_mistral", "llava_llama") or "LlavaMistral" in arch:
        if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise CheckpointError(
                f"projector type {cfg.get('mm_projector_type')!r} is not supported (expected mlp2x_gelu)"
            )
        return "llava"
    if mt == "llava" and "text_config" in cfg and "vision_config" in cfg:
        store_keys = TensorStore(folder).keys()
        if any(k.startswith("model.language_model.") for k in store_keys):
            return "hf"
        if any(k.startswith("language_model.model.") for k in store_keys):
            return "hf-old"
        raise CheckpointError(f"{folder}: LlavaForConditionalGeneration config but no language_model.* weights")
    if (folder / "adapter_config.json").exists():
        raise CheckpointError(f"{folder} is a LoRA adapter; pass it with --lora and the base checkpoint with --base")
    hint = ""
    if mt in ("mistral", "llama") or "CausalLM" in arch:
        hint = " (a text-only language model: the vision tower and projector are missing)"
    elif mt in ("clip", "clip_vision_model"):
        hint = " (a CLIP checkpoint: pass it with --vision-tower next to the LLaVA checkpoint)"
    raise CheckpointError(
        f"{folder}: unrecognised checkpoint, found model_type={mt!r} architectures={arch!r}{hint}; expected a LLaVA "
        f"checkpoint (LlavaMistralForCausalLM, model_type llava_mistral with mm_* fields), a transformers "
        f"LlavaForConditionalGeneration, or a LoRA adapter via --base/--lora"
    )


def _vision_from_cfg(vc: dict, select_layer: int) -> VisionSpec:
    return VisionSpec(
        hidden=vc.get("hidden_size", 768),
        layers=vc.get("num_hidden_layers", 12),
        heads=vc.get("num_attention_heads", 12),
        mlp=vc.get("intermediate_size", 3072),
        image_size=vc.get("image_size", 224),
        patch_size=vc.get("patch_size", 32),
        layer_norm_eps=vc.get("layer_norm_eps", 1e-5),
        hidden_act=vc.get("hidden_act", "quick_gelu"),
        select_layer=select_layer,
    )


def _preprocess_from(folders: list[Path], image_size: int, mode: PadMode) -> PreprocessConfig:
    for f in folders:
        p = f / "preprocessor_config.json"
        if p.exists():
            pc = _read_json(p)
            size = pc.get("size", {})
            size = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
            crop = pc.get("crop_size", image_size)
            crop = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
            return PreprocessConfig(
                mode=mode,
                size=size,
                crop_size=crop,
                mean=tuple(pc.get("image_mean", PreprocessConfig.mean)),
                std=tuple(pc.get("image_std", PreprocessConfig.std)),
            )
    return PreprocessConfig(mode=mode, size=image_size, crop_size=image_size)


def _hub_cache_snapshots(name: str) -> list[Path]:
    """Snapshots of hub id `name` already in the local Hugging Face cache (LLaVA users often have CLIP there)."""
    if not name or name.count("/") != 1 or Path(name).is_absolute():
        return []
    import os

    hub = Path(
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    snaps = hub / ("models--" + name.replace("/", "--")) / "snapshots"
    return sorted(
        (p for p in snaps.glob("*") if (p / "config.json").exists()), key=lambda p: p.stat().st_mtime, reverse=True
    )


def _find_vision_tower(folder: Path, cfg: dict, override: Path | None, store: TensorStore):
    """The CLIP weights: --vision-tower, a local mm_vision_tower path, or a copy inside the checkpoint."""
    candidates = []
    if override is not None:
        candidates.append(Path(override))
    else:
        name = cfg.get("mm_vision_tower") or cfg.get("vision_tower") or ""
        for c in (Path(name), folder / name, folder / "vision_tower", *_hub_cache_snapshots(name)):
            if name and c.is_dir():
                candidates.append(c)
                break
    for c in candidates:
        if not (c / "config.json").exists():
            raise CheckpointError(f"vision tower folder {c} has no config.json (expected a CLIP checkpoint)")
        vcfg = _read_json(c / "config.json")
        vc = vcfg.get("vision_config", vcfg)
        vstore = TensorStore(c)
        prefix = next((p for p in _VISION_PREFIXES["clip"] if p + "embeddings.patch_embedding.weight" in vstore), None)
        if prefix is None:
            raise CheckpointError(
                f"{c} holds no CLIP vision weights (no vision_model.embeddings.patch_embedding.weight)"
            )
        return vc, vstore, prefix, c
    for prefix in _VISION_PREFIXES["llava"]:
        if prefix + "embeddings.patch_embedding.weight" in store:
            vc = cfg.get("vision_config")
            if vc is None:
                break
            return vc, store, prefix, folder
    raise CheckpointError(
        f"the CLIP vision tower {cfg.get('mm_vision_tower')!r} is not a local folder and the checkpoint holds no "
        f"copy; download it once (e.g. openai/clip-vit-large-patch14-336) and pass --vision-tower PATH"
    )


def open_checkpoint(folder: Path, vision_tower: Path | None = None, image_mode: PadMode | None = None) -> Checkpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            raise CheckpointError(f"{folder} is a LoRA adapter; export it with --base BASE_CHECKPOINT --lora {folder}")
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
        raise CheckpointError(
            f"{folder} has no config.json (found: {found}); expected a LLaVA or transformers Llava checkpoint folder"
        )
    cfg = _read_json(folder / "config.json")
    layout = detect_layout(folder, cfg)
    store = TensorStore(folder)
    if layout == "llava":
        tc = cfg
        vc, vstore, vprefix, vfolder = _find_vision_tower(folder, cfg, vision_tower, store)
        select = int(cfg.get("mm_vision_select_layer", -2))
        if cfg.get("mm_vision_select_feature", "patch") != "patch":
            raise CheckpointError("mm_vision_select_feature must be 'patch' (CLS dropped)")
        mode = image_mode or (PadMode.PAD if cfg.get("image_aspect_ratio", "pad") == "pad" else PadMode.CROP)
        pre_folders = [vfolder, folder]
        max_ctx = int(cfg.get("tokenizer_model_max_length") or 2048)
    else:
        tc = cfg["text_config"]
        vc = cfg["vision_config"]
        select = cfg.get("vision_feature_layer", -2)
        if not isinstance(select, int):
            raise CheckpointError(f"vision_feature_layer {select!r}: only a single layer is supported")
        if cfg.get("vision_feature_select_strategy", "default") != "default":
            raise CheckpointError("vision_feature_select_strategy must be 'default' (CLS dropped)")
        if vision_tower is not None:
            vc, vstore, vprefix, vfolder = _find_vision_tower(folder, cfg, vision_tower, store)
        else:
            vstore = store
            vprefix = next(
                (p for p in _VISION_PREFIXES[layout] if p + "embeddings.patch_embedding.weight" in store), None
            )
            if vprefix is None:
                raise CheckpointError(f"{folder}: no vision tower weights under {_VISION_PREFIXES[layout]}")
        # llava-hf processors crop; SkinVL was trained with pad, so pad stays the default
        mode = image_mode or PadMode.PAD
        pre_folders = [folder]
        max_ctx = 2048
    heads = tc.get("num_attention_heads", 32)
    hidden = tc.get("hidden_size", 4096)
    text = TextSpec(
        vocab=store.shape(_LM_HEAD[layout])[0],
        hidden=hidden,
        layers=tc.get("num_hidden_layers", 32),
        heads=heads,
        kv_heads=tc.get("num_key_value_heads", heads),
        head_dim=tc.get("head_dim") or hidden // heads,
        mlp=tc.get("intermediate_size", 14336),
        rms_norm_eps=tc.get("rms_norm_eps", 1e-5),
        rope_theta=float(tc.get("rope_theta") or (tc.get("rope_parameters") or {}).get("rope_theta", 1e4)),
        max_context=max_ctx,
    )
    if tc.get("sliding_window") not in (None, 0) and tc["sliding_window"] < text.max_context:
        raise CheckpointError(f"sliding_window {tc['sliding_window']} < context {text.max_context} is not supported")
    vision = _vision_from_cfg(vc, select)
    pre = _preprocess_from(pre_folders, vision.image_size, mode)
    return Checkpoint(
        folder=folder,
        layout=layout,
        text=text,
        vision=vision,
        preprocess=pre,
        store=store,
        vision_store=vstore,
        vision_prefix=vprefix,
        projector_names=_PROJECTOR[layout],
        random_weights=bool(cfg.get(names.CKPT_RANDOM_WEIGHTS, False)),
    )
