"""The full-7B-shape export with calibrated int4 (issue 22): the dry run's prediction, then the export itself timed.

    python scripts/make_full_checkpoint.py CKPT                  # random bf16 checkpoint of the full shape, ~15 GB
    nice python benchmarks/export_7b.py CKPT OUT [--threads 2] [-- extra export options]

Runs `skin-offline export CKPT OUT --precision int4 --threads T` under `/usr/bin/time -v` (peak RSS = its "Maximum
resident set size"), polls the bytes under OUT and its hidden build folder every 2 s (disk high-water), and prints
both next to what `--dry-run` predicted (files, disk, peak memory, the calibrated pass's time at the GEMM rate it
measured). The stage times come from the export's own progress lines (kept in OUT.log).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path


def folder_bytes(parent: Path, name: str) -> int:
    total = 0
    for entry in parent.iterdir():
        if entry.name == name or entry.name.startswith(f".{name}"):
            for dirpath, _, files in os.walk(entry):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(dirpath, f))
                    except OSError:
                        pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    a, extra = ap.parse_known_args()  # after `--`: export options (argparse's nargs="*" positional refuses them)
    a.extra = [x for x in extra if x != "--"]
    cli = [
        sys.executable,
        "-m",
        "skin_offline.cli",
        "export",
        str(a.checkpoint),
        str(a.out),
        "--precision",
        "int4",
        "--threads",
        str(a.threads),
        *a.extra,
    ]
    dry = subprocess.run([*cli, "--dry-run"], capture_output=True, text=True)
    print(dry.stdout + dry.stderr, flush=True)
    high, stop = [0], threading.Event()

    def poll():
        while not stop.is_set():
            high[0] = max(high[0], folder_bytes(a.out.parent, a.out.name))
            stop.wait(2)

    threading.Thread(target=poll, daemon=True).start()
    log = a.out.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(["/usr/bin/time", "-v", *cli], stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    stop.set()
    text = log.read_text(errors="replace")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    bundle = sum(p.stat().st_size for p in a.out.iterdir() if p.is_file()) if a.out.is_dir() else 0
    print(
        f"exit {done.returncode}; wall {wall / 60:.1f} min; peak RSS {rss / 1e9:.2f} GB; disk high-water "
        f"{high[0] / 1e9:.2f} GB = {high[0] / max(bundle, 1):.2f}x the {bundle / 1e9:.2f} GB bundle; log {log}"
    )
    for line in text.splitlines():
        if re.search(r" in \d+:\d\d|calibrating|verification passed|bundle written|error", line):
            print("  " + line[-200:])


if __name__ == "__main__":
    main()
