"""`eval` / `classify-eval` pipelines on a synthetic image set: resumability, missing images, per-modality
metrics, classification metrics by hand, and the CLI commands end to end on the tiny bundle."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import random_image

QUESTIONS = [  # (image, question, answer, modality): the first MM-Skin test rows' style
    ("dataset/a.png", "What does the image show?", "The image shows a digital mucous cyst.", "clinical"),
    ("dataset/b.png", "Is the lesion raised above the skin surface?", "No, the lesion is flat.", "dermoscopy"),
    ("dataset/c.png", "What type of tissue is present in this image?", "Metastatic carcinoma of breast.", "pathology"),
    ("dataset/a.png", "Where is the lesion located?", "On the thumb.", "clinical"),
    ("dataset/missing.png", "What is this?", "A nevus.", "dermoscopy"),
    ("dataset/d.png", "Describe the border.", "Irregular, notched border.", "dermoscopy"),
]


@pytest.fixture()
def vqa_set(tmp_path):
    images = tmp_path / "images"
    (images / "dataset").mkdir(parents=True)
    for i, name in enumerate(sorted({q[0] for q in QUESTIONS} - {"dataset/missing.png"})):
        random_image(40 + i, size=(64 + 8 * i, 48)).save(images / name)
    with open(tmp_path / "q.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "question", "answer"])
        w.writerows(q[:3] for q in QUESTIONS)
    with open(tmp_path / "modality.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "modality"])
        w.writerows(sorted({(q[0], q[3]) for q in QUESTIONS}))
    return tmp_path


class Interrupt(Exception):
    pass


def _run(model, root, out, protocol, stop_after=None):
    from skin_offline.eval.vqa import make_answer_fn, read_questions, run_vqa

    rows = read_questions(root / "q.csv", root / "modality.csv")
    answer = make_answer_fn(model, protocol, seed=7, max_new_tokens=6)
    calls = []

    def maybe_interrupted(image, question, row):
        if stop_after is not None and len(calls) == stop_after:
            raise Interrupt  # stands in for Ctrl-C / a kill between two rows
        calls.append(row)
        return answer(image, question, row)

    return run_vqa(maybe_interrupted, rows, root / "images", root / out)


def _predictions(path):
    with open(path, newline="") as f:
        return [(r["row"], r["prediction"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("protocol", ["greedy", "paper"])
def test_interrupted_eval_resumes_to_the_same_results(llava_model, vqa_set, protocol):
    from skin_offline.eval.vqa import Protocol

    model, proto = llava_model.runtime, Protocol(protocol)
    clean = _run(model, vqa_set, "clean", proto)
    with pytest.raises(Interrupt):
        _run(model, vqa_set, "resumed", proto, stop_after=2)
    assert len(_predictions(vqa_set / "resumed" / "predictions.csv")) == 2  # written row by row
    with open(vqa_set / "resumed" / "predictions.csv", "a") as f:
        f.write("5,dataset/d.png,Describe the bor")  # a line cut short by a kill: dropped and redone
    resumed = _run(model, vqa_set, "resumed", proto)
    assert resumed["this_run"]["answered"] == 3  # 5 answerable rows, 2 done before
    assert sorted(_predictions(vqa_set / "resumed" / "predictions.csv")) == sorted(
        _predictions(vqa_set / "clean" / "predictions.csv")
    )
    assert resumed["metrics"] == clean["metrics"]
    again = _run(model, vqa_set, "resumed", proto)  # nothing left: no model call, same summary
    assert again["this_run"]["answered"] == 0 and again["metrics"] == clean["metrics"]


def test_missing_images_listed_and_per_modality_metrics(llava_model, vqa_set):
    from skin_offline.eval import metrics
    from skin_offline.eval.vqa import Protocol

    s = _run(llava_model.runtime, vqa_set, "out", Protocol.GREEDY)
    assert s["missing_images"] == ["dataset/missing.png"] and s["answered"] == 5 and s["questions"] == 6
    assert (vqa_set / "out" / "missing_images.txt").read_text() == "dataset/missing.png\n"
    assert set(s["metrics"]) == {"all", "clinical", "dermoscopy", "pathology"}
    with open(vqa_set / "out" / "predictions.csv", newline="") as f:
        recs = list(csv.DictReader(f))
    for mod in ("clinical", "dermoscopy"):
        sub = [r for r in recs if r["modality"] == mod]
        expect = metrics.text_metrics([r["answer"] for r in sub], [r["prediction"] for r in sub]).to_dict()
        assert s["metrics"][mod] == expect
    assert s["metrics"]["dermoscopy"]["n"] == 2 and s["metrics"]["all"]["n"] == 5
    assert json.loads((vqa_set / "out" / "summary.json").read_text())["metrics"] == s["metrics"]
    md = (vqa_set / "out" / "summary.md").read_text()
    assert "| pathology | 1 |" in md and "BLEU-4" in md


def test_resume_refuses_another_input(llava_model, vqa_set):
    from skin_offline.errors import UsageError
    from skin_offline.eval.vqa import Protocol, read_questions, run_vqa

    _run(llava_model.runtime, vqa_set, "out", Protocol.GREEDY)
    rows = read_questions(vqa_set / "q.csv")
    other = [type(r)(r.index, r.image, r.question + "?", r.answer) for r in rows]
    with pytest.raises(UsageError):
        run_vqa(lambda *a: ("x", "stop", 1), other, vqa_set / "images", vqa_set / "out")


def test_classification_metrics_by_hand():
    from skin_offline.eval.classify_eval import NO_LABEL, classification_metrics, confusion

    classes = ["mel", "nev", "bkl"]
    truth = ["mel", "mel", "mel", "nev", "nev", "bkl"]
    pred = ["mel", "nev", NO_LABEL, "nev", "nev", "nev"]
    m = classification_metrics(truth, pred, classes)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 3 + 1 + 0) / 3)  # recalls mel 1/3, nev 2/2, bkl 0/1
    # precision mel 1/1, nev 2/4, bkl 0; F1 mel 2*(1*1/3)/(4/3)=1/2, nev 2*(1/2*1)/(3/2)=2/3, bkl 0
    assert m["per_class"]["nev"]["precision"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert m["no_label"] == 1
    cols, mat = confusion(truth, pred, classes)
    assert cols == classes + [NO_LABEL]
    assert mat == [[1, 1, 0, 1], [0, 2, 0, 0], [0, 1, 0, 0]]


def test_cli_eval_classify_and_classify_eval(llava_model, vqa_set, tmp_path):
    from typer.testing import CliRunner

    from skin_offline.cli import app

    runner = CliRunner()
    bundle = str(llava_model.bundle_dir)
    r = runner.invoke(
        app,
        [
            "eval",
            bundle,
            "--csv",
            str(vqa_set / "q.csv"),
            "--images",
            str(vqa_set / "images"),
            "--modality-csv",
            str(vqa_set / "modality.csv"),
            "--protocol",
            "greedy",
            "--limit",
            "3",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "cli"),
            "--batch",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert s["answered"] == 3 and s["protocol"] == "greedy" and s["this_run"]["questions_per_minute"] > 0
    assert s["batch"] == 2
    assert "note: --batch" not in r.stderr  # fp32: batched answers are identical, nothing to warn about
    # the row loop's progress: plain lines when stderr is not a terminal (here: CliRunner's buffer)
    assert "questions: 0/3 questions" in r.stderr and "questions: 3 questions in " in r.stderr, r.stderr

    img = vqa_set / "images" / "dataset" / "a.png"
    r = runner.invoke(
        app, ["classify", str(img), "--bundle", bundle, "--labels", "melanoma, nevus,basal cell carcinoma", "--json"]
    )
    assert r.exit_code == 0, r.output
    ranking = json.loads(r.stdout)
    assert sorted(x["label"] for x in ranking["ranking"]) == ["basal cell carcinoma", "melanoma", "nevus"]
    assert sum(x["probability"] for x in ranking["ranking"]) == pytest.approx(1.0, abs=1e-5)
    assert ranking["prediction"] == llava_model.runtime.classify(img, ["nevus", "melanoma", "basal cell carcinoma"]).top

    r = runner.invoke(app, ["classify", str(img), "--bundle", bundle, "--labels", "melanoma"])
    assert r.exit_code == 2 and "at least 2 labels" in r.output

    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "sex", "age"])
        w.writerows(
            [
                ["dataset/a.png", "nevus", "female", "34"],
                ["dataset/b.png", "Melanoma", "male", "71"],
                ["dataset/c.png", "melanoma", "female", "55"],
                ["dataset/gone.png", "nevus", "male", "20"],
            ]
        )
    r = runner.invoke(
        app,
        [
            "classify-eval",
            bundle,
            "--csv",
            str(tmp_path / "labels.csv"),
            "--images",
            str(vqa_set / "images"),
            "--labels",
            "melanoma,nevus",
            "--out",
            str(tmp_path / "zs"),
        ],
    )
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "zs" / "summary.json").read_text())
    assert s["classified"] == 3 and s["missing_images"] == ["dataset/gone.png"]
    assert set(s["slices"]["sex"]) == {"female", "male"} and s["slices"]["sex"]["female"]["n"] == 2
    assert set(s["slices"]["age"]) == {"30-49", "50-69", "70+"}
    with open(tmp_path / "zs" / "confusion.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == ["melanoma", "nevus"] and sum(int(x) for row in rows[1:] for x in row[1:]) == 3
    with Image.open(tmp_path / "zs" / "confusion.png") as png:
        assert png.size[0] > 100 and np.asarray(png).std() > 0
    # --batch: the images' label rows share decoder runs; fp32 predictions and probabilities equal one at a time
    r = runner.invoke(
        app,
        [
            "classify-eval",
            bundle,
            "--csv",
            str(tmp_path / "labels.csv"),
            "--images",
            str(vqa_set / "images"),
            "--labels",
            "melanoma,nevus",
            "--out",
            str(tmp_path / "zs2"),
            "--batch",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    with (
        open(tmp_path / "zs" / "predictions.csv", newline="") as f1,
        open(tmp_path / "zs2" / "predictions.csv", newline="") as f2,
    ):
        one, many = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert [(x["row"], x["prediction"]) for x in one] == [(x["row"], x["prediction"]) for x in many]
    assert all(abs(float(a["probability"]) - float(b["probability"])) < 1e-5 for a, b in zip(one, many))


def test_synthetic_set_covers_every_row(tmp_path):
    from skin_offline.eval.classify_eval import label_set, read_label_rows
    from skin_offline.eval.runlog import resolve_image
    from skin_offline.eval.synthetic import write_synthetic_set
    from skin_offline.eval.vqa import read_questions

    src = tmp_path / "src.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "question", "answer"])
        w.writerows([["x/a.jpg", "q1", "a1"], ["x/b", "q2", "a2"], ["x/a.jpg", "q3", "a3"]])
    out = write_synthetic_set(src, tmp_path / "set", rows=3)
    rows = read_questions(out / "q.csv", out / "modality.csv")
    assert len(rows) == 3 and all(resolve_image(out / "images", r.image) for r in rows)
    assert {r.modality for r in rows} <= {"clinical", "dermoscopy", "pathology"} and all(r.modality for r in rows)
    assert len(read_label_rows(out / "labels.csv", label_set("HAM10000"))) == 2


def test_eval_batch_equals_one_at_a_time(llava_model, vqa_set):
    """`eval --batch 4`: the questions go through the engine together; every prediction equals the sequential
    run's, the log is complete and the summary counts every row."""
    from skin_offline.eval.vqa import Protocol, make_answer_fn, read_questions, run_vqa
    from skin_offline.runtime.pipeline import SkinVL

    rows = read_questions(vqa_set / "q.csv", vqa_set / "modality.csv")
    one = _run(llava_model.runtime, vqa_set, "one", Protocol.GREEDY)
    model = SkinVL.load(llava_model.bundle_dir, threads=1, parallel=4)
    answer = make_answer_fn(model, Protocol.GREEDY, seed=7, max_new_tokens=6)
    many = run_vqa(answer, rows, vqa_set / "images", vqa_set / "many", batch=4)
    assert sorted(_predictions(vqa_set / "many" / "predictions.csv")) == sorted(
        _predictions(vqa_set / "one" / "predictions.csv")
    )
    assert many["metrics"] == one["metrics"] and many["this_run"]["answered"] == 5


