"""transformers' own modules run one layer at a time: the export-time reference for verification.

Building the whole LlavaForConditionalGeneration would hold the full fp32 model (29 GB at 7B); instead
each MistralDecoderLayer / the CLIP tower is instantiated with the checkpoint's weights, applied, and
dropped, so the check costs one layer of memory and runs on every export, the 7B one included.
"""

from __future__ import annotations

import numpy as np
import torch

from .checkpoint import Checkpoint


@torch.no_grad()
def vision_features(ckpt: Checkpoint, pixel_values: np.ndarray) -> np.ndarray:
    """[B,3,S,S] -> [B,N,H_text] with transformers' CLIPVisionModel + the projector."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    v = ckpt.vision
    cfg = CLIPVisionConfig(
        hidden_size=v.hidden,
        intermediate_size=v.mlp,
        num_hidden_layers=v.kept_layers,
        num_attention_heads=v.heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
    )
    with torch.device("meta"):  # no random init: the checkpoint's tensors become the parameters (one copy, 1.2 GB)
        model = CLIPVisionModel(cfg).eval()
    state = ckpt.vision_state_dict()
    for k, v in model.state_dict().items():  # buffers and the unused post-layernorm: real tensors, not meta
        if k not in state:
            state[k] = torch.zeros_like(v, device="cpu") if "position_ids" not in k else torch.arange(v.shape[-1])[None]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):  # non-persistent buffers (position_ids) are not in a state dict
        if buf.is_meta:
            owner = model.get_submodule(name.rpartition(".")[0])
            value = (
                torch.arange(buf.shape[-1]).expand(buf.shape)
                if "position_ids" in name
                else torch.zeros(buf.shape, dtype=buf.dtype)
            )
            owner.register_buffer(name.rpartition(".")[2], value.clone(), persistent=False)
    missing = [k for k in missing if not k.startswith("post_layernorm") and "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"reference CLIP load mismatch: missing={missing} unexpected={unexpected}")
    hidden = model(torch.from_numpy(pixel_values)).last_hidden_state[:, 1:]
    w1, b1 = ckpt.projector_tensor("linear_1.weight"), ckpt.projector_tensor("linear_1.bias")
    w2, b2 = ckpt.projector_tensor("linear_2.weight"), ckpt.projector_tensor("linear_2.bias")
    h = torch.nn.functional.gelu(hidden @ w1.T + b1)
    return (h @ w2.T + b2).numpy()
