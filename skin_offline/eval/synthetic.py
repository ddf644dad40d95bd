"""A synthetic image set for trying `eval` / `classify-eval` without the (non-public) MM-Skin images.

    python -m skin_offline.eval.synthetic MM-Skin_test.csv demo-eval --rows 20

writes demo-eval/q.csv (the first N rows), demo-eval/modality.csv (modalities assigned round-robin:
they are placeholders, not the real ones), demo-eval/labels.csv (random HAM10000 labels with sex and
age columns) and one random-noise PNG per distinct image path under demo-eval/images/.
Numbers computed on it are meaningless; it exercises the pipeline.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from .classify_eval import label_set
from .runlog import read_csv, require_columns


def write_synthetic_set(csv_path: Path, out: Path, rows: int = 20, seed: int = 0) -> Path:
    src = read_csv(csv_path)
    require_columns(src, csv_path, "image", "question", "answer")
    src = src[:rows]
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = sorted({r["image"] for r in src})
    for name in images:
        path = out / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(120, 400, 2)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(
            path, format="PNG"
        )  # name kept as in the CSV
    with open(out / "q.csv", "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=["image", "question", "answer"])
        wr.writeheader()
        wr.writerows({k: r[k] for k in ("image", "question", "answer")} for r in src)
    modalities = ("clinical", "dermoscopy", "pathology")
    with open(out / "modality.csv", "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["image", "modality"])
        wr.writerows([name, modalities[i % 3]] for i, name in enumerate(images))
    labels = label_set("HAM10000")
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["image", "label", "sex", "age"])
        wr.writerows(
            [name, labels[rng.integers(len(labels))], ("female", "male")[rng.integers(2)], int(rng.integers(18, 90))]
            for name in images
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_synthetic_set(a.csv, a.out, a.rows, a.seed))


if __name__ == "__main__":
    main()
