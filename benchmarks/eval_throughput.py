"""`eval` questions/minute and `classify-eval` images/minute of this checkout vs another source tree, interleaved.

    git worktree add --detach /tmp/base <commit>      # the baseline's source (same venv: only the package differs)
    .venv/bin/python benchmarks/eval_throughput.py --bundle bundles/bench-int4 --before /tmp/base \\
        [--rows 8] [--batch 4] [--max-new-tokens 64] [--rounds 3] [--threads 2] [--json]

Builds a synthetic set from MM-Skin's public test CSV (eval/synthetic.py: noise images, one per distinct image
path), then per round runs, alternating which goes first: `eval --protocol paper --batch B` and `classify-eval
--label-set HAM10000` with the baseline's package (PYTHONPATH=BEFORE) and with this checkout's (which also runs
`classify-eval --batch B`, an option the baseline does not have). Rates are each
run's own `this_run` figure from summary.json (answering time only: the bundle load is excluded). Reports medians
and the after/before ratio. The machine is shared and noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
MMSKIN_CSV = HERE.parent / "shared" / "data" / "MM-Skin_test.csv"


def run(src: Path | None, args: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if src is not None:  # the baseline's package first on the path (before the venv's editable install)
        env["PYTHONPATH"] = str(src)
    r = subprocess.run(
        [sys.executable, "-m", "skin_offline.cli", *args, "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(src or HERE),
    )
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed ({src or 'this checkout'}): {r.stderr.strip()[-500:]}")
    return json.loads((out / "summary.json").read_text())["this_run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--before", type=Path, required=True, help="source tree of the baseline (its skin_offline/)")
    ap.add_argument("--csv", type=Path, default=MMSKIN_CSV)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skin-eval-bench-"))
    try:
        from skin_offline.eval.synthetic import write_synthetic_set

        data = write_synthetic_set(a.csv, tmp / "set", rows=a.rows)
        common = [str(a.bundle), "--images", str(data / "images"), "--threads", str(a.threads)]
        vqa = [
            "eval",
            *common,
            "--csv",
            str(data / "q.csv"),
            "--protocol",
            "paper",
            "--batch",
            str(a.batch),
            "--max-new-tokens",
            str(a.max_new_tokens),
        ]
        cls = ["classify-eval", *common, "--csv", str(data / "labels.csv"), "--label-set", "HAM10000"]
        rates: dict[str, dict[str, list[float]]] = {k: {"before": [], "after": []} for k in ("eval", "classify")}
        rates["classify"]["after_batch"] = []  # this checkout's classify-eval --batch B (the baseline has no --batch)
        for i in range(a.rounds):
            order = [("before", a.before), ("after", None)]
            for side, src in order if i % 2 == 0 else order[::-1]:
                rates["eval"][side].append(run(src, vqa, tmp / "out")["questions_per_minute"])
                rates["classify"][side].append(run(src, cls, tmp / "out")["images_per_minute"])
                if side == "after":
                    rates["classify"]["after_batch"].append(
                        run(None, [*cls, "--batch", str(a.batch)], tmp / "out")["images_per_minute"]
                    )
                print(
                    f"round {i + 1} {side}: eval {rates['eval'][side][-1]:.2f} q/min, "
                    f"classify {rates['classify'][side][-1]:.2f} img/min",
                    file=sys.stderr,
                )
        med = {k: {s: statistics.median(v) for s, v in d.items()} for k, d in rates.items()}
        if a.json:
            print(json.dumps({"rates": rates, "medians": med}))
            return
        print(
            f"{a.rows} synthetic rows, bundle {a.bundle.name}, {a.threads} threads, {a.rounds} interleaved rounds (medians)"
        )
        print("| run | before | after | after / before |")
        print("| --- | --- | --- | --- |")
        print(
            f"| eval --protocol paper --batch {a.batch} --max-new-tokens {a.max_new_tokens} (questions/min) | "
            f"{med['eval']['before']:.2f} | {med['eval']['after']:.2f} | {med['eval']['after'] / med['eval']['before']:.2f}x |"
        )
        print(
            f"| classify-eval HAM10000 (images/min) | {med['classify']['before']:.2f} | {med['classify']['after']:.2f} | "
            f"{med['classify']['after'] / med['classify']['before']:.2f}x |"
        )
        print(
            f"| classify-eval HAM10000 --batch {a.batch} (after only; images/min) | {med['classify']['before']:.2f} "
            f"(batch 1) | {med['classify']['after_batch']:.2f} | {med['classify']['after_batch'] / med['classify']['before']:.2f}x |"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
