"""`skin-offline ask --json-schema/--regex/--choice/--grammar [--json --top-logprobs N]` and `classify --method generate`
through real subprocesses: the same answers as the runtime, refusals as one line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from skin_offline.runtime.constraints import Choice, Grammar, JsonSchema, Regex

from conftest import random_image
from constraint_cases import CHOICES, CLINIC_FORM, GRAMMARS, valid

Q = "Fill in the form."


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "skin_offline.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def files(llava_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-structured")
    random_image(31).save(d / "lesion.png")
    (d / "form.json").write_text(json.dumps(CLINIC_FORM))
    (d / "g.lark").write_text(GRAMMARS[2])
    (d / "bad.json").write_text("{not json")
    return d


@pytest.mark.parametrize(
    "opts,c",
    [
        (("--json-schema", "form.json"), JsonSchema(CLINIC_FORM)),
        (("--regex", "[0-9]{2} mm"), Regex("[0-9]{2} mm")),
        (tuple(x for o in CHOICES[0] for x in ("--choice", o)), Choice(CHOICES[0])),
        (("--grammar", "g.lark"), Grammar(GRAMMARS[2])),
    ],
)
def test_ask_with_a_constraint_equals_the_runtime(llava_model, files, opts, c):
    args = [a if not a.endswith((".json", ".lark")) else files / a for a in opts]
    r = cli(
        "ask",
        files / "lesion.png",
        Q,
        "--bundle",
        llava_model.bundle_dir,
        "--threads",
        1,
        "--max-new-tokens",
        80,
        *args,
        "--json",
        "--top-logprobs",
        2,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = llava_model.runtime.ask(random_image(31), Q, max_new_tokens=80, constraint=c, logprobs=2)
    assert out["answer"] == want.answer and out["finish_reason"] == want.finish_reason.value
    assert out["finish_reason"] == "stop" and valid(c, out["answer"])
    assert out["structured"] == (json.loads(out["answer"]) if isinstance(c, JsonSchema) else out["answer"])
    entries = out["logprobs"]["content"]
    assert len(entries) == len([t for t in want.token_ids if t != 2])
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    streamed = cli(
        "ask",
        files / "lesion.png",
        Q,
        "--bundle",
        llava_model.bundle_dir,
        "--threads",
        1,
        "--max-new-tokens",
        80,
        *args,
    )
    assert streamed.returncode == 0 and streamed.stdout == want.answer + "\n"


@pytest.mark.parametrize(
    "args,match",
    [
        (("--json-schema", "bad.json"), "not JSON"),
        (("--json-schema", "missing.json"), "cannot be read"),
        (("--regex", "("), "--regex"),
        (("--regex", "a", "--choice", "b"), "one constraint"),
        (("--choice", "a", "--choice", "a"), "repeat"),
        (("--top-logprobs", "2"), "--json"),
    ],
)
def test_bad_constraints_are_one_line_exit_2(llava_model, files, args, match):
    args = [files / a if a.endswith((".json", ".lark")) else a for a in args]
    r = cli("ask", files / "lesion.png", Q, "--bundle", llava_model.bundle_dir, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_classify_generate_answers_exactly_one_label(llava_model, files):
    """--method generate constrains the answer to the label set (greedy, and the paper's sampled beams)."""
    from skin_offline.eval.classify_eval import label_set

    for protocol in ("greedy", "paper"):
        r = cli(
            "classify",
            files / "lesion.png",
            "--bundle",
            llava_model.bundle_dir,
            "--label-set",
            "HAM10000",
            "--method",
            "generate",
            "--protocol",
            protocol,
            "--json",
            "--threads",
            1,
        )
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["prediction"] in label_set("HAM10000") and out["answer"] == out["prediction"], out
