"""`eval` on this machine vs `eval --ray`: questions/minute, Ray's overhead, actors x threads, and a two-node run.

    python benchmarks/ray_eval.py setup DIR [--rows 24]         # bench-preset checkpoint -> int8 bundle + a synthetic set
    python benchmarks/ray_eval.py run DIR [--rounds 3] [--protocol paper] [--max-new-tokens 32]
        [--configs local:2,ray:1x2,ray:2x1] [--bare] [--json out.json]
    python benchmarks/ray_eval.py two-node DIR                   # `ray start --head` + a second `ray start --address`

`run` starts one Ray head for the whole call (`ray start --head`, 127.0.0.1, token authentication, this machine's
CPUs) and runs, interleaved round by round (A B C ... A B C ...), the same `skin-offline eval` command as:
- `local T=n`: this process, `--threads n` (no Ray);
- `ray A x T`: `--ray 127.0.0.1:PORT --actors A --threads T` (each actor loads the bundle once).
Figures per configuration, medians over rounds: questions/minute of the rows (summary.json `this_run`: from the
first row sent to the last result written, bundle loads excluded), the whole command's wall time (process start,
Ray connection, bundle loads, rows), the actors' bundle load and their peak RSS / PSS (polled every 0.2 s: PSS
splits pages shared between processes, e.g. the weights' page cache), and the ratio of each rate to `local` at
the same total threads. The machine is shared: the rounds interleave so drift hits every configuration alike.

`two-node` starts a head with 1 CPU and a second node (`ray start --address`, 1 CPU, its own resources) on this
machine, on its network address (Ray allows a second node only there), and runs `--actors 2 --threads 1`: Ray's SPREAD puts one actor on each node; summary.json's
`ray.rows_per_node` shows the rows each answered.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SKIN = str(BIN / "skin-offline")
RAY = str(BIN / "ray")
MM_SKIN = Path(os.environ.get("MM_SKIN_CSV", REPO.parent.parent / "shared" / "data" / "MM-Skin_test.csv"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(tmp: str) -> dict:
    """Loopback only, no usage stats, a token of its own, Ray's files under `tmp` (nothing under ~/.ray)."""
    env = dict(
        os.environ,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_TMPDIR=tmp,
    )
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[k] = "http://127.0.0.1:9"  # the head's cloud-metadata probes end on loopback (see eval/cluster.py)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.pop("RAY_ADDRESS", None)
    return env


