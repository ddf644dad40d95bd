"""`skin-offline eval`, `classify`, `classify-eval`: the paper's VQA benchmark and zero-shot diagnosis."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

from ..eval.choices import ClassifyMethod, Protocol
from .options import (
    RANDOM_WEIGHTS_WARNING,
    ImageNotices,
    Precision,
    frame_option,
    image_source,
    progress_for,
    quiet_option,
    show_notices,
    threads_option,
    warn_if_random,
)


def _labels(labels: Optional[str], label_set: Optional[str], labels_file: Optional[Path]) -> list[str]:
    from ..errors import UsageError
    from ..eval.classify_eval import LABEL_SETS
    from ..eval.classify_eval import label_set as load_set

    if (labels is None) == (label_set is None):
        raise UsageError("pass exactly one of --labels 'a,b,c' or --label-set NAME")
    if label_set is not None:
        return load_set(label_set, labels_file or LABEL_SETS)
    return [x.strip() for x in labels.split(",") if x.strip()]


LOCAL_RAY = "local"


class _RayOption(TyperCommand):
    """`--ray` takes an optional ADDRESS, which typer's parser cannot express: a bare `--ray` (the last word, or
    followed by something that is not an address: an option, the bundle) is given the value `local` before
    parsing. Addresses are `local`, `auto`, `host:port` and `ray://host:port`."""

    def parse_args(self, ctx, args):
        args = list(args)
        for i, a in enumerate(args):
            if a == "--":
                break
            if a == "--ray":
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is None or not (nxt in (LOCAL_RAY, "auto") or ":" in nxt):
                    args.insert(i + 1, LOCAL_RAY)
                break
        return super().parse_args(ctx, args)


def ray_option():
    return typer.Option(
        None,
        "--ray",
        metavar="[ADDRESS]",
        help="run the rows on Ray: alone, a local Ray on this machine; `auto` or HOST:PORT or "
        "ray://HOST:PORT joins a running cluster (the bundle must be at the same path on every "
        "node; see README 'Evaluating on a cluster')",
    )


def actors_option():
    return typer.Option(
        None,
        min=1,
        help="with --ray: Ray actors, each loading the bundle once (default: as many "
        "as the cluster's CPUs allow at --threads each)",
    )


def _cluster(
    ray: Optional[str],
    actors: Optional[int],
    threads: Optional[int],
    batch: int,
    bundle: Path,
    precision,
    job,
    progress,
):
    """The Ray cluster for `--ray` (None without it; --actors alone is a usage error)."""
    from ..errors import UsageError

    if ray is None:
        if actors is not None:
            raise UsageError("--actors needs --ray (the actors are Ray's); drop it or add --ray")
        return None
    from ..eval.cluster import Cluster, ClusterSpec

    spec = ClusterSpec(address=None if ray == LOCAL_RAY else ray, actors=actors, threads=threads or 1, batch=batch)
    return Cluster(spec, bundle, precision, job, log=progress)


def _say_errors(n: int, out: Path) -> None:
    if n:
        typer.echo(
            f"warning: {n} row(s) failed; the error column of {out / 'predictions.csv'} says why, and a rerun "
            f"tries them again",
            err=True,
        )


def _check_ray(cluster) -> None:
    """The one-time notices a local load shows, from the actors' view of the bundle."""
    if cluster.info.random_weights:
        typer.echo(RANDOM_WEIGHTS_WARNING, err=True)
    for n in cluster.info.notices:
        typer.echo(f"note: {n}", err=True)


