"""Every checkpoint layout users bring, exported and compared with transformers on the same weights (fp32).

Beyond test_parity.py's three single-file layouts: `.bin` shards with an index, sharded safetensors with an
index, a hub-named CLIP tower (clear error, --vision-tower, the local HF cache), MM-Skin's LoRA output
(PEFT adapter + non_lora_trainables.bin) merged on the fly, a checkpoint with only a tokenizer.json, the
streaming full-size writer, --dry-run, and the auto-detection errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from skin_offline.errors import CheckpointError
from skin_offline.export.factory import PRESETS, build_reference, write_checkpoint, write_lora_adapter
from skin_offline.export.to_onnx import export_bundle

from conftest import assert_verified, random_image, reference_generate, reference_pixels

SPEC = PRESETS["tiny"]
QUESTION = "Describe the morphology, colour and border of the lesion."


def _export(src, out, **kw):
    return export_bundle(src, out, log=lambda m: None, verify=kw.pop("verify", False), **kw)


def _runtime(bundle):
    from skin_offline.runtime.pipeline import SkinVL

    return SkinVL.load(bundle, threads=1)


def _assert_greedy_parity(bundle, ref, seed=3, n=24):
    """Tokens of our runtime == transformers' generate on the same image and prompt."""
    from skin_offline.runtime.prompt import build_prompt_ids

    rt = _runtime(bundle)
    img = random_image(seed, size=(80, 60))
    ans = rt.ask(img, QUESTION, max_new_tokens=n)
    ids = build_prompt_ids(rt.tokenizer, QUESTION)
    ref_tokens, _ = reference_generate(ref, ids, reference_pixels(img, SPEC.image_size), n)
    assert ans.token_ids == ref_tokens
    return ref_tokens


def _ref_features(ref, pixels):
    with torch.no_grad():
        f = ref.model.get_image_features(pixel_values=torch.from_numpy(pixels))
    f = f.pooler_output if hasattr(f, "pooler_output") else f
    f = torch.cat(list(f)) if isinstance(f, (list, tuple)) else f
    return f.reshape(1, -1, f.shape[-1]).numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_model):
    """A llava-layout base checkpoint (fp32, single file) and its reference model."""
    root = tmp_path_factory.mktemp("layouts")
    ref = build_reference(SPEC, seed=7)
    return root, ref, write_checkpoint(ref, SPEC, root / "base", "llava", tokenizer_model)


def test_bin_shards_with_index(tmp_path, tokenizer_model):
    ref = build_reference(SPEC, seed=11)
    ckpt = write_checkpoint(ref, SPEC, tmp_path / "ck", "llava", tokenizer_model, shards=3, fmt="bin")
    assert (ckpt / "pytorch_model.bin.index.json").exists() and len(list(ckpt.glob("pytorch_model-*.bin"))) == 3
    m = _export(ckpt, tmp_path / "bundle", verify=True)
    assert m.source["layout"] == "llava"
    assert_verified(m)
    _assert_greedy_parity(tmp_path / "bundle", ref)


