#!/usr/bin/env python3
"""Write a random-weight SkinVL checkpoint of the full 7B shape (CLIP ViT-L/14-336 + Mistral-7B) in bf16
safetensors shards, one tensor in memory at a time (~15 GB on disk, ~1 GB RAM), for the full-scale
export check. Cached outside the repo; a no-op when a complete copy is already there.

    python scripts/make_full_checkpoint.py [OUT] [--layers 32] [--shard-gb 4] [--tokenizer model|json|both]
                                           [--lora-out ADAPTER_DIR]

OUT defaults to $SKIN_OFFLINE_CACHE/full-7b (or /work/.cache-skinvl/full-7b). The CLIP tower goes to
OUT-clip and config.json names it by absolute path. Then, for the documented full-scale run:

    skin-offline export OUT BUNDLE --dry-run          # sizes, free disk, expected peak memory
    /usr/bin/time -v skin-offline export OUT BUNDLE --no-verify
    /usr/bin/time -v skin-offline export --base OUT --lora ADAPTER_DIR BUNDLE --no-verify

The fp32 bundle is ~58 GB (standard + contrib decoder). Where the disk cannot hold it, `--measure-export
BUNDLE [--lora-out ADAPTER_DIR]` runs the same export in this process with the graphs' external data sent
to /dev/null (everything else written) and prints the peak RSS (VmHWM), wall time and per-file data sizes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

DONE = ".complete"


def default_out() -> Path:
    return Path(os.environ.get("SKIN_OFFLINE_CACHE", "/work/.cache-skinvl")) / "full-7b"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=default_out())
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Mistral-7B)")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--tokenizer", choices=("model", "json", "both"), default="model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--lora-out",
        type=Path,
        default=None,
        help="also write an MM-Skin-shaped LoRA output (r=128, alpha=64 + non_lora_trainables.bin) here",
    )
    ap.add_argument(
        "--measure-export",
        type=Path,
        default=None,
        metavar="BUNDLE",
        help="after writing, export to BUNDLE with external data discarded and report peak RSS",
    )
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from skin_offline.export.factory import (
        FULL_SPEC,
        checkpoint_bytes,
        write_streaming_checkpoint,
        write_streaming_lora_adapter,
    )
    from skin_offline.export.tokenizer import find_mistral_tokenizer_model

    out: Path = args.out.resolve()
    spec = replace(FULL_SPEC, layers=args.layers)
    if args.lora_out is not None:
        write_streaming_lora_adapter(args.lora_out, spec)
        print(f"LoRA adapter written to {args.lora_out}", file=sys.stderr)
    if (out / DONE).exists():
        print(f"{out} already complete; delete it to regenerate", file=sys.stderr)
        return measure_export(out, args.measure_export, args.lora_out) if args.measure_export else 0
    total = checkpoint_bytes(spec, torch.bfloat16)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path("/")).free
    if free < total * 1.1:
        print(f"error: {total / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free under {out.parent}", file=sys.stderr)
        return 1
    for p in (out, out.parent / f"{out.name}-clip"):
        shutil.rmtree(p, ignore_errors=True)  # an interrupted earlier run
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing bf16 shards", file=sys.stderr) as bar:
        write_streaming_checkpoint(
            out,
            spec,
            find_mistral_tokenizer_model(),
            dtype=torch.bfloat16,
            seed=args.seed,
            shard_bytes=int(args.shard_gb * (1 << 30)),
            tokenizer=args.tokenizer,
            progress=bar.update,
        )
    (out / DONE).write_text(f"{total}\n")
    print(f"{out}: {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return measure_export(out, args.measure_export, args.lora_out) if args.measure_export else 0


def measure_export(ckpt: Path, bundle: Path, lora: Path | None) -> int:
    """The streaming export with every external-data byte counted and discarded (no 58 GB of disk needed)."""
    import json

    from skin_offline.export import onnx_writer
    from skin_offline.export.to_onnx import export_bundle

    sizes: dict[str, int] = {}

    def init(self, path):
        self.path, self._fh, self.offset = Path(path), open(os.devnull, "wb"), 0

    def close(self):
        sizes[self.path.name] = self.offset
        self._fh.close()

    onnx_writer.ExternalData.__init__, onnx_writer.ExternalData.close = init, close
    t0 = time.perf_counter()
    export_bundle(ckpt, bundle, lora=lora, verify=False, log=lambda m: print(m, file=sys.stderr))
    hwm = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) * 1024
    print(
        json.dumps(
            {
                "peak_rss_bytes": hwm,
                "wall_s": round(time.perf_counter() - t0, 1),
                "data_bytes": sizes,
                "note": f"external data discarded; {bundle} holds graphs without weights: delete it",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
