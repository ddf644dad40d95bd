#!/usr/bin/env bash
# GPU path check, for a machine with an NVIDIA GPU (CI has none). About 5-8 minutes.
#
#   python -m venv .venv-gpu && .venv-gpu/bin/pip install -e '.[export,bench,gpu]' && .venv-gpu/bin/pip uninstall -y onnxruntime
#   .venv-gpu/bin/pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1   # onnxruntime and -gpu share a module
#   PY=.venv-gpu/bin/python scripts/gpu_check.sh [OUT_DIR]
#
# 1. environment (nvidia-smi, providers) -> OUT/env.txt
# 2. tiny bundle (+ fp16): CUDA provider parity vs the fp32 CPU run -> OUT/parity.json; fails on a mismatch
#      fp32 on CUDA (TF32 off): teacher-forced logits max |diff| <= 1e-3, greedy tokens identical
#      fp16 on CUDA: teacher-forced logits max |diff| <= 2e-2 x logit scale, greedy tokens identical for the
#      first 16 (the tiny model's logits are well separated; a real mistake moves them by O(1))
# 3. TensorRT (only where onnxruntime has it): build-engines --fp16 on the tiny bundle, same parity
# 4. bench preset (exact SkinVL widths, 4 decoder layers): `skin-offline bench --device cuda` fp32 and fp16
#    -> OUT/bench-cuda-*.json
set -euo pipefail
OUT=${1:-gpu-check}
PY=${PY:-.venv/bin/python}
# DEVICE=cpu runs every step on the CPU: a dry run of this script's own logic, NOT a GPU verification
DEVICE=${DEVICE:-cuda}
CLI=("$PY" -m skin_offline.cli)
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"
export SKIN_OFFLINE_DEBUG=1
t0=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - t0 ))s)"; }