def test_sharded_safetensors_with_index_hf_layout(tmp_path, tokenizer_model):
    ref = build_reference(SPEC, seed=12, padded_vocab=True)
    ckpt = write_checkpoint(ref, SPEC, tmp_path / "ck", "hf", tokenizer_model, shards=4)
    assert len(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    # a stray file the index does not name must be ignored (e.g. a consolidated copy left next to shards)
    shutil.copyfile(ckpt / "model-00001-of-00004.safetensors", ckpt / "stray.safetensors")
    _export(ckpt, tmp_path / "bundle")
    _assert_greedy_parity(tmp_path / "bundle", ref)


def test_index_naming_a_missing_shard_is_a_clear_error(tmp_path, tokenizer_model):
    ref = build_reference(SPEC, seed=12)
    ckpt = write_checkpoint(ref, SPEC, tmp_path / "ck", "llava", tokenizer_model, shards=2)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*incomplete"):
        _export(ckpt, tmp_path / "bundle")


def test_hub_named_vision_tower(tmp_path, tokenizer_model, monkeypatch):
    ref = build_reference(SPEC, seed=13)
    tower = tmp_path / "clip-download"
    ckpt = write_checkpoint(
        ref,
        SPEC,
        tmp_path / "ck",
        "llava",
        tokenizer_model,
        vision_tower=tower,
        vision_tower_name="openai/clip-vit-large-patch14-336",
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"openai/clip-vit-large-patch14-336.*--vision-tower"):
        _export(ckpt, tmp_path / "b0")
    assert not (tmp_path / "b0").exists()
    m = _export(ckpt, tmp_path / "b1", vision_tower=tower)
    assert Path(m.source["vision_tower"]) == tower
    _assert_greedy_parity(tmp_path / "b1", ref)
    # a copy already in the local Hugging Face cache is found without the flag (no network involved)
    snap = tmp_path / "hub" / "models--openai--clip-vit-large-patch14-336" / "snapshots" / "abc123"
    shutil.copytree(tower, snap)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    from skin_offline.export.checkpoint import open_checkpoint

    assert open_checkpoint(ckpt).vision_store.folder == snap


def test_lora_merge_matches_merged_model(base, tmp_path):
    root, ref, ckpt = base
    merged = write_lora_adapter(ref, SPEC, tmp_path / "adapter", r=8, alpha=16.0)
    m = _export(ckpt, tmp_path / "bundle", lora=tmp_path / "adapter", verify=True)
    assert m.source["projector"].startswith("non_lora_trainables.bin")
    assert m.source["lora_r"] == 8 and m.source["lora_targets"] == 7 * SPEC.layers
    assert_verified(m)
    tokens = _assert_greedy_parity(tmp_path / "bundle", merged)
    # the comparison can tell: the unmerged base model answers differently on the same input
    from skin_offline.runtime.prompt import build_prompt_ids

    rt = _runtime(tmp_path / "bundle")
    img = random_image(3, size=(80, 60))
    base_tokens, _ = reference_generate(
        ref, build_prompt_ids(rt.tokenizer, QUESTION), reference_pixels(img, SPEC.image_size), 24
    )
    assert base_tokens != tokens


def test_lora_projector_comes_from_non_lora_trainables(base, tmp_path):
    root, ref, ckpt = base
    merged = write_lora_adapter(ref, SPEC, tmp_path / "adapter", seed=5)
    _export(ckpt, tmp_path / "bundle", lora=tmp_path / "adapter")
    pixels = reference_pixels(random_image(4), SPEC.image_size)
    ours = _runtime(tmp_path / "bundle").bundle.vision.encode(pixels)
    assert np.abs(ours - _ref_features(merged, pixels)).max() < 1e-4
    assert np.abs(ours - _ref_features(ref, pixels)).max() > 1e-2  # not the base projector


def test_lora_bin_adapter_without_non_lora_keeps_base_projector(base, tmp_path):
    root, ref, ckpt = base
    merged = write_lora_adapter(ref, SPEC, tmp_path / "adapter", fmt="bin", with_non_lora=False, r=4, alpha=4.0)
    m = _export(ckpt, tmp_path / "bundle", lora=tmp_path / "adapter")
    assert m.source["projector"].startswith("base checkpoint")
    pixels = reference_pixels(random_image(6), SPEC.image_size)
    ours = _runtime(tmp_path / "bundle").bundle.vision.encode(pixels)
    assert np.abs(ours - _ref_features(ref, pixels)).max() < 1e-4
    # the LLM deltas are applied all the same (merged text weights, base projector)
    from skin_offline.export.lora import open_lora_checkpoint

    c = open_lora_checkpoint(ckpt, tmp_path / "adapter")
    got = c.text_tensor("layers.1.self_attn.v_proj.weight")
    want = merged.model.language_model.layers[1].self_attn.v_proj.weight.detach()
    assert torch.equal(got, want)


def test_lora_on_the_wrong_base_is_a_clear_error(base, tmp_path, tokenizer_model):
    root, ref, ckpt = base
    write_lora_adapter(ref, SPEC, tmp_path / "adapter")
    other = build_reference(PRESETS["tiny"].__class__(**{**PRESETS["tiny"].__dict__, "layers": 1}), seed=1)
    small = write_checkpoint(
        other,
        PRESETS["tiny"].__class__(**{**PRESETS["tiny"].__dict__, "layers": 1}),
        tmp_path / "small",
        "llava",
        tokenizer_model,
    )
    with pytest.raises(CheckpointError, match="layers.1.*does not have.*--base"):
        _export(small, tmp_path / "bundle", lora=tmp_path / "adapter")


def test_cli_lora_and_dry_run(base, tmp_path):
    from typer.testing import CliRunner

    from skin_offline.cli import app

    root, ref, ckpt = base
    write_lora_adapter(ref, SPEC, tmp_path / "adapter")
    runner = CliRunner()
    r = runner.invoke(
        app, ["export", "--base", str(ckpt), "--lora", str(tmp_path / "adapter"), str(tmp_path / "out"), "--dry-run"]
    )
    assert r.exit_code == 0, r.output
    assert "would write" in r.output and "peak memory" in r.output and "non_lora_trainables" in r.output
    assert not (tmp_path / "out").exists()
    r = runner.invoke(app, ["export", "--lora", str(tmp_path / "adapter"), str(tmp_path / "out")])
    assert r.exit_code == 2 and "--base" in r.output
    # the dry run's size prediction matches what a real export writes (tests/test_export_plan.py: every precision)
    from skin_offline.export.plan import plan_export

    plan = plan_export(ckpt, tmp_path / "x", lora=tmp_path / "adapter", log=lambda m: None)
    manifest = _export(ckpt, tmp_path / "real", lora=tmp_path / "adapter")
    for f, e in manifest.files.items():
        assert abs(e.size - plan.files[f]) <= max(0.01 * e.size, 64 << 10), (f, e.size, plan.files[f])
    # info names the merged adapter and where the projector came from
    r = runner.invoke(app, ["info", str(tmp_path / "real")])
    assert r.exit_code == 0, r.output
    assert (
        f"lora: {tmp_path / 'adapter'} (r 8, alpha 16.0," in r.output and "projector: non_lora_trainables" in r.output
    )


def test_checkpoint_with_only_tokenizer_json(tmp_path, tokenizer_model):
    """The path of a 7B conversion that ships tokenizer.json but no tokenizer.model (streaming writer too)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    from skin_offline.export.factory import write_streaming_checkpoint

    ckpt = write_streaming_checkpoint(
        tmp_path / "ck", SPEC, tokenizer_model, dtype=torch.bfloat16, shard_bytes=1 << 20, tokenizer="json"
    )
    assert not (ckpt / "tokenizer.model").exists() and (ckpt / "model.safetensors.index.json").exists()
    # make it look like a transformers-saved file: special tokens as added tokens + a BOS post-processor
    data = json.loads((ckpt / "tokenizer.json").read_text())
    data["added_tokens"] = [
        {
            "id": i,
            "content": c,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, c in ((0, "<unk>"), (1, "<s>"), (2, "</s>"))
    ]
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    (ckpt / "tokenizer.json").write_text(json.dumps(data))
    m = _export(ckpt, tmp_path / "bundle", verify=True)  # bf16 weights, verified against transformers
    assert_verified(m)
    tok = Tokenizer.from_file(str(tmp_path / "bundle" / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ019 .,;:!?\n\t-_/()[]<>") + ["</s>", "<s>", "[INST]", "é", "皮", "🙂", "  ", " lesion"]
    texts = ["", " ", " leading", "[INST] <image>\nWhat is this? [/INST]", "a </s> b", "x" * 50 + " " * 20]
    texts += ["".join(rng.choice(alphabet, int(rng.integers(1, 40)))) for _ in range(300)]
    for t in texts:
        assert tok.encode(t, add_special_tokens=False).ids == sp.encode(t), t


def test_streaming_writer_matches_transformers_names_and_shapes():
    from skin_offline.export.factory import _canonical_state, clip_tensor_shapes, llava_tensor_shapes

    ref = build_reference(SPEC)
    parts = _canonical_state(ref)
    want = {k: tuple(v.shape) for k, v in parts["text"].items()}
    want.update(
        {
            f"model.mm_projector.{i}.{k}": tuple(parts["projector"][f"linear_{j}.{k}"].shape)
            for i, j in (("0", 1), ("2", 2))
            for k in ("weight", "bias")
        }
    )
    assert llava_tensor_shapes(SPEC) == want
    want = {"vision_model." + k: tuple(v.shape) for k, v in parts["vision"].items() if "position_ids" not in k}
    assert clip_tensor_shapes(SPEC) == want


# --- auto-detection: errors name what was found and what was expected ---


def test_adapter_passed_as_checkpoint(base, tmp_path):
    root, ref, ckpt = base
    write_lora_adapter(ref, SPEC, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="LoRA adapter.*--base.*--lora"):
        _export(tmp_path / "adapter", tmp_path / "b")


def test_text_only_model_is_named(base, tmp_path):
    root, ref, ckpt = base
    shutil.copytree(ckpt, tmp_path / "mistral")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("mm_")}
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (tmp_path / "mistral" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model_type='mistral'.*MistralForCausalLM.*text-only.*expected a LLaVA"):
        _export(tmp_path / "mistral", tmp_path / "b")


def test_folder_without_config_lists_what_it_found(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"no config.json \(found: weights.gguf\)"):
        _export(tmp_path / "x", tmp_path / "b")
    with pytest.raises(CheckpointError, match=r"--lora .*no adapter_config.json \(found: weights.gguf\)"):
        _export(tmp_path / "x", tmp_path / "b", lora=tmp_path / "x")


def test_streamed_lora_adapter_merges_by_the_peft_formula(tmp_path, tokenizer_model):
    """The full-scale script's adapter (bf16, streamed): merged W == W + alpha/r * B @ A, read independently."""
    from safetensors.torch import load_file

    from skin_offline.export.factory import write_streaming_checkpoint, write_streaming_lora_adapter
    from skin_offline.export.lora import open_lora_checkpoint

    base = write_streaming_checkpoint(tmp_path / "b", SPEC, tokenizer_model, dtype=torch.bfloat16)
    adapter = write_streaming_lora_adapter(tmp_path / "a", SPEC, r=16, alpha=8.0)
    ckpt = open_lora_checkpoint(base, adapter)
    w = load_file(str(base / "model.safetensors"))["model.layers.1.mlp.gate_proj.weight"].float()
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.gate_proj"
    want = w + 0.5 * (ad[f"{key}.lora_B.weight"].float() @ ad[f"{key}.lora_A.weight"].float())
    assert torch.equal(ckpt.text_tensor("layers.1.mlp.gate_proj.weight"), want)
    proj = torch.load(adapter / "non_lora_trainables.bin", weights_only=True)
    assert torch.equal(ckpt.projector_tensor("linear_2.weight"), proj["base_model.model.model.mm_projector.2.weight"])
