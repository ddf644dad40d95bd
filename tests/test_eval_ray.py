"""`eval --ray` / `classify-eval --ray` on a real Ray: the same results as the local run (greedy and the seeded paper
protocol, fp32), spread over 2 actors; an actor's process killed mid-run (replaced, every row once), the driver
killed mid-run (the rerun resumes), rows that fail every time (error rows, the run goes on), an unreachable
address and a bundle missing on the node (one line each), and a local Ray that touches nothing but 127.0.0.1 and
logs no patient data.

One Ray head (`ray start --head`, 2 CPUs, on 127.0.0.1, token authentication) is shared by the module; the CLI
joins it with `--ray 127.0.0.1:PORT` in subprocesses, as a user on a cluster would. One test starts its own local
Ray with a bare `--ray`."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import random_image

# the `cluster` extra (installed by `make`); not imported here: the one test that joins Ray in this process must
# set RAY_AUTH_MODE / RAY_AUTH_TOKEN before ray is first imported (Ray reads them then)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the cluster extra: make install")

CLI = [sys.executable, "-m", "skin_offline.cli"]
QUESTIONS = [  # (image, question, answer, modality)
    ("a.png", "What does the image show?", "A digital mucous cyst.", "clinical"),
    ("b.png", "Is the lesion raised above the skin surface?", "No, the lesion is flat.", "dermoscopy"),
    ("c.png", "What type of tissue is present in this image?", "Metastatic carcinoma of breast.", "pathology"),
    ("missing.png", "What is this?", "A nevus.", "dermoscopy"),
    ("d.png", "Describe the border.", "Irregular, notched border.", "dermoscopy"),
    ("a.png", "Where is the lesion located?", "On the thumb.", "clinical"),
]
LABELS = ["melanoma", "nevus", "basal cell carcinoma"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(tmp: str, token: str) -> dict:
    """Ray for the tests: loopback only, no usage stats, our own token and temp dir (nothing under ~/.ray)."""
    env = dict(
        os.environ,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_TMPDIR=tmp,
        SKIN_OFFLINE_PROGRESS_INTERVAL="0",
    )
    env.pop("RAY_ADDRESS", None)
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # the head's metadata probes: see cluster.py
        env[k] = "http://127.0.0.1:9"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


@pytest.fixture(scope="module")
def head():
    """A 2-CPU Ray head on 127.0.0.1 for the module; stopped by its process group (never `ray stop`, which would
    stop every Ray on the machine)."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    token = secrets.token_hex(32)
    env = _ray_env(tmp, token)
    port = _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--num-cpus",
            "2",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.5)
    else:
        pytest.fail("ray head did not start in 120 s")
    yield {"address": address, "env": env, "proc": proc, "tmp": tmp}
    import psutil

    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for pid in family:  # what SIGTERM left behind (ray start stops its children, not always in time)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)


def _actor_pids(head) -> list[int]:
    import psutil

    found = []
    for c in psutil.Process(head["proc"].pid).children(recursive=True):
        try:
            if c.cmdline() and c.cmdline()[0].startswith("ray::EvalActor"):
                found.append(c.pid)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-set")
    (root / "images").mkdir()
    for i, name in enumerate(sorted({q[0] for q in QUESTIONS} - {"missing.png"})):
        random_image(70 + i, size=(60 + 6 * i, 50)).save(root / "images" / name)
    with open(root / "q.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "question", "answer", "modality"])
        w.writerows(QUESTIONS)
    with open(root / "many.csv", "w", newline="") as f:  # a longer run, for killing things mid-way
        w = csv.writer(f)
        w.writerow(["image", "question", "answer", "modality"])
        w.writerows((q[0], f"{q[1]} ({k})", q[2], q[3]) for k in range(6) for q in QUESTIONS if q[0] != "missing.png")
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "sex"])
        w.writerows(
            [
                ["a.png", "nevus", "female"],
                ["b.png", "melanoma", "male"],
                ["missing.png", "nevus", "male"],
                ["c.png", "basal cell carcinoma", "female"],
                ["d.png", "melanoma", "male"],
            ]
        )
    return root


