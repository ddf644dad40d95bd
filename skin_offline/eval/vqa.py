"""MM-Skin VQA evaluation: answer every question, write predictions row by row, score per modality.

    run_vqa(make_answer_fn(model, Protocol.PAPER), rows, images_dir, out_dir)      # this process
    evaluate_vqa(cluster.source, rows, images_dir, out_dir)                          # Ray actors, VQAJob(...) each

Protocols: `paper` reproduces VQA_test.py's decoding (sampling inside 5 beams, temperature 0.2,
top-p 0.9, transformers' default top-k 50, min 20 / max 256 new tokens), seeded per row (seed + row
index) so a resumed run draws what an uninterrupted one would; `greedy` is plain greedy decoding
(deterministic, for comparing precisions). Metrics: eval/metrics.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..errors import UsageError
from ..runtime.beam import BeamConfig
from . import metrics
from .choices import Protocol
from .runlog import ERROR_FIELD, ResultLog, Source, WorkFn, local_source, read_csv, require_columns, run_rows

PAPER_BEAMS = BeamConfig(
    num_beams=5, max_new_tokens=256, min_new_tokens=20, do_sample=True, temperature=0.2, top_p=0.9, top_k=50
)
MODALITIES = ("clinical", "dermoscopy", "pathology")
FIELDS = [
    "image",
    "question",
    "answer",
    "modality",
    "prediction",
    "finish_reason",
    "new_tokens",
    "seconds",
    ERROR_FIELD,
]


@dataclass(frozen=True)
class VQARow:
    index: int
    image: str
    question: str
    answer: str
    modality: str = ""


def read_questions(csv_path: Path, modality_csv: Path | None = None, limit: int | None = None) -> list[VQARow]:
    """Rows of an `image,question,answer[,modality]` CSV; modality may also come from an `image,modality` CSV."""
    raw = read_csv(csv_path)
    require_columns(raw, csv_path, "image", "question", "answer")
    by_image: dict[str, str] = {}
    if modality_csv is not None:
        extra = read_csv(modality_csv)
        require_columns(extra, modality_csv, "image", "modality")
        for r in extra:  # keyed by the path as written and by file name, whichever the CSVs share
            by_image[r["image"]] = by_image[Path(r["image"]).name] = r["modality"].strip().lower()
    rows = []
    for i, r in enumerate(raw[:limit] if limit else raw):
        mod = (
            (r.get("modality") or by_image.get(r["image"]) or by_image.get(Path(r["image"]).name) or "").strip().lower()
        )
        rows.append(VQARow(i, r["image"], r["question"], r["answer"], mod))
    return rows


AnswerFn = Callable[[Path, str, int], tuple[str, str, int]]  # (image, question, row) -> (text, finish, n_tokens)


def make_answer_fn(model, protocol: Protocol, seed: int = 0, max_new_tokens: int = 256) -> AnswerFn:
    def answer(image: Path, question: str, row: int):
        if protocol is Protocol.PAPER:
            cfg = replace(
                PAPER_BEAMS,
                seed=seed + row,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min(PAPER_BEAMS.min_new_tokens, max_new_tokens),
            )
            a = model.generate_beam(image, question, config=cfg)
        else:
            a = model.ask(image, question, max_new_tokens=max_new_tokens)
        return a.answer.strip(), a.finish_reason, len(a.token_ids)

    return answer


def row_worker(answer: AnswerFn) -> WorkFn:
    """The per-row work of `eval`: answer the row's question about its image, as a results record."""

    def work(r: VQARow, image) -> dict:
        text, finish, n = answer(image, r.question, r.index)
        return {
            "image": r.image,
            "question": r.question,
            "answer": r.answer,
            "modality": r.modality,
            "prediction": text,
            "finish_reason": finish,
            "new_tokens": n,
        }

    return work