def register(app, friendly) -> None:
    @app.command("eval", cls=_RayOption)
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
        batch: int = typer.Option(
            1,
            min=1,
            help="questions answered at once: the engine decodes them together "
            "(every protocol: the paper's beams are rows of the same decoder runs)",
        ),
        quiet: bool = quiet_option(),
        ray: Optional[str] = ray_option(),
        actors: Optional[int] = actors_option(),
    ):
        """Answer the MM-Skin test questions and score them (BLEU, ROUGE, METEOR, token recall) per modality."""
        from .. import names
        from ..eval.runlog import local_source
        from ..eval.vqa import VQAJob, evaluate_vqa, read_questions

        rows = read_questions(csv, modality_csv, limit)
        job = VQAJob(protocol, seed, max_new_tokens)
        with progress_for(quiet) as progress:
            cluster = _cluster(ray, actors, threads, batch, bundle, precision, job, progress)
            with cluster or contextlib.nullcontext():
                if cluster is None:
                    from ..runtime.pipeline import SkinVL

                    model = SkinVL.load(bundle, threads=threads, precision=precision, parallel=batch)
                    warn_if_random(model.manifest)
                    show_notices(model)
                    source = local_source(job(model), batch)
                    chosen = model.manifest.pick(names.ROLE_DECODER, precision).precision.value
                else:
                    _check_ray(cluster)
                    source, chosen = cluster.source, cluster.info.precision
                meta = {
                    "bundle": str(bundle),
                    "precision": chosen,
                    "protocol": protocol.value,
                    "seed": seed,
                    "max_new_tokens": max_new_tokens,
                    "batch": batch,
                }
                if cluster is not None:
                    meta["ray"] = cluster.stats  # filled in as rows arrive: rows per node, restarts
                if batch > 1 and chosen != "fp32" and not quiet:
                    # quantized kernels sum a many-row call in another order than a one-row call (and a hybrid
                    # bundle's wide steps run its int8 GEMM graph), so near-tied greedy choices can flip: say so
                    typer.echo(
                        f"note: --batch {batch} on an {chosen} bundle: batched decode steps round "
                        f"differently from single ones, so some answers can differ from --batch 1 (fp32 gives "
                        f"identical answers)",
                        err=True,
                    )
                s = evaluate_vqa(source, rows, images, out, meta, progress)
        typer.echo((out / "summary.md").read_text())
        _say_errors(s["errors"], out)
        if s["this_run"]["questions_per_minute"]:
            typer.echo(
                f"[{s['this_run']['answered']} answered this run, {s['this_run']['questions_per_minute']:.1f} "
                f"questions/minute; results in {out}]",
                err=True,
            )

    @app.command("classify")
    @friendly
    def classify_cmd(
        image: Path = typer.Argument(..., help="image file"),
        frame: int = frame_option(),
        bundle: Optional[Path] = typer.Option(None, help="bundle folder"),
        labels: Optional[str] = typer.Option(None, help="comma-separated candidate diagnoses"),
        label_set: Optional[str] = typer.Option(None, help="a label set of the paper (HAM10000, ISIC, PAD, ...)"),
        labels_file: Optional[Path] = typer.Option(None, help="label-set JSON (default: the paper's sets)"),
        method: ClassifyMethod = typer.Option(
            ClassifyMethod.LIKELIHOOD,
            help="likelihood (rank every label) or generate (the answer constrained to exactly one label)",
        ),
        normalize: bool = typer.Option(
            True, "--normalize/--no-normalize", help="mean (not sum) of the label tokens' log-probs"
        ),
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
                typer.echo(
                    f"{i:2d}. {s.label:40s} {100 * s.probability:6.2f}%  (score {s.score:.4f}, {s.n_tokens} tokens)"
                )
        else:
            from ..eval.classify_eval import generate_predictor

            label, _, text = generate_predictor(model, names, protocol, seed, 256)(image)
            if as_json:
                typer.echo(json.dumps({"prediction": label, "answer": text}))
                return
            typer.echo(f"{label}\n[answer: {text}]")

    @app.command("classify-eval", cls=_RayOption)
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
        batch: int = typer.Option(
            1, min=1, help="images classified at once: their label rows share the engine's decoder runs"
        ),
        quiet: bool = quiet_option(),
        ray: Optional[str] = ray_option(),
        actors: Optional[int] = actors_option(),
    ):
        """Zero-shot classification metrics: accuracy, balanced accuracy, macro-F1, confusion matrix, slices."""
        from ..eval.classify_eval import ClassifyJob, evaluate_classify, read_label_rows
        from ..eval.runlog import local_source

        names = _labels(labels, label_set, labels_file)
        rows = read_label_rows(csv, names, image_col, label_col, limit)
        job = ClassifyJob(tuple(names), method, normalize, protocol, seed, 256)
        meta = {
            "bundle": str(bundle),
            "method": method.value,
            "normalized": normalize,
            "label_set": label_set,
            "batch": batch,
        }
        with progress_for(quiet) as progress:
            cluster = _cluster(ray, actors, threads, batch, bundle, precision, job, progress)
            with cluster or contextlib.nullcontext():
                if cluster is None:
                    from ..runtime.pipeline import SkinVL

                    model = SkinVL.load(bundle, threads=threads, precision=precision, parallel=batch)
                    warn_if_random(model.manifest)
                    show_notices(model)
                    source = local_source(job(model), batch)
                else:
                    _check_ray(cluster)
                    source, meta["ray"] = cluster.source, cluster.stats
                s = evaluate_classify(source, rows, names, images, out, meta, progress)
        typer.echo((out / "summary.md").read_text())
        _say_errors(s["errors"], out)
        typer.echo(f"[{s['classified']} classified; confusion matrix in {out}/confusion.csv and .png]", err=True)