def _cli(args, env, timeout=300, **kw):
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _eval_args(bundle, data, out, protocol, csv_name="q.csv", tokens=6, extra=()):
    return [
        "eval",
        str(bundle),
        "--csv",
        str(data / csv_name),
        "--images",
        str(data / "images"),
        "--protocol",
        protocol,
        "--max-new-tokens",
        str(tokens),
        "--seed",
        "3",
        "--threads",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _answers(path: Path) -> dict:
    """row -> what the model said (the part that must not depend on where the row ran)."""
    recs = _rows(path)
    assert len(recs) == len({r["row"] for r in recs}), "a row written twice"
    drop = {"seconds"}
    return {r["row"]: {k: v for k, v in r.items() if k not in drop} for r in recs}


def _local_eval(bundle, data, out, protocol, csv_name="q.csv", tokens=6, batch=1, limit=None):
    """The local run, in this process, through the same code as `eval` without --ray."""
    from skin_offline.eval.choices import Protocol
    from skin_offline.eval.vqa import make_answer_fn, read_questions, run_vqa
    from skin_offline.runtime.pipeline import SkinVL

    rows = read_questions(data / csv_name, None, limit)
    model = SkinVL.load(bundle, threads=1, parallel=batch)
    return run_vqa(make_answer_fn(model, Protocol(protocol), 3, tokens), rows, data / "images", out, batch=batch)


@pytest.mark.parametrize("protocol,batch,limit", [("greedy", 2, 5), ("paper", 1, None)])
def test_eval_on_ray_equals_local(llava_model, data, head, tmp_path, protocol, batch, limit):
    local = _local_eval(llava_model.bundle_dir, data, tmp_path / "local", protocol, batch=batch, limit=limit)
    extra = ["--ray", head["address"], "--actors", "2", "--batch", str(batch)] + (
        ["--limit", str(limit)] if limit else []
    )
    r = _cli(_eval_args(llava_model.bundle_dir, data, tmp_path / "ray", protocol, extra=extra), head["env"])
    assert r.returncode == 0, r.stderr
    assert _answers(tmp_path / "ray" / "predictions.csv") == _answers(tmp_path / "local" / "predictions.csv")
    s = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert s["metrics"] == local["metrics"] and s["missing_images"] == ["missing.png"]
    assert s["questions"] == (limit or len(QUESTIONS)) and s["batch"] == batch
    assert s["ray"]["actors"] == 2 and sum(s["ray"]["rows_per_node"].values()) == s["answered"]
    # the driver's progress display, as a local run's (plain lines: stderr is a pipe here)
    n = s["answered"]
    assert f"questions: 0/{n} questions" in r.stderr and f"questions: {n} questions in " in r.stderr, r.stderr
    assert "ray: 2 actor(s) x 1 thread(s) on 1 node(s)" in r.stderr


@pytest.mark.parametrize("method", ["likelihood", "generate"])
def test_classify_eval_on_ray_equals_local(llava_model, data, head, tmp_path, method):
    from skin_offline.eval.choices import ClassifyMethod, Protocol
    from skin_offline.eval.classify_eval import ClassifyJob, read_label_rows, run_classify_eval

    # generate: the paper's generate-then-match, greedy (the seeded paper protocol is covered by `eval` above)
    job = ClassifyJob(tuple(LABELS), ClassifyMethod(method), True, Protocol.GREEDY, 5, 256)
    rows = read_label_rows(data / "labels.csv", LABELS)
    local = run_classify_eval(job.predictor(llava_model.runtime), rows, LABELS, data / "images", tmp_path / "local")
    r = _cli(
        [
            "classify-eval",
            str(llava_model.bundle_dir),
            "--csv",
            str(data / "labels.csv"),
            "--images",
            str(data / "images"),
            "--labels",
            ",".join(LABELS),
            "--method",
            method,
            "--protocol",
            "greedy",
            "--seed",
            "5",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "ray"),
            "--ray",
            head["address"],
        ],
        head["env"],
    )
    assert r.returncode == 0, r.stderr
    assert _answers(tmp_path / "ray" / "predictions.csv") == _answers(tmp_path / "local" / "predictions.csv")
    s = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert s["metrics"] == local["metrics"] and s["confusion"] == local["confusion"] and s["slices"] == local["slices"]
    assert s["ray"]["actors"] == 2  # default: the cluster's 2 CPUs at 1 thread each