@dataclass(frozen=True)
class VQAJob:
    """Everything a row's answer depends on besides the model, small and picklable: a Ray actor builds its work
    from it exactly as a local run does (`VQAJob(...)(model)`), so both answer a row the same way."""

    protocol: Protocol
    seed: int = 0
    max_new_tokens: int = 256

    def __call__(self, model) -> WorkFn:
        return row_worker(make_answer_fn(model, self.protocol, self.seed, self.max_new_tokens))


def score(records: list[dict[str, str]]) -> dict[str, dict]:
    """Metrics over all records and per modality (those present)."""
    groups: dict[str, list[dict[str, str]]] = {"all": records}
    for m in sorted({r["modality"] for r in records if r["modality"]}):
        groups[m] = [r for r in records if r["modality"] == m]
    return {
        name: metrics.text_metrics([r["answer"] for r in rs], [r["prediction"] for r in rs]).to_dict()
        for name, rs in groups.items()
    }


def markdown_table(scores: dict[str, dict]) -> str:
    cols = [
        ("BLEU-1", "bleu1"),
        ("BLEU-2", "bleu2"),
        ("BLEU-3", "bleu3"),
        ("BLEU-4", "bleu4"),
        ("ROUGE-1", "rouge1"),
        ("ROUGE-2", "rouge2"),
        ("ROUGE-L", "rougeL"),
        ("METEOR", "meteor"),
        ("token recall", "token_recall"),
    ]
    lines = ["| subset | n | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, m in scores.items():
        cells = ["n/a" if m[k] is None else f"{100 * m[k]:.2f}" for _, k in cols]
        lines.append(f"| {name} | {m['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_vqa(
    answer: AnswerFn,
    rows: list[VQARow],
    images: Path,
    out: Path,
    meta: dict | None = None,
    progress=None,
    batch: int = 1,
) -> dict:
    """Answer the pending rows in this process (`batch` at once), then score; see evaluate_vqa."""
    return evaluate_vqa(local_source(row_worker(answer), batch), rows, images, out, meta, progress)


def evaluate_vqa(
    source: Source, rows: list[VQARow], images: Path, out: Path, meta: dict | None = None, progress=None
) -> dict:
    """Answer the pending rows through `source` (resumable), then write summary.json / summary.md; returns the
    summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = ResultLog(out / "predictions.csv", FIELDS, ("image", "question"))
    run = run_rows(
        rows, images, log, lambda r: {"image": r.image, "question": r.question}, source, "questions", progress
    )
    records, missing, answered, t_run = run.records, run.missing, run.answered, run.seconds
    if not records:
        if run.errors:
            raise UsageError(
                f"no question could be answered: all {len(run.errors)} answerable row(s) failed "
                f"(the error column of {log.path} says why)"
            )
        raise UsageError(
            f"no question could be answered: {len(missing)} image(s) missing under {images}; check --images"
        )
    scores = score(records)
    notes = [] if metrics.meteor_available() else [metrics.METEOR_UNAVAILABLE]
    if run.errors:
        notes.append(
            f"{len(run.errors)} row(s) failed and are left out of the metrics (error column of "
            f"predictions.csv); a rerun tries them again"
        )
    summary = {
        **(meta or {}),
        "questions": len(rows),
        "answered": len(records),
        "errors": len(run.errors),
        "missing_images": sorted(set(missing)),
        "metrics": scores,
        "notes": notes,
        "this_run": {
            "answered": answered,
            "seconds": round(t_run, 3),
            "questions_per_minute": round(60 * answered / t_run, 3) if t_run > 0 else None,
        },
    }
    (out / "missing_images.txt").write_text("".join(m + "\n" for m in sorted(set(missing))))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    notes = "".join(f"\n- {n}" for n in summary["notes"])
    (out / "summary.md").write_text(
        f"# MM-Skin VQA evaluation\n\n{len(records)} of {len(rows)} questions answered, "
        f"{len(set(missing))} image(s) missing.\n\n{markdown_table(scores)}\n{notes}\n"
    )
    return summary