step environment
{ nvidia-smi 2>&1 || true; "$PY" -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"; } | tee "$OUT/env.txt"
[ "$DEVICE" = cpu ] || "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 5)" \
  || { echo "no CUDAExecutionProvider: install onnxruntime-gpu (see the top of this script)"; exit 5; }

step tiny bundle
"${CLI[@]}" make-demo-checkpoint "$WORK/tiny-ckpt" --preset tiny
"${CLI[@]}" export "$WORK/tiny-ckpt" "$WORK/tiny" --no-verify
"${CLI[@]}" quantize "$WORK/tiny" "$WORK/tiny-fp16" --precision fp16 --no-quality

if [ "$DEVICE" != cpu ] && "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'TensorrtExecutionProvider' in o.get_available_providers() else 1)"; then
  step tensorrt engines
  "${CLI[@]}" build-engines "$WORK/tiny" --fp16 --max-context 256 2>&1 | tee "$OUT/tensorrt.txt" || echo "build-engines failed (see $OUT/tensorrt.txt)"
fi

step parity
"$PY" - "$WORK" "$OUT" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from skin_offline.runtime.bundle import Bundle
from skin_offline.runtime.devices import resolve, available_providers
from skin_offline.runtime.pipeline import SkinVL
from skin_offline.runtime.sessions import SessionFactory
from skin_offline.runtime.tokenizer import TextTokenizer
from skin_offline.runtime.prompt import Prompt, build_prompt_ids

work, out, dev = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
image = Image.fromarray((rng.random((90, 120, 3)) * 255).astype(np.uint8))
Q, N = "What is this lesion? Describe its border.", 32

def model(folder, device, precision=None, **cuda):
    s = SessionFactory(threads=2, device=resolve(device, cuda_options=cuda or None)) if device != "tensorrt" else None
    b = Bundle.load(folder, precision=precision, sessions=s, device=device if s is None else None,
                    allow_cpu_fp16=device == "cpu")  # only the DEVICE=cpu dry run runs fp16 on the CPU
    return SkinVL(b, TextTokenizer.from_file(folder / "tokenizer.json"), feature_cache_size=0)

def teacher_forced(m, tokens):
    ids = build_prompt_ids(m.tokenizer, Q)
    feats = m.image_features(m.pixels(image))  # [N,H]
    emb = Prompt.of(ids, feats.shape[0]).embeds(m.bundle.embed, feats)[None]  # [1,S,H]
    full = np.concatenate([emb[0], m.bundle.embed(tokens[:-1])])[None]
    return m.bundle.decoder.logits_all(full.astype(np.float32))[0, emb.shape[1] - 1:].astype(np.float32)  # [N,V]

ref = model(work / "tiny", "cpu")
ref_tokens = ref.ask(image, Q, max_new_tokens=N).token_ids
ref_logits = teacher_forced(ref, ref_tokens)
scale = float(np.abs(ref_logits).max())
cases = [(f"{dev} fp32", work / "tiny", dev, None, {"use_tf32": "0"}, 1e-3, N),
         (f"{dev} fp16", work / "tiny-fp16", dev, "fp16", {}, 2e-2 * scale, 16)]
if dev != "cpu" and "TensorrtExecutionProvider" in available_providers() and (work / "tiny" / "engines").exists():
    cases.append(("tensorrt fp16", work / "tiny", "tensorrt", None, {}, 2e-2 * scale, 16))
report, ok = {"reference": "fp32 CPU", "tokens": ref_tokens, "logit_scale": scale}, True
for name, folder, dev, prec, opts, tol, n_same in cases:
    m = model(folder, dev, prec, **opts)
    providers = m.bundle.decoder.session.get_providers()
    kind = type(m.bundle.decoder).__name__  # DeviceDecoder on a GPU: the KV cache never leaves the device
    if dev != "cpu" and kind != "DeviceDecoder":
        print(f"{name}: decoder is {kind}, expected DeviceDecoder"); ok = False
    tokens = m.ask(image, Q, max_new_tokens=N).token_ids
    diff = float(np.abs(teacher_forced(m, ref_tokens) - ref_logits).max())
    same = tokens[:n_same] == ref_tokens[:n_same]
    report[name] = {"providers": providers, "decoder": kind, "max_abs_logit_diff": diff, "tolerance": tol, "tokens": tokens,
                    "first_tokens_identical": same, "n_compared": n_same, "pass": bool(diff <= tol and same)}
    ok &= report[name]["pass"]
    print(f"{name}: {providers[0]}, max |logit diff| {diff:.2e} (tol {tol:.1e}), first {n_same} tokens identical: {same}")
(out / "parity.json").write_text(json.dumps(report, indent=2))
sys.exit(0 if ok else 1)
EOF

[ "${BENCH:-1}" = 1 ] || { step "done (BENCH=0: bench preset skipped): results in $OUT"; exit 0; }
step bench preset bundle
"${CLI[@]}" make-demo-checkpoint "$WORK/bench-ckpt" --preset bench
"${CLI[@]}" export "$WORK/bench-ckpt" "$WORK/bench" --no-verify
"${CLI[@]}" quantize "$WORK/bench" "$WORK/bench-fp16" --precision fp16 --no-quality
step bench
"${CLI[@]}" bench "$WORK/bench" --device "$DEVICE" --runs 3 --warmup 1 --prompt-tokens 600 --new-tokens 64 --json > "$OUT/bench-$DEVICE-fp32.json"
[ "$DEVICE" = cpu ] || "${CLI[@]}" bench "$WORK/bench-fp16" --device "$DEVICE" --precision fp16 --runs 3 --warmup 1 --prompt-tokens 600 --new-tokens 64 \
  --json --chart "$OUT/bench-$DEVICE-fp16.png" > "$OUT/bench-$DEVICE-fp16.json"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("bench-*.json")):
    d = json.loads(f.read_text()); m = d["medians"]
    print(f"{f.stem}: {d['model']['provider']} ttft {m['ttft_s']:.3f}s vision {m['vision_s']:.3f}s "
          f"prefill {m['prefill_tokens_per_s']:.0f} tok/s decode {m['decode_tokens_per_s']:.1f} tok/s")
EOF
step "done: results in $OUT"