def _wait_rows(path: Path, n: int, proc, timeout=120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail(f"fewer than {n} rows in {timeout} s")


@pytest.fixture(scope="module")
def many_local(llava_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("many-local")
    _local_eval(llava_model.bundle_dir, data, out, "paper", "many.csv", tokens=16)
    return _answers(out / "predictions.csv")


def test_actor_killed_mid_run_is_replaced_and_every_row_written_once(llava_model, data, head, tmp_path, many_local):
    out = tmp_path / "ray"
    args = _eval_args(
        llava_model.bundle_dir,
        data,
        out,
        "paper",
        "many.csv",
        tokens=16,
        extra=["--ray", head["address"], "--actors", "2"],
    )
    proc = subprocess.Popen([*CLI, *args], env=head["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_rows(out / "predictions.csv", 3, proc)
    victims = _actor_pids(head)
    assert len(victims) == 2, victims
    os.kill(victims[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _answers(out / "predictions.csv") == many_local  # every row exactly once, as the local run answered it
    s = json.loads((out / "summary.json").read_text())
    assert s["ray"]["actor_restarts"] >= 1 and s["errors"] == 0


def test_driver_killed_mid_run_rerun_resumes(llava_model, data, head, tmp_path, many_local):
    out = tmp_path / "ray"
    args = _eval_args(
        llava_model.bundle_dir,
        data,
        out,
        "paper",
        "many.csv",
        tokens=16,
        extra=["--ray", head["address"], "--actors", "2"],
    )
    proc = subprocess.Popen([*CLI, *args], env=head["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_rows(out / "predictions.csv", 4, proc)
    proc.kill()
    proc.communicate()
    before = len(_rows(out / "predictions.csv"))
    assert 4 <= before < len(many_local)
    r = _cli(args, head["env"])
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["this_run"]["answered"] == len(many_local) - before
    assert _answers(out / "predictions.csv") == many_local


class FlakyJob:
    """The real per-row work, except: row 1 raises every time; row 2 kills its actor's process the first time (a
    marker file remembers); row 4 asks a question too long for the context (a PromptError)."""

    def __init__(self, real, marker: str):
        self.real, self.marker = real, marker

    def __call__(self, model):
        work = self.real(model)

        def flaky(row, image):
            if row.index == 1:
                raise RuntimeError("this row always fails")
            if row.index == 2 and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return work(row, image)

        return flaky


def test_failing_rows_become_error_rows_and_the_run_goes_on(llava_model, data, head, tmp_path, monkeypatch):
    from skin_offline.eval import cluster
    from skin_offline.eval.choices import Protocol
    from skin_offline.eval.vqa import VQAJob, VQARow, evaluate_vqa, read_questions

    for k, v in head["env"].items():
        if k.startswith("RAY_") or k.lower().endswith("proxy"):
            monkeypatch.setenv(k, v)
    import ray.cloudpickle  # first import of ray in this process: after the variables above

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    rows = read_questions(data / "q.csv")
    rows[4] = VQARow(4, rows[4].image, "describe " * 4000, rows[4].answer, rows[4].modality)  # > the context
    _local_eval(llava_model.bundle_dir, data, tmp_path / "local", "greedy")
    job = FlakyJob(VQAJob(Protocol.GREEDY, 3, 6), str(tmp_path / "killed-once"))
    spec = cluster.ClusterSpec(address=head["address"], actors=2)
    with cluster.Cluster(spec, llava_model.bundle_dir, None, job) as c:
        s = evaluate_vqa(c.source, rows, data / "images", tmp_path / "ray", {"ray": c.stats})
    got = _answers(tmp_path / "ray" / "predictions.csv")
    want = _answers(tmp_path / "local" / "predictions.csv")
    assert sorted(got) == ["0", "1", "2", "4", "5"]  # row 3: missing image
    assert got["1"]["error"] == f"RuntimeError: this row always fails (failed {cluster.ROW_ATTEMPTS} times)"
    assert got["1"]["prediction"] == "" and got["1"]["question"] == rows[1].question
    assert got["4"]["error"].startswith("ContextLengthError") and "failed" not in got["4"]["error"]  # not retried
    for i in ("0", "2", "5"):
        assert got[i] == want[i]
    assert s["errors"] == 2 and s["answered"] == 3 and c.stats["actor_restarts"] == 1
    assert any("2 row(s) failed" in n for n in s["notes"])
    # a rerun tries the error rows again (and only them): still failing, still one line each in the summary
    with cluster.Cluster(spec, llava_model.bundle_dir, None, job) as c:
        again = evaluate_vqa(c.source, rows, data / "images", tmp_path / "ray")
    assert again["this_run"]["answered"] == 2 and again["errors"] == 2 and again["metrics"] == s["metrics"]


def test_unreachable_address_and_missing_bundle_are_one_line(llava_model, data, head, tmp_path):
    args = _eval_args(llava_model.bundle_dir, data, tmp_path / "out", "greedy")
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    r = _cli([*args, "--ray", f"127.0.0.1:{port}"], head["env"], timeout=120)
    assert r.returncode == 1 and time.monotonic() - t0 < 60
    assert r.stderr.strip().splitlines() == [
        f"error: cannot reach the Ray cluster at 127.0.0.1:{port} (Connection "
        f"refused within 10 s); check the address and that `ray start --head` "
        f"runs there"
    ]
    assert not (tmp_path / "out").exists()

    gone = tmp_path / "not-on-the-nodes"
    r = _cli(_eval_args(gone, data, tmp_path / "out", "greedy", extra=["--ray", head["address"]]), head["env"])
    assert r.returncode == 4, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: bundle {gone} not found on node "), r.stderr
    assert "(127.0.0.1, node " in lines[0] and "same absolute path" in lines[0]
    assert not (tmp_path / "out" / "predictions.csv").exists()

    r = _cli([*args, "--actors", "2"], head["env"])
    assert (
        r.returncode == 2
        and r.stderr.strip() == "error: --actors needs --ray (the actors are Ray's); drop it or add --ray"
    )
    r = _cli([*args, "--ray", head["address"], "--actors", "2", "--threads", "2"], head["env"])
    assert r.returncode == 2 and "room for 1 actor(s) of --threads 2, not 2" in r.stderr, r.stderr


NON_LOOPBACK = re.compile(r'inet_addr\("(?!127\.)[^"]*"\)|inet_pton\(AF_INET6, "(?!::1"|::ffff:127\.)[^"]*"')


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (Debian's strace package)")
def test_local_ray_uses_loopback_only_and_logs_no_patient_data(llava_model, data, tmp_path):
    """A bare `--ray` starts a Ray on this machine: every socket of every process it starts connects, binds and
    sends on 127.0.0.1 / ::1 only (strace -f sees them all, Ray's cloud-metadata and IP-discovery probes included),
    and Ray's logs hold no question, answer, prediction or image name."""
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    try:
        env = dict(os.environ, RAY_TMPDIR=tmp, RAY_AUTH_TOKEN=secrets.token_hex(32), SKIN_OFFLINE_PROGRESS_INTERVAL="0")
        env.pop("RAY_ADDRESS", None)
        trace = tmp_path / "trace.txt"
        r = subprocess.run(
            [
                "strace",
                "-f",
                "-qq",
                "-e",
                "trace=connect,bind,sendto,sendmsg",
                "-o",
                str(trace),
                *CLI,
                *_eval_args(llava_model.bundle_dir, data, tmp_path / "ray", "greedy", extra=["--ray", "--actors", "2"]),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        lines = trace.read_text().splitlines()
        inet = [ln for ln in lines if "AF_INET" in ln]
        assert len(inet) > 20  # Ray's processes talked (over loopback)
        assert [ln for ln in inet if NON_LOOPBACK.search(ln)] == []
        assert "ray: 2 actor(s) x 1 thread(s) on 1 node(s) of a local Ray" in r.stderr

        secrets_ = {q[0] for q in QUESTIONS} | {q[1] for q in QUESTIONS} | {q[2] for q in QUESTIONS}
        secrets_ |= {
            rec["prediction"] for rec in _rows(tmp_path / "ray" / "predictions.csv") if len(rec["prediction"]) > 8
        }
        logs = [p for p in Path(tmp).rglob("*") if p.is_file() and not p.is_socket()]
        assert any(p.name.startswith("worker-") for p in logs)  # the actors' captured stdout/stderr are among them
        for p in logs:
            text = p.read_bytes().decode("utf-8", "replace")
            leaked = [s for s in secrets_ if s in text]
            assert not leaked, (p, leaked)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