class RayNode:
    """`ray start [--head | --address A] --block` in its own process group; stop() ends that group only (never
    `ray stop`, which ends every Ray on the machine)."""

    def __init__(
        self,
        env: dict,
        cpus: int,
        head: bool,
        address: str | None = None,
        port: int | None = None,
        resources: dict | None = None,
    ):
        cmd = [RAY, "start", "--block", "--num-cpus", str(cpus), "--disable-usage-stats"]
        cmd += ["--head", "--port", str(port), "--include-dashboard", "false"] if head else ["--address", address]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def stop(self) -> None:
        import psutil

        try:
            family = [self.proc.pid] + [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            family = [self.proc.pid]
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_port(port: int, timeout: float = 120, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise SystemExit(f"no Ray head on port {port} after {timeout:.0f} s")


def wait_nodes(env: dict, address: str, n: int, timeout: float = 120) -> None:
    code = (
        f"import ray,time\nray.init('{address}', logging_level=40)\nt=time.time()\n"
        f"while sum(x['Alive'] for x in ray.nodes()) < {n} and time.time()-t < {timeout}: time.sleep(0.5)\n"
        f"print(sum(x['Alive'] for x in ray.nodes()))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout + 60)
    if out.stdout.strip() != str(n):
        raise SystemExit(f"expected {n} Ray nodes, got {out.stdout.strip() or out.stderr[-400:]}")


class Peak:
    """The largest RSS / PSS seen, polling a set of processes (the command, or its actors) every 0.2 s."""

    def __init__(self, pick):
        self.pick, self.rss, self.pss, self._stop = pick, 0, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            for p in self.pick():
                try:
                    m = p.memory_full_info()
                    self.rss, self.pss = max(self.rss, m.rss), max(self.pss, getattr(m, "pss", 0))
                except psutil.Error:
                    pass
            self._stop.wait(0.2)

    def stop(self) -> "Peak":
        self._stop.set()
        self._t.join()
        return self


def actors_of(node: RayNode):
    import psutil

    def pick():
        try:
            kids = psutil.Process(node.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        out = []
        for c in kids:
            try:
                if c.cmdline() and c.cmdline()[0].startswith("ray::EvalActor"):
                    out.append(c)
            except psutil.Error:
                pass
        return out

    return pick


def run_eval(
    d: Path,
    out: Path,
    env: dict,
    threads: int,
    args,
    ray: str | None = None,
    actors: int | None = None,
    node: RayNode | None = None,
) -> dict:
    import psutil

    cmd = [
        SKIN,
        "eval",
        str(d / "bundle"),
        "--csv",
        str(d / "set" / "q.csv"),
        "--modality-csv",
        str(d / "set" / "modality.csv"),
        "--images",
        str(d / "set" / "images"),
        "--protocol",
        args.protocol,
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--threads",
        str(threads),
        "--out",
        str(out),
        "--quiet",
    ]
    if ray:
        cmd += ["--ray", ray, "--actors", str(actors)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    me = psutil.Process(proc.pid)
    peak = Peak(actors_of(node) if ray else (lambda: [me]))
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    peak.stop()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.strip()[-600:]}")
    s = json.loads((out / "summary.json").read_text())
    r = s.get("ray", {})
    return {
        "qpm": s["this_run"]["questions_per_minute"],
        "wall_s": wall,
        "answered": s["this_run"]["answered"],
        "rss_gb": peak.rss / 1e9,
        "pss_gb": peak.pss / 1e9,
        "load_s": max(r.get("actor_load_s") or [0]),
        "ready_s": r.get("ready_s", 0.0),
        "rows_per_node": r.get("rows_per_node", {}),
    }


def cmd_setup(a) -> None:
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "bundle" / "manifest.json").exists():
        subprocess.run(
            [SKIN, "make-demo-checkpoint", str(d / "ckpt"), "--layout", "llava", "--preset", a.preset], check=True
        )
        subprocess.run(
            [SKIN, "export", str(d / "ckpt"), str(d / "bundle"), "--precision", a.precision, "--quiet"], check=True
        )
    sys.path.insert(0, str(REPO))
    from skin_offline.eval.synthetic import write_synthetic_set

    write_synthetic_set(MM_SKIN, d / "set", rows=a.rows)
    print(f"{a.preset}-preset {a.precision} bundle and a {a.rows}-row synthetic set in {d}")


def parse_configs(text: str) -> list[tuple[str, int, int | None]]:
    """ "local:2,ray:1x2,ray:2x1" -> [(name, threads per process/actor, actors or None for local), ...]."""
    out = []
    for item in text.split(","):
        kind, _, spec = item.strip().partition(":")
        if kind == "local":
            out.append((f"local T={int(spec)}", int(spec), None))
        else:
            actors, _, threads = spec.partition("x")
            out.append((f"ray {int(actors)} x {int(threads)}", int(threads), int(actors)))
    return out


def cmd_run(a) -> None:
    d = Path(a.dir)
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env = ray_env(tmp)
    port = free_port()
    head = RayNode(env, os.cpu_count() or 2, head=True, port=port)
    configs = parse_configs(a.configs)
    results: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    try:
        wait_port(port)
        for rnd in range(a.rounds):
            order = configs if rnd % 2 == 0 else configs[::-1]  # alternate the order: no configuration always first
            for name, threads, actors in order:
                out = Path(tempfile.mkdtemp(prefix="out", dir=tmp))
                r = run_eval(d, out, env, threads, a, f"127.0.0.1:{port}" if actors else None, actors, head)
                results[name].append(r)
                print(
                    f"round {rnd + 1} {name:10s} {r['qpm']:7.2f} q/min  wall {r['wall_s']:6.1f} s  "
                    f"load {r['load_s']:4.1f} s  rss {r['rss_gb']:.2f} GB  pss {r['pss_gb']:.2f} GB",
                    flush=True,
                )
    finally:
        head.stop()
    bare = None
    if a.bare:  # one bare `--ray` (a Ray started by the command itself, the head above gone): its start-up cost
        out = Path(tempfile.mkdtemp(prefix="out", dir=tmp))
        bare = run_eval(d, out, env, 1, a, "local", 2, head)
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("qpm", "wall_s", "load_s", "rss_gb", "pss_gb")}
        for name, rs in results.items()
    }
    base = {t: med[name]["qpm"] for name, t, actors in configs if actors is None}
    print(
        f"\n{a.rounds} rounds, {next(iter(results.values()))[0]['answered']} questions each, protocol {a.protocol}, "
        f"max {a.max_new_tokens} new tokens, bundle {d / 'bundle'}; medians"
    )
    print(
        "| configuration | questions/min | vs local, same total threads | whole command (s) | bundle load per actor (s) "
        "| peak RSS per process/actor (GB) | peak PSS (GB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, threads, actors in configs:
        m = med[name]
        total = threads * (actors or 1)
        ratio = f"{m['qpm'] / base[total]:.3f}" if total in base else "-"
        print(
            f"| {name} | {m['qpm']:.2f} | {ratio} | {m['wall_s']:.1f} | "
            f"{m['load_s'] if actors else float('nan'):.1f} | {m['rss_gb']:.2f} | {m['pss_gb']:.2f} |"
        )
    if bare:
        print(
            f"\nbare --ray (a local Ray started by the command, 2 actors x 1 thread): ready in {bare['ready_s']:.1f} s, "
            f"whole command {bare['wall_s']:.1f} s, {bare['qpm']:.2f} questions/min"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "medians": med, "bare": bare}, indent=2))