def test_a_failing_row_is_an_error_row_and_a_rerun_tries_it_again(llava_model, vqa_set):
    """A question the model cannot take (too long for the context: a PromptError) fails its row only: an error
    row (its `error` column says why, no prediction), left out of the metrics and counted; a rerun answers
    only that row again, and its new line is the one that counts."""
    from skin_offline.errors import ContextLengthError
    from skin_offline.eval.vqa import Protocol, make_answer_fn, read_questions, run_vqa

    rows = read_questions(vqa_set / "q.csv", vqa_set / "modality.csv")
    real = make_answer_fn(llava_model.runtime, Protocol.GREEDY, seed=7, max_new_tokens=6)
    calls = []

    def answer(image, question, row, fail=True):
        calls.append(row)
        if row == 1 and fail:
            raise ContextLengthError("prompt of 9000 tokens + 6 new tokens exceeds the context of 4096")
        return real(image, question, row)

    first = run_vqa(answer, rows, vqa_set / "images", vqa_set / "out")
    recs = {r["row"]: r for r in csv.DictReader(open(vqa_set / "out" / "predictions.csv", newline=""))}
    assert recs["1"]["error"].startswith("ContextLengthError: prompt of 9000 tokens") and recs["1"]["prediction"] == ""
    assert recs["1"]["question"] == rows[1].question and all(not recs[i]["error"] for i in ("0", "2", "3", "5"))
    assert first["errors"] == 1 and first["answered"] == 4 and first["metrics"]["all"]["n"] == 4
    assert any("1 row(s) failed" in n for n in first["notes"])

    calls.clear()
    again = run_vqa(lambda *a: answer(*a, fail=False), rows, vqa_set / "images", vqa_set / "out")
    assert calls == [1] and again["errors"] == 0 and again["answered"] == 5
    clean = _run(llava_model.runtime, vqa_set, "clean", Protocol.GREEDY)
    assert again["metrics"] == clean["metrics"]
