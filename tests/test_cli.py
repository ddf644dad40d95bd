"""The CLI end to end: export, ask (streaming and --json), default bundle, verify, info."""

import json
import os
import subprocess
import sys

import pytest

from conftest import random_image


def cli(*args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "skin_offline.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "lesion.jpg"
    random_image(21, size=(120, 90)).save(path, quality=95)
    return path


def test_ask_json_matches_api_and_stream(llava_model, image):
    out = cli(
        "ask",
        image,
        "What is this lesion?",
        "--bundle",
        llava_model.bundle_dir,
        "--json",
        "--max-new-tokens",
        12,
        "--temperature",
        0,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert {"answer", "token_ids", "finish_reason", "timings"} <= d.keys()
    assert {"preprocess_s", "vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s"} <= d["timings"].keys()
    api = llava_model.runtime.ask(str(image), "What is this lesion?", max_new_tokens=12)
    assert d["token_ids"] == api.token_ids and d["answer"] == api.answer
    assert d["finish_reason"] in ("stop", "length")
    streamed = cli("ask", image, "What is this lesion?", "--bundle", llava_model.bundle_dir, "--max-new-tokens", 12)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == api.answer + "\n"


def test_default_bundle_from_environment(llava_model, image):
    out = cli(
        "ask", image, "Hi?", "--json", "--max-new-tokens", 2, env={"SKIN_OFFLINE_BUNDLE": str(llava_model.bundle_dir)}
    )
    assert out.returncode == 0, out.stderr


def test_missing_bundle_is_one_line_with_how_to_export(tmp_path, image):
    out = cli("ask", image, "Hi?", env={"SKIN_OFFLINE_BUNDLE": str(tmp_path / "nope"), "XDG_DATA_HOME": str(tmp_path)})
    assert out.returncode == 4
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "skin-offline export" in lines[0] and "Traceback" not in out.stderr


def test_export_replaces_existing_bundle_atomically_and_verify_info(llava_model, tmp_path):
    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    out = cli("export", llava_model.ckpt, dest, "--no-verify")
    assert out.returncode == 0, out.stderr
    assert not (dest / "stale.txt").exists() and (dest / "manifest.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    assert cli("verify", dest).returncode == 0
    info = cli("info", dest)
    assert info.returncode == 0 and "decoder" in info.stdout


def test_export_hub_named_vision_tower_needs_local_path(tmp_path, tokenizer_model):
    from skin_offline.export.factory import PRESETS, build_reference, write_checkpoint

    spec = PRESETS["tiny"]
    ckpt = write_checkpoint(
        build_reference(spec),
        spec,
        tmp_path / "ckpt",
        "llava",
        tokenizer_model,
        vision_tower=tmp_path / "clip",
        vision_tower_name="openai/clip-vit-large-patch14-336",
    )
    out = cli("export", ckpt, tmp_path / "b")
    assert out.returncode == 4 and "--vision-tower" in out.stderr and not (tmp_path / "b").exists()
    assert cli("export", ckpt, tmp_path / "b", "--vision-tower", tmp_path / "clip", "--no-verify").returncode == 0


def test_config_error_is_a_one_line_usage_error(llava_model, image):
    """A value the sampling config refuses (top_p 0) is exit 2 with one line, not 'unexpected ValueError'."""
    out = cli("ask", image, "Hi?", "--bundle", llava_model.bundle_dir, "--top-p", 0, "--temperature", 1)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: top_p must be in (0, 1]") and "unexpected" not in lines[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["quantize", "B", "O", "--precision", "int3"], "'int3' is not one of"),
        (["quantize", "B", "O", "--precision", "int4", "--embeddings", "int4"], "--embeddings must be one of"),
        (["export", "C", "O", "--image-mode", "squash"], "'squash' is not one of"),
        (["export", "C", "O", "--precision", "int2"], "'int2' is not one of"),
        (["ask", "x.png", "q", "--device", "gpu"], "'gpu' is not one of"),
        (["ask", "x.png", "q", "--precision", "fp8"], "'fp8' is not one of"),
        (["eval", "B", "--csv", "c", "--images", "i", "--protocol", "beam"], "'beam' is not one of"),
        (["classify", "x.png", "--labels", "a,b", "--method", "vote"], "'vote' is not one of"),
        (["make-demo-checkpoint", "O", "--layout", "gguf"], "'gguf' is not one of"),
        (["bench", "B", "--precision", "int3"], "'int3' is not one of"),
        (["ask", "x.png"], "Missing argument"),
    ],
)
def test_bad_choices_are_one_line_usage_errors(args, needle, tmp_path):
    """Every choice is an enum-typed option (or a config that checks it): exit 2, one line, before any work."""
    from typer.testing import CliRunner

    from skin_offline.cli import app

    r = CliRunner().invoke(app, [str(tmp_path / a) if a in ("B", "O", "C") else a for a in args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not [p for p in tmp_path.iterdir()], "a usage error must not write anything"


def test_random_weight_bundles_warn_and_real_ones_do_not(llava_model, image, tmp_path):
    import shutil

    from skin_offline.commands.options import RANDOM_WEIGHTS_WARNING

    out = cli("ask", image, "Hi?", "--bundle", llava_model.bundle_dir, "--max-new-tokens", 2, "--json")
    assert out.returncode == 0 and RANDOM_WEIGHTS_WARNING in out.stderr.splitlines()
    json.loads(out.stdout)  # the warning stays on stderr
    chat = cli("chat", image, "-q", "Hi?", "--bundle", llava_model.bundle_dir, "--max-new-tokens", 2)
    assert chat.returncode == 0 and RANDOM_WEIGHTS_WARNING in chat.stderr.splitlines()
    ranked = cli("classify", image, "--labels", "nevus,melanoma", "--bundle", llava_model.bundle_dir, "--json")
    assert ranked.returncode == 0 and RANDOM_WEIGHTS_WARNING in ranked.stderr.splitlines()
    # the same bundle without the mark (as a real checkpoint's export): no warning
    real = tmp_path / "real"
    shutil.copytree(llava_model.bundle_dir, real)
    m = json.loads((real / "manifest.json").read_text())
    assert m["source"]["random_weights"] is True
    m["source"]["random_weights"] = False
    (real / "manifest.json").write_text(json.dumps(m))
    quiet = cli("ask", image, "Hi?", "--bundle", real, "--max-new-tokens", 2)
    assert quiet.returncode == 0 and "random weights" not in quiet.stderr


def test_every_command_module_registers_its_commands():
    out = cli("--help")
    for name in (
        "ask",
        "chat",
        "export",
        "make-demo-checkpoint",
        "quantize",
        "info",
        "verify",
        "eval",
        "classify",
        "classify-eval",
        "bench",
        "build-engines",
    ):
        assert f" {name} " in out.stdout, name