def cmd_two_node(a) -> None:
    d = Path(a.dir)
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    # Ray refuses a second node under its loopback-only switch, so these two nodes use the machine's address, as
    # the nodes of a real cluster do (the head's ports are then reachable from the network for the run)
    env = ray_env(tmp)
    del env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
    ip = subprocess.run(
        [sys.executable, "-c", "from ray._private.services import get_node_ip_address as g; print(g())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    port = free_port()
    head = RayNode(env, 1, head=True, port=port, resources={"node_a": 1})
    second = None
    try:
        wait_port(port, host=ip)
        second = RayNode(env, 1, head=False, address=f"{ip}:{port}", resources={"node_b": 1})
        wait_nodes(env, f"{ip}:{port}", 2)
        out = Path(tempfile.mkdtemp(prefix="out", dir=tmp))
        r = run_eval(d, out, env, 1, a, f"{ip}:{port}", 2, head)
    finally:
        if second is not None:
            second.stop()
        head.stop()
    print(
        f"two nodes (1 CPU each) on this machine, 2 actors x 1 thread: {r['qpm']:.2f} questions/min, "
        f"whole command {r['wall_s']:.1f} s"
    )
    for node, n in sorted(r["rows_per_node"].items()):
        print(f"  {node}: {n} rows")
    if len(r["rows_per_node"]) != 2:
        raise SystemExit("the rows did not spread over both nodes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("dir")
    s.add_argument("--rows", type=int, default=24)
    s.add_argument("--precision", default="int8")
    s.add_argument("--preset", default="bench", choices=["bench", "tiny"])
    for name in ("run", "two-node"):
        r = sub.add_parser(name)
        r.add_argument("dir")
        r.add_argument("--protocol", default="paper", choices=["paper", "greedy"])
        r.add_argument("--max-new-tokens", type=int, default=32)
        if name == "run":
            r.add_argument("--rounds", type=int, default=3)
            r.add_argument(
                "--configs",
                default="local:2,ray:1x2,ray:2x1",
                help="local:THREADS and ray:ACTORSxTHREADS, comma-separated",
            )
            r.add_argument("--bare", action="store_true", help="also time one bare --ray (Ray started by the command)")
            r.add_argument("--json")
    a = p.parse_args()
    {"setup": cmd_setup, "run": cmd_run, "two-node": cmd_two_node}[a.cmd](a)


if __name__ == "__main__":
    main()
