"""A PEFT LoRA adapter + `non_lora_trainables.bin` over a base checkpoint, merged lazily, one tensor at a time.

MM-Skin trains SkinVL with LLaVA's `finetune_lora.sh`: a PEFT adapter on every LLM linear layer (r=128,
alpha=64) plus the fully trained projector saved apart in `non_lora_trainables.bin`. A merged weight is
    W' = W + scale * B @ A        # W [out,in], B [out,r], A [r,in]; scale = alpha/r (alpha/sqrt(r) with rsLoRA)
computed in fp32 when the exporter asks for W, so the merge never holds more than one layer's tensor.
Hand-written rather than via peft: peft's merge_and_unload needs the whole model built in torch (29 GB
fp32 at 7B), and the formula above is all it does for a plain Linear LoRA.

MM-Skin's own merge_lora_weights.py never loads non_lora_trainables.bin (so its merges carry the base
model's projector); here the trained projector replaces the base one, and the manifest records which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..manifest import PadMode
from .checkpoint import Checkpoint, TensorStore, _read_json, open_checkpoint

NON_LORA = "non_lora_trainables.bin"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @classmethod
    def from_file(cls, path: Path) -> "LoraConfig":
        cfg = _read_json(path)
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (expected LORA)")
        if cfg.get("fan_in_fan_out"):
            raise CheckpointError(f"{path}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{path}: DoRA adapters are not supported; merge it with peft first")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise CheckpointError(f"{path}: per-module rank_pattern/alpha_pattern is not supported")
        try:
            return cls(
                r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])), rslora=bool(cfg.get("use_rslora"))
            )
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} has no valid LoRA rank 'r'; is this a PEFT adapter_config.json?") from None


def _strip_peft(key: str) -> str:
    """PEFT's `base_model.model.<name>` -> `<name>` (the base checkpoint's own key)."""
    return key[len("base_model.model.") :] if key.startswith("base_model.model.") else key


def _non_lora_key(key: str, base: TensorStore) -> str:
    """A non_lora_trainables.bin key -> the base key it replaces (LLaVA saves it with PEFT's prefixes)."""
    k = _strip_peft(key)
    for cand in (k, k[len("model.") :] if k.startswith("model.model.") else None):
        if cand and cand in base:
            return cand
    raise CheckpointError(
        f"{NON_LORA} holds {key!r}, which matches no tensor of the base checkpoint; "
        f"is --base the model the adapter was trained on?"
    )


class MergedStore:
    """The TensorStore interface over base + LoRA deltas + non-LoRA overrides (all lazily read)."""

    def __init__(self, base: TensorStore, adapter: TensorStore, config: LoraConfig, overrides: TensorStore | None):
        self.base, self.adapter, self.config, self.overrides = base, adapter, config, overrides
        self.folder = base.folder
        self.files = base.files
        self._lora: dict[str, tuple[str, str]] = {}  # base weight key -> (A key, B key)
        for k in adapter.keys():
            if not k.endswith(".weight"):
                raise CheckpointError(f"adapter tensor {k!r}: LoRA biases (bias='lora_only'/'all') are not supported")
            if ".lora_A." not in k:
                if ".lora_B." not in k and "lora_embedding" not in k:
                    raise CheckpointError(
                        f"adapter tensor {k!r} is not a LoRA A/B matrix (modules_to_save "
                        f"are not supported); merge that module into the base first"
                    )
                if "lora_embedding" in k:
                    raise CheckpointError(f"adapter tensor {k!r}: LoRA on embeddings is not supported")
                continue
            module = _strip_peft(k.split(".lora_A.")[0])
            b_key = k.replace(".lora_A.", ".lora_B.")
            if b_key not in adapter:
                raise CheckpointError(f"adapter has {k} without its lora_B; the adapter file is incomplete")
            target = module + ".weight"
            if target not in base:
                raise CheckpointError(
                    f"LoRA targets {module!r}, which the base checkpoint does not have; is --base "
                    f"the model the adapter was trained on?"
                )
            self._lora[target] = (k, b_key)
        if not self._lora:
            raise CheckpointError(f"{adapter.folder}: the adapter holds no lora_A/lora_B tensors")
        self._override: dict[str, str] = {}
        if overrides is not None:
            self._override = {_non_lora_key(k, base): k for k in overrides.keys()}

    @property
    def lora_targets(self) -> int:
        return len(self._lora)

    @property
    def overridden(self) -> list[str]:
        return sorted(self._override)

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def keys(self):
        return self.base.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        if name in self._override:
            t = self.overrides.get(self._override[name])
            if tuple(t.shape) != self.base.shape(name):
                raise CheckpointError(
                    f"{NON_LORA}: {name} has shape {tuple(t.shape)}, the base has "
                    f"{self.base.shape(name)}; the files are from different models"
                )
            return t
        w = self.base.get(name)  # [out,in]
        if name in self._lora:
            a_key, b_key = self._lora[name]
            a, b = self.adapter.get(a_key), self.adapter.get(b_key)  # [r,in], [out,r]
            if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
                raise CheckpointError(
                    f"LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit {name} "
                    f"{tuple(w.shape)}; the adapter is for another base model"
                )
            w += self.config.scale * (b @ a)
        return w

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.base.fingerprint().encode())
        h.update(self.adapter.fingerprint().encode())
        if self.overrides is not None:
            h.update(self.overrides.fingerprint().encode())
        return h.hexdigest()


def open_lora_checkpoint(
    base: Path, adapter: Path, vision_tower: Path | None = None, image_mode: PadMode | None = None
) -> Checkpoint:
    """Base checkpoint + PEFT adapter folder (+ its non_lora_trainables.bin) -> a merged, lazy Checkpoint."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        found = ", ".join(sorted(p.name for p in adapter.iterdir())[:12]) if adapter.is_dir() else "nothing"
        raise CheckpointError(
            f"--lora {adapter}: no adapter_config.json (found: {found}); expected a PEFT LoRA "
            f"output folder with adapter_config.json and adapter_model.safetensors"
        )
    weights = [adapter / f for f in ADAPTER_FILES if (adapter / f).is_file()][:1]
    if not weights:
        raise CheckpointError(f"--lora {adapter}: no {' or '.join(ADAPTER_FILES)}; the adapter folder is incomplete")
    ckpt = open_checkpoint(base, vision_tower=vision_tower, image_mode=image_mode)
    config = LoraConfig.from_file(adapter / "adapter_config.json")
    non_lora = adapter / NON_LORA
    overrides = TensorStore(adapter, files=[non_lora]) if non_lora.is_file() else None
    store = MergedStore(ckpt.store, TensorStore(adapter, files=weights), config, overrides)
    projector_keys = {f"{p}.{kind}" for p in ckpt.projector_names.values() for kind in ("weight", "bias")}
    if overrides is None:
        projector = "base checkpoint (no non_lora_trainables.bin next to the adapter)"
    elif projector_keys <= set(store.overridden):
        projector = f"{NON_LORA} (trained with the adapter)"
    else:
        raise CheckpointError(
            f"{non_lora} lacks the projector ({sorted(projector_keys - set(store.overridden))[0]}); "
            f"expected LLaVA's mm_projector weights saved with the adapter"
        )
    notes = {
        **ckpt.notes,
        "projector": projector,
        "lora": str(adapter.resolve()),
        "lora_r": config.r,
        "lora_alpha": config.alpha,
        "lora_targets": store.lora_targets,
        "base": str(Path(base).resolve()),
    }
    vision_store = store if ckpt.vision_store is ckpt.store else ckpt.vision_store
    return dataclasses.replace(ckpt, store=store, vision_store=vision_store, notes=notes)
