"""Zero-shot classification evaluation: predictions row by row (resumable), then accuracy, balanced
accuracy, macro-F1, per-class precision/recall, confusion matrix (CSV + PNG) and demographic slices.

Definitions (as scikit-learn's defaults, written out to avoid a heavy dependency for a few sums):
balanced accuracy = mean recall over the classes present in the ground truth; macro-F1 = mean F1 over
the classes present in the ground truth or the predictions; a class never predicted has precision 0.
A `generate` answer is constrained to the label set; one cut by its token limit names no label, counts as wrong and
appears as the column NO_LABEL.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from .choices import ClassifyMethod, Protocol
from .runlog import ERROR_FIELD, ResultLog, Source, WorkFn, local_source, read_csv, require_columns, run_rows

NO_LABEL = "(no label)"
LABEL_SETS = Path(__file__).with_name("data") / "zero_shot_labels.json"
SLICE_COLUMNS = {
    "age": ("age", "age_approx"),
    "sex": ("sex", "gender"),
    "skin_type": ("skin_type", "fitzpatrick", "fitzpatrick_scale", "skin_tone"),
}
FIELDS = ["image", "label", "prediction", "probability", "age", "sex", "skin_type", "seconds", ERROR_FIELD]


def label_set(name: str, path: Path = LABEL_SETS) -> list[str]:
    sets = json.loads(Path(path).read_text())["datasets"]
    if name not in sets:
        raise UsageError(f"unknown label set {name!r}; choose one of {', '.join(sets)}")
    return list(sets[name])


@dataclass(frozen=True)
class LabelRow:
    index: int
    image: str
    label: str
    slices: dict  # "age" / "sex" / "skin_type" -> value ("" when absent)


def read_label_rows(
    path: Path, labels: list[str], image_col: str = "image", label_col: str = "label", limit: int | None = None
) -> list[LabelRow]:
    raw = read_csv(path)
    require_columns(raw, path, image_col, label_col)
    canon = {lab.casefold(): lab for lab in labels}
    rows = []
    for i, r in enumerate(raw[:limit] if limit else raw):
        truth = canon.get(r[label_col].strip().casefold())
        if truth is None:
            raise UsageError(
                f"{path} row {i + 2}: label {r[label_col]!r} is not in the label set; fix the CSV or the set"
            )
        found = {k: next((r[c].strip() for c in cols if r.get(c, "").strip()), "") for k, cols in SLICE_COLUMNS.items()}
        rows.append(LabelRow(i, r[image_col], truth, found))
    return rows


def age_bin(value: str) -> str:
    try:
        age = float(value)
    except ValueError:
        return ""
    return "<30" if age < 30 else "30-49" if age < 50 else "50-69" if age < 70 else "70+"


def classification_metrics(truth: list[str], pred: list[str], classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1/support."""
    n = len(truth)
    per_class = {}
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(truth, pred))
        n_true, n_pred = truth.count(c), pred.count(c)
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_true if n_true else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[c] = {"precision": prec, "recall": rec, "f1": f1, "support": n_true, "predicted": n_pred}
    present_true = [c for c in classes if per_class[c]["support"]]
    present_any = [c for c in classes if per_class[c]["support"] or per_class[c]["predicted"]]
    return {
        "n": n,
        "accuracy": sum(t == p for t, p in zip(truth, pred)) / n if n else 0.0,
        "balanced_accuracy": sum(per_class[c]["recall"] for c in present_true) / len(present_true)
        if present_true
        else 0.0,
        "macro_f1": sum(per_class[c]["f1"] for c in present_any) / len(present_any) if present_any else 0.0,
        "no_label": pred.count(NO_LABEL),
        "per_class": per_class,
    }


def confusion(truth: list[str], pred: list[str], classes: list[str]) -> tuple[list[str], list[list[int]]]:
    """Rows = truth, columns = prediction (+ NO_LABEL when it occurs)."""
    cols = classes + ([NO_LABEL] if NO_LABEL in pred else [])
    at = {c: i for i, c in enumerate(cols)}
    m = [[0] * len(cols) for _ in classes]
    for t, p in zip(truth, pred):
        m[at[t]][at[p]] += 1
    return cols, m


def write_confusion(out: Path, classes: list[str], cols: list[str], m: list[list[int]]) -> None:
    with open(out / "confusion.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["truth \\ prediction", *cols])
        for c, row in zip(classes, m):
            w.writerow([c, *row])
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    size = 2 + 0.45 * max(len(cols), 4)
    fig, ax = plt.subplots(figsize=(size, size * len(classes) / len(cols) + 1))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    top = max(max(r) for r in m) or 1
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)


PredictFn = Callable[[Path], tuple[str, float]]  # image -> (predicted label, its probability or nan)


def generate_predictor(model, labels: list[str], protocol: Protocol, seed: int, max_new_tokens: int = 256):
    """The paper's generate protocol, constrained: the answer to the question (labels in set order) is exactly one of
    the labels (a choice constraint, runtime/constraints.py), so no matching heuristic is needed; an answer cut by
    max_new_tokens names no label. Returns image -> (label, nan, the answer's text)."""
    from dataclasses import replace

    from ..runtime.classify import question_for
    from ..runtime.constraints import Choice
    from ..runtime.response import FinishReason
    from .vqa import PAPER_BEAMS

    question, choice = question_for(labels), Choice(labels)

    def predict(image):
        if protocol is Protocol.PAPER:  # sampling inside 5 beams; min_new_tokens 0: a label is a complete answer
            cfg = replace(PAPER_BEAMS, seed=seed, max_new_tokens=max_new_tokens, min_new_tokens=0)
            a = model.generate_beam(image, question, config=cfg, constraint=choice)
        else:
            a = model.ask(image, question, max_new_tokens=max_new_tokens, constraint=choice)
        return (a.answer if a.finish_reason is FinishReason.STOP else NO_LABEL), float("nan"), a.answer

    return predict


