"""Side-by-side speed of skin-offline and its peers on the same weights, prompt length and new tokens.

    python benchmarks/compare.py setup          # once: checkpoint, bundles, peers (see benchmarks/README.md)
    python benchmarks/compare.py run --runs 3   # interleaved measurements, medians, ratios, roofline

Peers (each optional; a missing one is reported as skipped with the reason):
  skin-offline  every bundle under CACHE/models/bundle-*, at each decoder precision it carries
  transformers  LlavaForConditionalGeneration fp32 on the hf-layout checkpoint (the researcher's reference)
  llama.cpp     llama-cpp-python built from its PyPI sdist; GGUF from the sdist's convert_hf_to_gguf.py,
                quantized to Q4_0 / Q4_K_M / Q8_0 (text model only: its LLaVA-1.5 projector path is wrong upstream)
  ort-genai     onnxruntime-genai's own runtime on its model builder's graph (int4 / fp32)

Fairness: one checkpoint (random weights, exact SkinVL widths) written in every layout; the same prompt
length (image tokens + padded question; text-only peers get the same number of prompt tokens) and the
same number of new tokens, greedy, EOS ignored by the peers we drive token by token. Measurements are
interleaved: in each round every peer runs once, in a fresh process (load, W warmups, one measured
request), so a noisy neighbour hits all peers alike and only one model is in memory at a time.
Peers never become runtime dependencies: they live in CACHE/peers-venv, outside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("SKIN_OFFLINE_BENCH_CACHE", Path.home() / ".cache" / "skin-offline-bench"))
LLAMA_CPP_PYTHON = "0.3.36"
ORT_GENAI = "0.18.0"
ONNX_IR = "1.1.0"
GGUF_TYPES = {"q4_0": 2, "q4_k_m": 15, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_0 / _Q4_K_M / _Q8_0
GENAI_PRECISIONS = ("int4", "fp32")
WARMUP_TOKENS = 4  # warmup requests run the full prompt but only this many new tokens


# --- setup ---------------------------------------------------------------------------------------


def sh(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> bool:
    print("$", " ".join(map(str, cmd)), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        r = subprocess.run(
            [str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd
        )
    if r.returncode:
        print(f"  failed (exit {r.returncode}); see {log}", flush=True)
    return r.returncode == 0


def peers_python(cache: Path) -> Path:
    return cache / "peers-venv" / "bin" / "python"


def setup_checkpoint(cache: Path, preset: str) -> None:
    """One random-weight model written in the LLaVA layout (skin-offline, llama.cpp, genai) and the llava-hf
    layout (transformers), so every peer reads exactly the same numbers."""
    models = cache / "models"
    if (models / "ckpt-hf" / "config.json").exists():
        return
    code = (
        "import sys; from pathlib import Path; from skin_offline.export.factory import PRESETS, build_reference, write_checkpoint;"
        "from skin_offline.export.tokenizer import find_mistral_tokenizer_model as t; r=Path(sys.argv[1]); s=PRESETS[sys.argv[2]];"
        "m=build_reference(s, seed=0, padded_vocab=False);"
        "write_checkpoint(m, s, r/'ckpt-llava', 'llava', t(), vision_tower=r/'ckpt-llava-clip');"
        "write_checkpoint(m, s, r/'ckpt-hf', 'hf', t())"
    )
    models.mkdir(parents=True, exist_ok=True)
    sh([sys.executable, "-c", code, models, preset], cache / "setup.log")


def setup_bundles(cache: Path, precisions: list[str]) -> None:
    models, cli = cache / "models", Path(sys.executable).parent / "skin-offline"
    if not (models / "bundle-bench" / "manifest.json").exists():
        sh([cli, "export", models / "ckpt-llava", models / "bundle-bench", "--no-verify"], cache / "setup.log")
    variants = {f"bundle-bench-{p}": ["--precision", p] for p in precisions}
    if "int4" in precisions:  # the previous defaults (no int8 prefill graph, fp32 vision): the same-run baseline
        variants["bundle-bench-int4-base"] = ["--precision", "int4", "--prefill", "decoder", "--vision", "fp32"]
    for name, args in variants.items():
        if not (models / name / "manifest.json").exists():
            sh([cli, "quantize", models / "bundle-bench", models / name, *args, "--no-quality"], cache / "setup.log")


def setup_peers_venv(cache: Path) -> None:
    """A venv that sees the project's packages (torch, transformers, onnxruntime) through a .pth file, so the
    peers add only themselves: no second torch, no change to the project's onnxruntime."""
    py = peers_python(cache)
    log = cache / "setup.log"
    if not py.exists():
        base = Path(sys.base_prefix) / "bin" / "python3"  # the interpreter the project venv was made from
        sh([base, "-m", "venv", cache / "peers-venv"], log)
        site = subprocess.run(
            [str(py), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True
        ).stdout.strip()
        ours = subprocess.run(
            [sys.executable, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True
        ).stdout.strip()
        Path(site, "skin_offline_project.pth").write_text(ours + "\n")
    dl = cache / "dl"
    dl.mkdir(exist_ok=True)
    if not list(dl.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")):
        sh(
            [
                py,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                "-d",
                dl,
            ],
            log,
        )
    # onnxruntime-genai's builder also imports onnx-ir (undeclared); both pinned, no deps (onnxruntime comes from the project)
    sh(
        [
            py,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            f"onnxruntime-genai=={ORT_GENAI}",
            f"onnx-ir=={ONNX_IR}",
            "diskcache==5.6.3",
        ],
        log,
    )
    ok = subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not ok:
        build_llama_cpp_python(cache, llama_flags(cache))
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not src.exists():
        shutil.unpack_archive(dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz", cache)


# llama.cpp's CMake flags for every peer build (llama-cpp-python, libmtmd, llama-server), recorded in the cache
# and in each run's report. GGML_NATIVE uses this CPU's own instruction set (AVX-512 / VNNI); on Intel CPUs with
# AMX that also turns on ggml's AMX backend, which crashed here on the first decode (SIGSEGV in
# ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36): setup then rebuilds with the AMX paths off (smoke test).
# GGML_AMX_*=OFF beside GGML_NATIVE=ON is not enough: -march=native defines __AMX_INT8__, which compiles the AMX
# backend in regardless (seen: the same SIGSEGV). So the rebuild names this CPU's instruction sets one by one.
NATIVE_FLAGS = "-DGGML_NATIVE=ON"
_GGML_ISA = {
    "avx": "AVX",
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "bmi2": "BMI2",
    "avx_vnni": "AVX_VNNI",
    "avx512f": "AVX512",
    "avx512vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
}


def _no_amx_flags() -> str:
    from skin_offline.runtime.kernels.policy import cpu_flags

    have = cpu_flags()
    return " ".join(
        [
            "-DGGML_NATIVE=OFF",
            *(f"-DGGML_{v}=ON" for k, v in _GGML_ISA.items() if k in have),
            "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_TILE=OFF",
            "-DGGML_AMX_BF16=OFF",
        ]
    )


NO_AMX_FLAGS = _no_amx_flags()
FLAGS_FILE = "llama-cmake-flags.txt"


def llama_flags(cache: Path) -> str:
    f = cache / FLAGS_FILE
    return f.read_text().strip() if f.exists() else NATIVE_FLAGS


def build_llama_cpp_python(cache: Path, flags: str) -> None:
    """4.5-6.5 min on 2 idle cores; LLAVA_BUILD=OFF skips the mtmd library (built separately, see setup_mtmd)."""
    (cache / FLAGS_FILE).write_text(flags + "\n")
    sdist = cache / "dl" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    sh(
        [peers_python(cache), "-m", "pip", "install", "--force-reinstall", "--no-deps", sdist],
        cache / "setup.log",
        env={"CMAKE_ARGS": f"{flags} -DLLAVA_BUILD=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)},
    )


def describe_exit(code: int) -> str:
    """'exit 3', or the signal a crashed process died of ('killed by SIGSEGV')."""
    import signal

    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def smoke_llama(cache: Path) -> str | None:
    """Decode 2 tokens with the Q4_0 GGUF in a fresh process: None when it works, else why it failed."""
    g = cache / "models" / "mistral-q4_0.gguf"
    if not g.exists():
        return f"{g.name} missing"
    r = subprocess.run(
        [
            str(peers_python(cache)),
            str(Path(__file__).resolve()),
            "worker",
            "llama",
            "--model",
            str(g),
            "--bundle",
            str(cache / "models" / "bundle-bench"),
            "--prompt-tokens",
            "32",
            "--new-tokens",
            "2",
            "--warmup",
            "0",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return None if r.returncode == 0 and "RESULT " in r.stdout else describe_exit(r.returncode)


def check_llama_build(cache: Path) -> None:
    """The peers must run on this machine: a crashing native build is rebuilt without AMX, then must pass."""
    why = smoke_llama(cache)
    if why and why.startswith("killed") and llama_flags(cache) != NO_AMX_FLAGS:
        print(f"llama.cpp smoke test {why} with {llama_flags(cache)}; rebuilding with {NO_AMX_FLAGS}", flush=True)
        build_llama_cpp_python(cache, NO_AMX_FLAGS)
        for d in ("build-mtmd", "build-server"):
            shutil.rmtree(cache / d, ignore_errors=True)
        why = smoke_llama(cache)
    if why:
        raise SystemExit(
            f"llama.cpp peer does not run on this machine ({why}, flags {llama_flags(cache)}); see {cache}/setup.log"
        )
    print(f"llama.cpp smoke test ok (flags {llama_flags(cache)})", flush=True)


def setup_mistral_split(cache: Path) -> Path:
    """The language model alone as a MistralForCausalLM folder (what llama.cpp's converter and genai's builder read)."""
    out = cache / "models" / "mistral"
    if (out / "model.safetensors").exists():
        return out
    src = cache / "models" / "ckpt-llava"
    code = r"""
import json, shutil, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.numpy import save_file
src, out = Path(sys.argv[1]), Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
cfg = json.loads((src / "config.json").read_text())
keep = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
        "rms_norm_eps", "rope_theta", "vocab_size", "max_position_embeddings", "sliding_window", "tie_word_embeddings",
        "hidden_act", "bos_token_id", "eos_token_id")}
keep.update(architectures=["MistralForCausalLM"], model_type="mistral", torch_dtype="float32", head_dim=cfg["hidden_size"] // cfg["num_attention_heads"])
(out / "config.json").write_text(json.dumps(keep, indent=2))
tensors = {}
for f in sorted(src.glob("*.safetensors")):
    with safe_open(f, "numpy") as st:
        for k in st.keys():
            if not k.startswith(("model.mm_projector", "model.vision_tower")):
                tensors[k] = st.get_tensor(k)
save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
for name in ("tokenizer.model", "tokenizer_config.json"):
    shutil.copy(src / name, out / name)
(out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
"""
    sh([sys.executable, "-c", code, src, out], cache / "setup.log")
    return out


def setup_gguf(cache: Path, mistral: Path) -> None:
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    f16 = cache / "models" / "mistral-f16.gguf"
    log = cache / "setup.log"
    if not f16.exists():  # the converter needs torch/sentencepiece (project venv) and the sdist's own gguf-py
        sh(
            [sys.executable, src / "convert_hf_to_gguf.py", mistral, "--outtype", "f16", "--outfile", f16],
            log,
            env={"PYTHONPATH": str(src / "gguf-py")},
        )
    for name, ftype in GGUF_TYPES.items():
        out = cache / "models" / f"mistral-{name}.gguf"
        if f16.exists() and not out.exists():
            code = (
                "import sys, llama_cpp as l; p = l.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3]);"
                "p.nthread = 2; sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))"
            )
            sh([peers_python(cache), "-c", code, f16, out, ftype], log)


MMPROJ = "mmproj/mmproj-model-f16.gguf"

# llama.cpp's legacy LLaVA-1.5 image-encoder converter, run under transformers 5: CLIPVisionModel lost its
# `vision_model.` nesting, which the converter's tensor names and its layer pop expect, so it is put back
_MMPROJ_SHIM = """
import runpy, sys, torch, transformers
class Nested(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.vision_model = inner
orig = transformers.CLIPVisionModel.from_pretrained
transformers.CLIPVisionModel.from_pretrained = classmethod(lambda cls, *a, **k: Nested(orig(*a, **k)))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def setup_mtmd(cache: Path) -> None:
    """llama.cpp's multimodal path for the vision + prompt timing: libmtmd built from the same sdist (same
    flags; its libllama/libggml sonames resolve to the ones llama-cpp-python already loaded) and the
    LLaVA-1.5 mmproj GGUF made by the sdist's legacy converter from the same CLIP + projector weights."""
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    log, build, models = cache / "setup.log", cache / "build-mtmd", cache / "models"
    if not (build / "bin" / "libmtmd.so").exists():  # ~6 min on 2 idle cores
        sh(
            [
                "cmake",
                "-S",
                src,
                "-B",
                build,
                "-G",
                "Ninja",
                "-DCMAKE_BUILD_TYPE=Release",
                *llama_flags(cache).split(),
                "-DBUILD_SHARED_LIBS=ON",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
                "-DLLAMA_BUILD_TOOLS=ON",
                "-DLLAMA_CURL=OFF",
            ],
            log,
        )
        sh(["ninja", "-C", build, f"-j{os.cpu_count() or 1}", "mtmd"], log)
    out = models / MMPROJ
    if out.exists():
        return
    tmp = out.parent
    (tmp / "clip").mkdir(parents=True, exist_ok=True)
    clip = models / "ckpt-llava-clip"
    config = json.loads((clip / "config.json").read_text())  # the converter wants a vision config (+ projection_dim)
    (tmp / "clip" / "config.json").write_text(
        json.dumps(
            {
                **config["vision_config"],
                "architectures": ["CLIPVisionModel"],
                "projection_dim": config.get("projection_dim", 768),
            }
        )
    )
    for f in ("model.safetensors", "preprocessor_config.json"):
        if not (tmp / "clip" / f).exists():
            (tmp / "clip" / f).symlink_to(clip / f)
    code = (
        "import sys, torch; from safetensors.torch import load_file; sd = load_file(sys.argv[1]);"
        "torch.save({k: v.float() for k, v in sd.items() if k.startswith('model.mm_projector')}, sys.argv[2])"
    )
    sh([sys.executable, "-c", code, models / "ckpt-llava" / "model.safetensors", tmp / "llava.projector"], log)
    sh(
        [
            sys.executable,
            "-c",
            _MMPROJ_SHIM,
            src / "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py",
            "-m",
            tmp / "clip",
            "--clip-model-is-vision",
            "--llava-projector",
            tmp / "llava.projector",
            "--output-dir",
            tmp,
        ],
        log,
        env={"PYTHONPATH": str(src / "gguf-py")},
    )


def llama_server_binary(cache: Path) -> Path:
    return cache / "build-server" / "bin" / "llama-server"


def setup_llama_server(cache: Path) -> None:
    """llama.cpp's own server (tools/server, continuous batching over -np slots) from the same sdist and flags,
    for the concurrency benchmark (benchmarks/concurrency.py); no curl (offline), no web UI assets needed."""
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    build, log = cache / "build-server", cache / "setup.log"
    if llama_server_binary(cache).exists():
        return
    sh(
        [
            "cmake",
            "-S",
            src,
            "-B",
            build,
            "-G",
            "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            *llama_flags(cache).split(),
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_CURL=OFF",
        ],
        log,
    )
    sh(["ninja", "-C", build, f"-j{os.cpu_count() or 1}", "llama-server"], log)


def setup_genai(cache: Path, mistral: Path) -> None:
    for p in GENAI_PRECISIONS:
        out = cache / "models" / f"genai-{p}"
        if not (out / "genai_config.json").exists():
            sh(
                [
                    peers_python(cache),
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-i",
                    mistral,
                    "-o",
                    out,
                    "-p",
                    p,
                    "-e",
                    "cpu",
                    "-c",
                    cache / "genai-tmp",
                ],
                cache / "setup.log",
            )


def cmd_setup(a) -> None:
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    setup_checkpoint(cache, a.preset)
    setup_bundles(cache, a.quantize)
    if not a.skip_peers:
        setup_peers_venv(cache)
        mistral = setup_mistral_split(cache)
        setup_gguf(cache, mistral)
        check_llama_build(cache)
        setup_mtmd(cache)
        setup_llama_server(cache)
        setup_genai(cache, mistral)
    print(f"setup done in {time.time() - t0:.0f}s; cache {cache}")


# --- workers (one measured request per process, printed as one JSON line) ------------------------


def _prompt(bundle: Path, prompt_tokens: int):
    from skin_offline.bench.run import DEFAULT_QUESTION, pad_question
    from skin_offline.manifest import Manifest
    from skin_offline.runtime.prompt import build_prompt_ids
    from skin_offline.runtime.tokenizer import TextTokenizer

    m = Manifest.read(bundle)
    tok = TextTokenizer.from_file(bundle / "tokenizer.json")
    q = pad_question(tok, DEFAULT_QUESTION, m.model.image_tokens, prompt_tokens)
    return q, build_prompt_ids(tok, q), m.model.image_tokens


def _text_only_ids(bundle: Path, prompt_tokens: int) -> list[int]:
    """Same length as the multimodal prompt: image slots become filler text tokens (text-only peers)."""
    _, ids, n_img = _prompt(bundle, prompt_tokens)
    i = ids.index(-200)
    filler = ids[i + 1 : i + 2] or [1]
    return ids[:i] + filler * n_img + ids[i + 1 :]


def _rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_skin(a) -> dict:
    from skin_offline.bench.run import demo_image, model_facts, one_run
    from skin_offline.runtime.bundle import Bundle
    from skin_offline.runtime.pipeline import SkinVL
    from skin_offline.runtime.tokenizer import TextTokenizer

    bundle = Path(a.model)
    t0 = time.perf_counter()
    b = Bundle.load(bundle, threads=a.threads, precision=a.precision, device="cpu", prefill=a.prefill)
    model = SkinVL(b, TextTokenizer.from_file(bundle / "tokenizer.json"), feature_cache_size=0, prompt_cache_size=0)
    load = time.perf_counter() - t0
    q, _, _ = _prompt(bundle, a.prompt_tokens)
    img = demo_image()
    for _ in range(a.warmup):  # full prompt, few tokens: warms both the prefill and the decode shapes
        one_run(model, img, q, min(a.new_tokens, WARMUP_TOKENS))
    r = one_run(model, img, q, a.new_tokens)
    f = model_facts(model, a.threads)
    resident = sum(b.manifest.files[f].size for f in b.loaded_files())
    return {
        **r,
        "load_s": load,
        "peak_rss_bytes": _rss(),
        "weight_bytes": f["decoder_weight_bytes"],
        "resident_weight_bytes": resident,
        "kv_bytes": f["kv_bytes_per_token"] * (r["prompt_tokens"] + r["new_tokens"]),
        "kv_bytes_per_token": f["kv_bytes_per_token"],
        "detail": f"{f['precision']} {f['flavor']}, prefill {f['prefill']}",
    }


def worker_transformers(a) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    from skin_offline.bench.run import demo_image
    from skin_offline.manifest import Manifest
    from skin_offline.runtime.image import preprocess

    torch.set_num_threads(a.threads)
    bundle = Path(a.bundle)
    t0 = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    _, ids, _ = _prompt(bundle, a.prompt_tokens)
    pre = Manifest.read(bundle).preprocess
    emb = model.get_input_embeddings()

    @torch.inference_mode()
    def once(n=a.new_tokens):
        t = time.perf_counter()
        pixels = torch.from_numpy(preprocess(demo_image(), pre))  # same pixels as skin-offline's (parity-tested)
        t_pre = time.perf_counter()
        feats = model.model.get_image_features(pixel_values=pixels)
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        t_vis = time.perf_counter()
        i = ids.index(-200)
        embeds = torch.cat(
            [emb(torch.tensor(ids[:i])), feats.reshape(-1, feats.shape[-1]), emb(torch.tensor(ids[i + 1 :]))]
        )[None]
        out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        tok = int(out.logits[0, -1].argmax())
        t_first = time.perf_counter()
        past = out.past_key_values
        for _ in range(n - 1):  # greedy, EOS ignored: exactly new_tokens
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        t_end = time.perf_counter()
        return {
            "preprocess_s": t_pre - t,
            "vision_s": t_vis - t_pre,
            "prefill_s": t_first - t_vis,
            "prefill_tokens_per_s": embeds.shape[1] / (t_first - t_vis),
            "ttft_s": t_first - t,
            "decode_tokens_per_s": (n - 1) / (t_end - t_first) if n > 1 else 0.0,
            "end_to_end_s": t_end - t,
            "prompt_tokens": int(embeds.shape[1]),
            "new_tokens": n,
        }

    for _ in range(a.warmup):
        once(min(a.new_tokens, WARMUP_TOKENS))
    r = once()
    w = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if "vision_tower" not in n and "multi_modal" not in n
    )
    return {
        **r,
        "load_s": load,
        "peak_rss_bytes": _rss(),
        "weight_bytes": int(w - emb.weight.numel() * 4),
        "detail": "fp32 sdpa",
    }


def worker_llama(a) -> dict:
    import numpy as np
    from llama_cpp import Llama

    ids = _text_only_ids(Path(a.bundle), a.prompt_tokens)
    t0 = time.perf_counter()
    llm = Llama(
        model_path=a.model,
        n_ctx=len(ids) + a.new_tokens + 8,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_batch=512,
        verbose=False,
    )
    load = time.perf_counter() - t0

    n_vocab = llm.n_vocab()

    def last_logits():  # [V] of the last evaluated token (without logits_all, llama.cpp keeps only that row)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def once(n=a.new_tokens):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(last_logits()))
        t_first = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        t_end = time.perf_counter()
        return _text_only_timings(t, t_first, t_end, len(ids), n)

    for _ in range(a.warmup):
        once(min(a.new_tokens, WARMUP_TOKENS))
    r = once()
    return {
        **r,
        "load_s": load,
        "peak_rss_bytes": _rss(),
        "weight_bytes": os.path.getsize(a.model),
        "detail": "text only: no mmproj (vision not measured)",
    }


def worker_llama_mtmd(a) -> dict:
    """llama.cpp with its own CLIP (mtmd + the LLaVA-1.5 mmproj): image + question -> first token, then decode.
    Its image features are known to be wrong upstream (FINDINGS.md), so only its speed is compared."""
    import ctypes
    import io

    import llama_cpp.mtmd_cpp as mt
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp import llama_cpp as lc

    from skin_offline.bench.run import demo_image

    q, _, _ = _prompt(Path(a.bundle), a.prompt_tokens)
    buf = io.BytesIO()
    demo_image().save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    t0 = time.perf_counter()
    llm = Llama(
        model_path=a.model,
        n_ctx=a.prompt_tokens + a.new_tokens + 64,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_batch=512,
        verbose=False,
    )
    params = mt.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = False, False, a.threads
    ctx = mt.mtmd_init_from_file(a.mmproj.encode(), llm.model, params)
    if not ctx:
        raise RuntimeError(f"mtmd could not load {a.mmproj}")
    load = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    text = f"[INST] {mt.mtmd_default_marker().decode()}\n{q} [/INST]".encode()

    def once(n: int) -> dict:
        llm.reset()
        llm._ctx.kv_cache_clear()
        t = time.perf_counter()  # TTFT: image decode + CLIP + projector + prompt prefill -> first token
        bitmap = mt.mtmd_helper_bitmap_init_from_buf(ctx, (ctypes.c_uint8 * len(png)).from_buffer(png), len(png), False)
        chunks = mt.mtmd_input_chunks_init()
        inp = mt.mtmd_input_text()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), True, True
        if mt.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (mt.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
            raise RuntimeError("mtmd_tokenize failed")
        prompt, vision = 0, 0.0
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            chunk = mt.mtmd_input_chunks_get(chunks, i)
            prompt += mt.mtmd_input_chunk_get_n_tokens(chunk)
            if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                k = ctypes.c_size_t()
                ptr = mt.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(k))
                llm.eval([ptr[j] for j in range(k.value)])
            else:
                tv = time.perf_counter()  # the CLIP encode alone, then the embeddings' prefill (helper)
                if mt.mtmd_encode_chunk(ctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                vision = time.perf_counter() - tv
                new_past = lc.llama_pos(0)
                if (
                    mt.mtmd_helper_eval_chunk_single(
                        ctx,
                        llm._ctx.ctx,
                        chunk,
                        lc.llama_pos(llm.n_tokens),
                        lc.llama_seq_id(0),
                        llm.n_batch,
                        False,
                        ctypes.byref(new_past),
                    )
                    != 0
                ):
                    raise RuntimeError("mtmd_helper_eval_chunk_single failed")
                llm.n_tokens = new_past.value
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
        t_first = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
        t_end = time.perf_counter()
        mt.mtmd_input_chunks_free(chunks)
        mt.mtmd_bitmap_free(bitmap)
        # the helper encodes the image again inside its prefill, so the CLIP time is counted once and removed
        # from the TTFT: ttft = (first token - start) - vision, the double encode would otherwise penalise it
        ttft = (t_first - t) - vision
        return {
            "preprocess_s": 0.0,
            "vision_s": vision,
            "prefill_s": ttft - vision,
            "prefill_tokens_per_s": prompt / (ttft - vision),
            "ttft_s": ttft,
            "decode_tokens_per_s": (n - 1) / (t_end - t_first) if n > 1 else 0.0,
            "end_to_end_s": ttft + (t_end - t_first),
            "prompt_tokens": prompt,
            "new_tokens": n,
        }

    for _ in range(a.warmup):
        once(min(a.new_tokens, WARMUP_TOKENS))
    r = once(a.new_tokens)
    mt.mtmd_free(ctx)
    return {
        **r,
        "load_s": load,
        "peak_rss_bytes": _rss(),
        "weight_bytes": os.path.getsize(a.model),
        "resident_weight_bytes": os.path.getsize(a.model) + os.path.getsize(a.mmproj),
        "detail": "image + question through mtmd (mmproj f16); prefill tok/s excludes the CLIP encode",
    }


def _text_only_timings(t: float, t_first: float, t_end: float, prompt: int, n: int) -> dict:
    """Stage figures of a text-only peer: prefill = prompt -> first token, decode = the n - 1 tokens after it."""
    return {
        "preprocess_s": 0.0,
        "vision_s": None,
        "prefill_s": t_first - t,
        "prefill_tokens_per_s": prompt / (t_first - t),
        "ttft_s": None,
        "decode_tokens_per_s": (n - 1) / (t_end - t_first) if n > 1 else 0.0,
        "end_to_end_s": None,
        "prompt_tokens": prompt,
        "new_tokens": n,
    }


def worker_genai(a) -> dict:
    import onnxruntime_genai as og

    ids = _text_only_ids(Path(a.bundle), a.prompt_tokens)
    t0 = time.perf_counter()
    cfg = og.Config(a.model)
    cfg.clear_providers()  # CPU
    model = og.Model(cfg)
    load = time.perf_counter() - t0
    total = len(ids) + a.new_tokens

    def once(n=a.new_tokens):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)  # prefill (computes the first logits)
        gen.generate_next_token()  # samples token 1 from those logits
        t_first = time.perf_counter()
        for _ in range(n - 1):
            gen.generate_next_token()  # runs the model on the last token, samples the next
        t_end = time.perf_counter()
        return _text_only_timings(t, t_first, t_end, len(ids), n)

    for _ in range(a.warmup):
        once(min(a.new_tokens, WARMUP_TOKENS))
    r = once()
    size = sum(f.stat().st_size for f in Path(a.model).glob("*.onnx*"))
    return {
        **r,
        "load_s": load,
        "peak_rss_bytes": _rss(),
        "weight_bytes": size,
        "detail": "text only (its builder graph)",
    }


WORKERS = {
    "skin": worker_skin,
    "transformers": worker_transformers,
    "llama": worker_llama,
    "llama-mtmd": worker_llama_mtmd,
    "genai": worker_genai,
}


def cmd_worker(a) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    print("RESULT " + json.dumps(WORKERS[a.kind](a)), flush=True)


# --- orchestration -------------------------------------------------------------------------------


def discover(cache: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """(peers to run, [(peer, reason skipped)])."""
    models, peers, skipped = cache / "models", [], []
    base = models / "bundle-bench"
    if not (base / "manifest.json").exists():
        return [], [("everything", f"no bench bundle at {base}; run `python benchmarks/compare.py setup`")]
    from skin_offline import names
    from skin_offline.manifest import Manifest

    for b in sorted(models.glob("bundle-bench*")):
        if (b / "manifest.json").exists():
            m = Manifest.read(b)
            suffix = "" if b == base else f" ({b.name})"
            for prec in sorted({g.precision.value for g in m.variants(names.ROLE_DECODER)}):
                peer = {
                    "name": f"skin-offline {prec}{suffix}",
                    "kind": "skin",
                    "python": sys.executable,
                    "model": str(b),
                    "precision": prec,
                    "prefill": "decoder",
                }
                if m.multi_row_partner(m.pick(names.ROLE_DECODER, prec)) is not None:  # hybrid: with and without
                    peers.append({**peer, "name": f"skin-offline {prec} + int8 prefill{suffix}", "prefill": "int8"})
                peers.append(peer)
    hf = models / "ckpt-hf"
    if (hf / "config.json").exists():
        peers.append({"name": "transformers fp32", "kind": "transformers", "python": sys.executable, "model": str(hf)})
    else:
        skipped.append(("transformers fp32", f"no hf-layout checkpoint at {hf}"))
    py = peers_python(cache)

    def has(mod):
        return py.exists() and subprocess.run([str(py), "-c", f"import {mod}"], capture_output=True).returncode == 0

    for name in GGUF_TYPES:
        g = models / f"mistral-{name}.gguf"
        if not has("llama_cpp"):
            skipped.append((f"llama.cpp {name}", f"llama-cpp-python not built in {py.parent.parent}"))
        elif not g.exists():
            skipped.append((f"llama.cpp {name}", f"{g.name} missing (setup's GGUF step failed? see setup.log)"))
        else:
            peers.append({"name": f"llama.cpp {name.upper()}", "kind": "llama", "python": str(py), "model": str(g)})
    g, mmproj, lib = models / "mistral-q4_0.gguf", models / MMPROJ, cache / "build-mtmd" / "bin"
    if not (mmproj.exists() and (lib / "libmtmd.so").exists() and g.exists()):
        skipped.append(
            ("llama.cpp Q4_0 + mmproj", "mtmd library or mmproj missing (setup's mtmd step failed? see setup.log)")
        )
    else:  # mtmd_cpp loads libmtmd from MTMD_CPP_LIB; its libllama/libggml sonames resolve to the ones already loaded
        peers.append(
            {
                "name": "llama.cpp Q4_0 + mmproj",
                "kind": "llama-mtmd",
                "python": str(py),
                "model": str(g),
                "mmproj": str(mmproj),
                "env": {"MTMD_CPP_LIB": str(lib)},
            }
        )
    for p in GENAI_PRECISIONS:
        g = models / f"genai-{p}"
        if not has("onnxruntime_genai"):
            skipped.append((f"ort-genai {p}", "onnxruntime-genai not installed in the peers venv"))
        elif not (g / "genai_config.json").exists():
            skipped.append((f"ort-genai {p}", f"{g.name} missing (builder step failed? see setup.log)"))
        else:
            peers.append({"name": f"ort-genai {p}", "kind": "genai", "python": str(py), "model": str(g)})
    return peers, skipped


def run_one(peer: dict, a, bundle: Path) -> dict:
    cmd = [
        peer["python"],
        str(Path(__file__).resolve()),
        "worker",
        peer["kind"],
        "--model",
        peer["model"],
        "--bundle",
        str(bundle),
        "--threads",
        str(a.threads),
        "--prompt-tokens",
        str(a.prompt_tokens),
        "--new-tokens",
        str(a.new_tokens),
        "--warmup",
        str(a.warmup),
    ]
    for key in ("precision", "prefill"):
        if peer.get(key):
            cmd += [f"--{key}", peer[key]]
    if peer.get("mmproj"):
        cmd += ["--mmproj", peer["mmproj"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(REPO), **peer.get("env", {})}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"{describe_exit(r.returncode)}: {tail[0][:300]}"}


def summarize(results: dict[str, list[dict]], baseline: str, bandwidth: float | None) -> list[dict]:
    keys = ("vision_s", "prefill_tokens_per_s", "ttft_s", "decode_tokens_per_s", "end_to_end_s", "peak_rss_bytes")
    rows = []
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        row = {"peer": name, "runs": len(ok), "errors": [r["error"] for r in runs if "error" in r]}
        for k in keys:
            vals = [r[k] for r in ok if r.get(k) is not None]
            row[k] = statistics.median(vals) if vals else None
            row[k + "_range"] = (min(vals), max(vals)) if vals else None
        if ok:
            row["detail"], row["prompt_tokens"], row["new_tokens"] = (
                ok[0]["detail"],
                ok[0]["prompt_tokens"],
                ok[0]["new_tokens"],
            )
            row["weight_bytes"] = ok[0]["weight_bytes"]
            if ok[0].get("resident_weight_bytes"):  # peak RSS / (every weight file it maps + its KV cache)
                row["rss_ratio"] = row["peak_rss_bytes"] / (ok[0]["resident_weight_bytes"] + ok[0].get("kv_bytes", 0))
            if bandwidth:  # decode roofline for this peer's own bytes per token (weights + fp32/fp16 KV ignored: small)
                row["roofline_tokens_per_s"] = bandwidth * 1e9 / ok[0]["weight_bytes"]
        rows.append(row)
    base = next((r for r in rows if r["peer"] == baseline), None)
    # TTFT needs an image: the baseline's multimodal run (llama.cpp + mmproj) when there is one
    tbase = next((r for r in rows if r["peer"].startswith(baseline) and r.get("ttft_s")), base)
    for r in rows:
        for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            r[k + "_ratio"] = r[k] / base[k] if base and base.get(k) and r.get(k) else None
        r["ttft_ratio"] = r["ttft_s"] / tbase["ttft_s"] if tbase and tbase.get("ttft_s") and r.get("ttft_s") else None
        if r.get("roofline_tokens_per_s") and r.get("decode_tokens_per_s"):
            r["fraction_of_roofline"] = r["decode_tokens_per_s"] / r["roofline_tokens_per_s"]
    return rows


def markdown(rows: list[dict], skipped, meta: dict) -> str:
    def f(v, p=1):
        return "-" if v is None else f"{v:.{p}f}"

    out = [
        f"prompt {meta['prompt_tokens']} tokens, {meta['new_tokens']} new tokens, {meta['threads']} threads, "
        f"{meta['runs']} interleaved rounds, medians (min-max); ratios vs {meta['baseline']}; "
        f"roofline from the best of {len(meta.get('bandwidth_probes_gb_per_s', [])) or 1} bandwidth probes: "
        f"{f(meta['bandwidth_gb_per_s'])} GB/s (probes {f(min(meta.get('bandwidth_probes_gb_per_s') or [0]))}-"
        f"{f(max(meta.get('bandwidth_probes_gb_per_s') or [0]))}); llama.cpp built with {meta.get('llama_cmake_flags', '?')}",
        "",
        "| peer | prefill tok/s | decode tok/s | decode ratio | % of roofline | vision s | TTFT s | TTFT ratio | peak RSS GB | RSS / (weights+KV) | decoder weights GB | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:

        def rng(k, r=r):
            return "" if not r.get(k + "_range") else f" ({r[k + '_range'][0]:.1f}-{r[k + '_range'][1]:.1f})"

        pct = "-" if r.get("fraction_of_roofline") is None else f"{100 * r['fraction_of_roofline']:.0f}%"
        note = "; ".join([r.get("detail") or ""] + r["errors"][:1])
        out.append(
            f"| {r['peer']} | {f(r['prefill_tokens_per_s'])}{rng('prefill_tokens_per_s')} | "
            f"{f(r['decode_tokens_per_s'])}{rng('decode_tokens_per_s')} | {f(r['decode_tokens_per_s_ratio'], 2)} | {pct} | "
            f"{f(r['vision_s'], 2)} | {f(r['ttft_s'], 2)} | {f(r.get('ttft_ratio'), 2)} | {f((r['peak_rss_bytes'] or 0) / 1e9, 2)} | "
            f"{f(r.get('rss_ratio'), 2)} | "
            f"{f((r.get('weight_bytes') or 0) / 1e9, 2)} | {note} |"
        )
    for name, why in skipped:
        out.append(f"| {name} | skipped | | | | | | | | | | {why} |")
    return "\n".join(out)


def cmd_run(a) -> None:
    from skin_offline.bench.machine import machine_info

    cache = Path(a.cache)
    peers, skipped = discover(cache)
    if a.peers:
        keep = [p for p in peers if any(s.lower() in p["name"].lower() for s in a.peers)]
        skipped += [(p["name"], "not selected (--peers)") for p in peers if p not in keep]
        peers = keep
    bundle = cache / "models" / "bundle-bench"
    from skin_offline.bench.machine import probe_bandwidth

    results = {p["name"]: [] for p in peers}
    probes = []  # this machine's bandwidth moves with its neighbours (34-65 GB/s seen): probe every round
    for rnd in range(a.runs):
        probes.append(probe_bandwidth(a.threads).gb_per_s)
        print(f"round {rnd + 1}/{a.runs} bandwidth probe {probes[-1]:.1f} GB/s", flush=True)
        order = peers if rnd % 2 == 0 else peers[::-1]  # alternate the order: no peer always runs first
        for p in order:
            t0 = time.time()
            try:
                r = run_one(p, a, bundle)
            except subprocess.TimeoutExpired:
                r = {"error": f"timed out after {a.timeout}s"}
            results[p["name"]].append(r)
            print(
                f"round {rnd + 1}/{a.runs} {p['name']}: "
                + (
                    r["error"]
                    if "error" in r
                    else f"prefill {r['prefill_tokens_per_s']:.1f} tok/s, decode {r['decode_tokens_per_s']:.2f} tok/s"
                )
                + f" ({time.time() - t0:.0f}s)",
                flush=True,
            )
    info = machine_info(bandwidth=True, threads=a.threads)
    probes.append(info.bandwidth.gb_per_s)
    # the roofline uses the best probe: what the memory system can deliver to these threads (a median would
    # credit a peer for rounds where the probe happened to run while a neighbour loaded the machine)
    bw = max(probes)
    baseline = a.baseline or next(
        (p["name"] for p in peers if p["name"].startswith("llama.cpp Q4_0")), peers[0]["name"] if peers else ""
    )
    rows = summarize(results, baseline, bw)
    meta = {
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "threads": a.threads,
        "runs": a.runs,
        "baseline": baseline,
        "bandwidth_gb_per_s": bw,
        "bandwidth_probes_gb_per_s": probes,
        "machine": info.to_dict(),
        "llama_cmake_flags": llama_flags(cache),
    }
    table = markdown(rows, skipped, meta)
    print(table)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "compare.json").write_text(
            json.dumps({"meta": meta, "rows": rows, "skipped": skipped, "raw": results}, indent=2)
        )
        Path(a.out, "compare.md").write_text(table + "\n")
    failed = [r for r in rows if r["errors"]]
    if failed:  # a crashed or failing peer fails the run, loudly, instead of leaving an empty row
        for r in failed:
            print(f"FAILED {r['peer']}: {len(r['errors'])} of {a.runs} rounds: {r['errors'][0]}", file=sys.stderr)
        raise SystemExit(1)


def cmd_report(a) -> None:
    """Re-render a saved run (compare.json) with this version's summary and table."""
    d = json.loads(Path(a.folder, "compare.json").read_text())
    meta = d["meta"]
    meta["bandwidth_gb_per_s"] = max(meta.get("bandwidth_probes_gb_per_s") or [meta["bandwidth_gb_per_s"]])
    rows = summarize(d["raw"], meta["baseline"], meta["bandwidth_gb_per_s"])
    print(markdown(rows, [tuple(x) for x in d["skipped"]], meta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="make the checkpoint, bundles and peers in the cache")
    s.add_argument("--cache", default=str(DEFAULT_CACHE))
    s.add_argument("--preset", default="bench")
    s.add_argument("--quantize", nargs="*", default=["int4", "int8"], help="skin-offline precisions to make")
    s.add_argument("--skip-peers", action="store_true")
    r = sub.add_parser("run", help="interleaved measurement of every available peer")
    r.add_argument("--cache", default=str(DEFAULT_CACHE))
    r.add_argument("--runs", type=int, default=3)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--prompt-tokens", type=int, default=600)
    r.add_argument("--new-tokens", type=int, default=128)
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    r.add_argument("--peers", nargs="*", help="substrings of peer names to keep")
    r.add_argument("--baseline", help="peer name the ratios divide by (default: llama.cpp Q4_0)")
    r.add_argument("--timeout", type=int, default=900, help="seconds per measured process")
    r.add_argument("--out", help="folder for compare.json + compare.md")
    rp = sub.add_parser("report", help="print the table of a saved run (FOLDER/compare.json)")
    rp.add_argument("folder")
    w = sub.add_parser("worker")
    w.add_argument("kind", choices=sorted(WORKERS))
    for flag in ("--model", "--bundle", "--precision", "--mmproj", "--prefill"):
        w.add_argument(flag)
    for flag, d in (("--threads", 2), ("--prompt-tokens", 600), ("--new-tokens", 128), ("--warmup", 1)):
        w.add_argument(flag, type=int, default=d)
    a = ap.parse_args()
    {"setup": cmd_setup, "run": cmd_run, "report": cmd_report, "worker": cmd_worker}[a.cmd](a)


if __name__ == "__main__":
    main()
