"""`skin-offline eval`, `classify`, `classify-eval`: the paper's VQA benchmark and zero-shot diagnosis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..eval.choices import ClassifyMethod, Protocol
from .options import (ImageNotices, Precision, frame_option, image_source, progress_for, quiet_option, show_notices,
                      threads_option, warn_if_random)


def _labels(labels: Optional[str], label_set: Optional[str], labels_file: Optional[Path]) -> list[str]:
    from ..errors import UsageError
    from ..eval.classify_eval import LABEL_SETS, label_set as load_set

    if (labels is None) == (label_set is None):
        raise UsageError("pass exactly one of --labels 'a,b,c' or --label-set NAME")
    if label_set is not None:
        return load_set(label_set, labels_file or LABEL_SETS)
    return [x.strip() for x in labels.split(",") if x.strip()]


def _generate_predictor(model, labels: list[str], protocol, seed: int, max_new_tokens: int):
    """The paper's generate protocol, constrained: the answer to the question (labels in set order) is exactly one of
    the labels (a choice constraint, runtime/constraints.py), so no matching heuristic is needed. An answer cut by
    max_new_tokens names no label."""
    from dataclasses import replace

    from ..eval.classify_eval import NO_LABEL
    from ..eval.vqa import PAPER_BEAMS
    from ..runtime.classify import question_for
    from ..runtime.constraints import Choice
    from ..runtime.response import FinishReason

    question, choice = question_for(labels), Choice(labels)

    def predict(image):
        if protocol is Protocol.PAPER:  # sampling inside 5 beams; min_new_tokens 0: a label is a complete answer
            cfg = replace(PAPER_BEAMS, seed=seed, max_new_tokens=max_new_tokens, min_new_tokens=0)
            a = model.generate_beam(image, question, config=cfg, constraint=choice)
        else:
            a = model.ask(image, question, max_new_tokens=max_new_tokens, constraint=choice)
        return (a.answer if a.finish_reason is FinishReason.STOP else NO_LABEL), float("nan"), a.answer

    return predict


def register(app, friendly) -> None:
    @app.command("eval")
    @friendly
    def eval_cmd(
        bundle: Path = typer.Argument(..., help="bundle folder"),
        csv: Path = typer.Option(..., "--csv", help="image,question,answer[,modality] CSV (MM-Skin_test.csv)"),
        images: Path = typer.Option(..., "--images", help="folder the CSV's image paths are relative to"),
        modality_csv: Optional[Path] = typer.Option(None, help="image,modality CSV (clinical/dermoscopy/pathology)"),
        protocol: Protocol = typer.Option(Protocol.PAPER, help="paper (sampling in 5 beams, as VQA_test.py) or greedy"),
        limit: Optional[int] = typer.Option(None, min=1, help="first N questions only"),
        out: Path = typer.Option(Path("results"), help="output folder (rerun to resume)"),
        max_new_tokens: int = typer.Option(256, min=1),
        seed: int = typer.Option(0, help="base seed of the paper protocol (row i uses seed + i)"),
        threads: Optional[int] = threads_option(),
        precision: Optional[Precision] = typer.Option(None, help="graph variant to run (default: the bundle's first)"),
        batch: int = typer.Option(1, min=1, help="questions answered at once: the engine decodes them together "
                                  "(every protocol: the paper's beams are rows of the same decoder runs)"),
        quiet: bool = quiet_option(),
    ):
        """Answer the MM-Skin test questions and score them (BLEU, ROUGE, METEOR, token recall) per modality."""
        from ..eval.vqa import make_answer_fn, read_questions, run_vqa
        from ..runtime.pipeline import SkinVL

        from .. import names

        rows = read_questions(csv, modality_csv, limit)
        model = SkinVL.load(bundle, threads=threads, precision=precision, parallel=batch)
        warn_if_random(model.manifest)
        show_notices(model)
        meta = {"bundle": str(bundle), "precision": model.manifest.pick(names.ROLE_DECODER, precision).precision.value,
                "protocol": protocol.value, "seed": seed, "max_new_tokens": max_new_tokens, "batch": batch}
        if batch > 1 and meta["precision"] != "fp32" and not quiet:
            # quantized kernels sum a many-row call in another order than a one-row call (and a hybrid bundle's
            # wide steps run its int8 GEMM graph), so near-tied greedy choices can flip: say so, do not hide it
            typer.echo(f"note: --batch {batch} on an {meta['precision']} bundle: batched decode steps round differently "
                       f"from single ones, so some answers can differ from --batch 1 (fp32 gives identical answers)",
                       err=True)
        with progress_for(quiet) as progress:
            s = run_vqa(make_answer_fn(model, protocol, seed, max_new_tokens), rows, images, out, meta, progress, batch)
        typer.echo((out / "summary.md").read_text())
        if s["this_run"]["questions_per_minute"]:
            typer.echo(f"[{s['this_run']['answered']} answered this run, {s['this_run']['questions_per_minute']:.1f} "
                       f"questions/minute; results in {out}]", err=True)

    @app.command("classify")
    @friendly
    def classify_cmd(
        image: Path = typer.Argument(..., help="image file"),
        frame: int = frame_option(),
        bundle: Optional[Path] = typer.Option(None, help="bundle folder"),
        labels: Optional[str] = typer.Option(None, help="comma-separated candidate diagnoses"),
        label_set: Optional[str] = typer.Option(None, help="a label set of the paper (HAM10000, ISIC, PAD, ...)"),
        labels_file: Optional[Path] = typer.Option(None, help="label-set JSON (default: the paper's sets)"),
        method: ClassifyMethod = typer.Option(ClassifyMethod.LIKELIHOOD, help="likelihood (rank every label) or generate "
                                              "(the answer constrained to exactly one label)"),
        normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="mean (not sum) of the label tokens' log-probs"),
        protocol: Protocol = typer.Option(Protocol.GREEDY, help="decoding for --method generate: greedy or paper"),
        seed: int = typer.Option(0),
        threads: Optional[int] = threads_option(),
        precision: Optional[Precision] = typer.Option(None),
        as_json: bool = typer.Option(False, "--json"),
    ):
        """Zero-shot diagnosis: a ranked list of labels with probabilities (or the paper's generate-then-match)."""
        from ..runtime.pipeline import SkinVL

        names = _labels(labels, label_set, labels_file)
        image = image_source(image, frame)
        model = SkinVL.load(bundle, threads=threads, precision=precision)
        warn_if_random(model.manifest)
        show_notices(model)
        if method is ClassifyMethod.LIKELIHOOD:
            r = model.classify(image, names, normalize=normalize)
            ImageNotices().show(r.notices)
            if as_json:
                typer.echo(json.dumps(r.to_dict()))
                return
            for i, s in enumerate(r.scores, 1):
                typer.echo(f"{i:2d}. {s.label:40s} {100 * s.probability:6.2f}%  (score {s.score:.4f}, {s.n_tokens} tokens)")
        else:
            label, _, text = _generate_predictor(model, names, protocol, seed, 256)(image)
            if as_json:
                typer.echo(json.dumps({"prediction": label, "answer": text}))
                return
            typer.echo(f"{label}\n[answer: {text}]")

    @app.command("classify-eval")
    @friendly
    def classify_eval_cmd(
        bundle: Path = typer.Argument(..., help="bundle folder"),
        csv: Path = typer.Option(..., "--csv", help="CSV with image and label columns (+ optional age/sex/skin_type)"),
        images: Path = typer.Option(..., "--images", help="folder the CSV's image paths are relative to"),
        label_set: Optional[str] = typer.Option(None, help="a label set of the paper (HAM10000, ISIC, PAD, ...)"),
        labels: Optional[str] = typer.Option(None, help="comma-separated labels instead of --label-set"),
        labels_file: Optional[Path] = typer.Option(None, help="label-set JSON (default: the paper's sets)"),
        image_col: str = typer.Option("image"),
        label_col: str = typer.Option("label"),
        method: ClassifyMethod = typer.Option(ClassifyMethod.LIKELIHOOD, help="likelihood or generate"),
        normalize: bool = typer.Option(True, "--normalize/--no-normalize"),
        protocol: Protocol = typer.Option(Protocol.GREEDY, help="decoding for --method generate"),
        limit: Optional[int] = typer.Option(None, min=1),
        out: Path = typer.Option(Path("results-classify"), help="output folder (rerun to resume)"),
        seed: int = typer.Option(0),
        threads: Optional[int] = threads_option(),
        precision: Optional[Precision] = typer.Option(None),
        quiet: bool = quiet_option(),
    ):
        """Zero-shot classification metrics: accuracy, balanced accuracy, macro-F1, confusion matrix, slices."""
        from ..eval.classify_eval import read_label_rows, run_classify_eval
        from ..runtime.pipeline import SkinVL

        names = _labels(labels, label_set, labels_file)
        rows = read_label_rows(csv, names, image_col, label_col, limit)
        model = SkinVL.load(bundle, threads=threads, precision=precision)
        warn_if_random(model.manifest)
        show_notices(model)
        if method is ClassifyMethod.LIKELIHOOD:
            def predict(path):
                r = model.classify(path, names, normalize=normalize)
                return r.top, r.scores[0].probability
        else:
            gen = _generate_predictor(model, names, protocol, seed, 256)

            def predict(path):
                return gen(path)[:2]
        meta = {"bundle": str(bundle), "method": method.value, "normalized": normalize, "label_set": label_set}
        with progress_for(quiet) as progress:
            s = run_classify_eval(predict, rows, names, images, out, meta, progress)
        typer.echo((out / "summary.md").read_text())
        typer.echo(f"[{s['classified']} classified; confusion matrix in {out}/confusion.csv and .png]", err=True)