def row_worker(predict: PredictFn) -> WorkFn:
    """The per-row work of `classify-eval`: classify the row's image, as a results record."""

    def work(r: LabelRow, image) -> dict:
        label, prob = predict(image)
        return {"image": r.image, "label": r.label, "prediction": label, "probability": f"{prob:.6f}", **r.slices}

    return work


@dataclass(frozen=True)
class ClassifyJob:
    """Everything a row's prediction depends on besides the model, small and picklable: a Ray actor builds its
    work from it exactly as a local run does (`ClassifyJob(...)(model)`)."""

    labels: tuple[str, ...]
    method: ClassifyMethod = ClassifyMethod.LIKELIHOOD
    normalize: bool = True
    protocol: Protocol = Protocol.GREEDY
    seed: int = 0
    max_new_tokens: int = 256

    def predictor(self, model) -> PredictFn:
        labels = list(self.labels)
        if self.method is ClassifyMethod.LIKELIHOOD:

            def predict(image):
                r = model.classify(image, labels, normalize=self.normalize)
                return r.top, r.scores[0].probability

            return predict
        gen = generate_predictor(model, labels, self.protocol, self.seed, self.max_new_tokens)
        return lambda image: gen(image)[:2]

    def __call__(self, model) -> WorkFn:
        return row_worker(self.predictor(model))


def run_classify_eval(
    predict: PredictFn,
    rows: list[LabelRow],
    classes: list[str],
    images: Path,
    out: Path,
    meta: dict | None = None,
    progress=None,
) -> dict:
    """Classify the pending rows in this process, then score; see evaluate_classify."""
    return evaluate_classify(local_source(row_worker(predict)), rows, classes, images, out, meta, progress)


def evaluate_classify(
    source: Source,
    rows: list[LabelRow],
    classes: list[str],
    images: Path,
    out: Path,
    meta: dict | None = None,
    progress=None,
) -> dict:
    """Classify the pending rows through `source` (resumable), then write the metrics, confusion matrix and
    summary; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = ResultLog(out / "predictions.csv", FIELDS, ("image", "label"))
    run = run_rows(rows, images, log, lambda r: {"image": r.image, "label": r.label}, source, "images", progress)
    recs, missing, answered, t_run = run.records, run.missing, run.answered, run.seconds
    if not recs:
        if run.errors:
            raise UsageError(
                f"no image could be classified: all {len(run.errors)} row(s) failed (the error column "
                f"of {log.path} says why)"
            )
        raise UsageError(f"no image could be classified: {len(missing)} missing under {images}; check --images")
    truth, pred = [r["label"] for r in recs], [r["prediction"] for r in recs]
    result = classification_metrics(truth, pred, classes)
    cols, m = confusion(truth, pred, classes)
    write_confusion(out, classes, cols, m)
    slices = {}
    for key in SLICE_COLUMNS:
        values = [age_bin(r[key]) if key == "age" else r[key] for r in recs]
        if not any(values):
            continue
        slices[key] = {}
        for v in sorted(set(values) - {""}):
            idx = [i for i, x in enumerate(values) if x == v]
            s = classification_metrics([truth[i] for i in idx], [pred[i] for i in idx], classes)
            slices[key][v] = {k: s[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1")}
    summary = {
        **(meta or {}),
        "images": len(rows),
        "classified": len(recs),
        "errors": len(run.errors),
        "missing_images": sorted(set(missing)),
        "classes": classes,
        "metrics": result,
        "confusion": {"columns": cols, "matrix": m},
        "slices": slices,
        "this_run": {
            "classified": answered,
            "seconds": round(t_run, 3),
            "images_per_minute": round(60 * answered / t_run, 3) if t_run > 0 else None,
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    return summary


def _markdown(s: dict) -> str:
    m = s["metrics"]
    failed = (
        f" {s['errors']} failed (error column of predictions.csv; a rerun tries them again)." if s["errors"] else ""
    )
    lines = [
        "# Zero-shot classification",
        "",
        f"{s['classified']} of {s['images']} images classified, {len(s['missing_images'])} missing.{failed}",
        "",
        "| n | accuracy | balanced accuracy | macro-F1 |",
        "|---|---|---|---|",
        f"| {m['n']} | {100 * m['accuracy']:.2f} | {100 * m['balanced_accuracy']:.2f} | {100 * m['macro_f1']:.2f} |",
        "",
        "| class | support | precision | recall | F1 |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c} | {v['support']} | {100 * v['precision']:.2f} | {100 * v['recall']:.2f} | {100 * v['f1']:.2f} |"
        for c, v in m["per_class"].items()
    ]
    for key, groups in s["slices"].items():
        lines += [
            "",
            f"## by {key}",
            "",
            "| value | n | accuracy | balanced accuracy | macro-F1 |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {v} | {g['n']} | {100 * g['accuracy']:.2f} | {100 * g['balanced_accuracy']:.2f} | {100 * g['macro_f1']:.2f} |"
            for v, g in groups.items()
        ]
    return "\n".join(lines) + "\n"
