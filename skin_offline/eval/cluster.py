"""`eval --ray` / `classify-eval --ray`: the rows answered by Ray actors, each loading the bundle once; the driver
(this process) feeds them rows and hands each result to runlog.run_rows as it arrives, which writes the same
resumable CSV and progress display as a local run.

    with Cluster(ClusterSpec(address=None, threads=1, batch=1), bundle, None, VQAJob(Protocol.GREEDY)) as c:
        evaluate_vqa(c.source, rows, images, out)

Why actors fed by the driver and not Ray Data `map_batches` with an actor pool: the driver must write every row
to the resumable CSV as soon as it is answered, decide per row what a failure means (retry, or an error row
after ROW_ATTEMPTS), and show one progress display; Ray Data owns the stream, retries whole blocks, prints its
own progress and logs, and needs pyarrow/pandas. Plain actors with Ray's own restart machinery (max_restarts,
ray.wait) do the job with a small loop: each actor keeps `batch` rows in flight (max_concurrency=batch, so its
engine decodes them together, as `--batch` does locally), and a row goes to whichever actor has room.

What travels where: the bundle is read by each actor from its path, which every node must see (shared storage,
the same absolute path); the CSV and images stay with the driver, which sends each row's image bytes with the
row (nothing else to share). Actors print and log nothing: rows, questions, answers and image names go back to
the driver only; Ray's logs hold counts and process events.

Network: a local Ray (no ADDRESS) binds to 127.0.0.1 only, with usage-stats reporting and the dashboard off and
Ray's cloud-metadata probes sent to a closed loopback port (see `connect`; measured with strace: benchmarks/README.md
"Ray evaluation"); with an ADDRESS this process talks to that cluster only, its own usage-stats reporting off.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import BundleError, SkinOfflineError, UsageError
from .runlog import Done, answer_row, describe

LOCAL = "local"  # `--ray` without an address: start a Ray on this machine
CONNECT_TIMEOUT_S = 10.0  # a named cluster that does not answer within this is reported as unreachable
ROW_ATTEMPTS = 3  # a row whose actor died, or whose work raised, this many times becomes an error row
ACTOR_RESTARTS = 4  # Ray restarts a killed actor this many times, then the run goes on without it
FAIL_FAST_ROWS = 3  # this many rows failed before any succeeded: the fault is not the rows', stop


class ClusterError(SkinOfflineError):
    """The Ray cluster cannot be reached, or cannot run the actors."""

    exit_code = 1


@dataclass(frozen=True)
class ClusterSpec:
    address: str | None = None  # None: start a local Ray; "auto", "host:port" (GCS) or "ray://host:port" (Ray Client)
    actors: int | None = None  # None: as many as the cluster's CPUs allow at `threads` each
    threads: int = 1  # onnxruntime intra-op threads per actor (= the CPUs Ray reserves for it)
    batch: int = 1  # rows in flight per actor, decoded together by its engine


@dataclass(frozen=True)
class Failed:
    """A row whose work raised on the actor (retried by the driver up to ROW_ATTEMPTS)."""

    reason: str


@dataclass
class ActorInfo:
    node: str  # "hostname (ip, node 1a2b3c4d)": two nodes of one machine differ by Ray's node id
    pid: int
    problem: str = ""  # why it cannot work (bundle missing on its node, unreadable, ...): one line
    problem_exit: int = BundleError.exit_code  # the exit code of the error it stands for
    precision: str = ""
    random_weights: bool = False
    notices: list[str] = field(default_factory=list)
    load_s: float = 0.0  # SkinVL.load on the actor


def _node_name() -> str:
    import ray

    return (
        f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, node {ray.get_runtime_context().get_node_id()[:8]})"
    )


class EvalActor:
    """One Ray actor: loads the bundle once, then answers rows with the same per-row code as a local run. It prints
    and logs nothing (rows, questions, answers and paths go back to the driver only)."""

    def __init__(self, bundle: str, threads: int, precision: str | None, batch: int, job: Callable):
        self.info_ = ActorInfo(node=_node_name(), pid=os.getpid())
        if not (Path(bundle) / "manifest.json").is_file():
            # reported by the driver as one line; raising here would bury it in a traceback
            self.info_.problem = (
                f"bundle {bundle} not found on node {self.info_.node}; every node must see the "
                f"bundle at the same absolute path (shared storage)"
            )
            return
        try:
            from .. import names
            from ..runtime.pipeline import SkinVL

            t0 = time.perf_counter()
            model = SkinVL.load(bundle, threads=threads, precision=precision, parallel=batch)
            self.info_.load_s = round(time.perf_counter() - t0, 3)
            self.info_.precision = model.manifest.pick(names.ROLE_DECODER, precision).precision.value
            self.info_.random_weights = bool(model.manifest.random_weights)
            self.info_.notices = list(model.bundle.notices)
        except SkinOfflineError as e:
            self.info_.problem, self.info_.problem_exit = f"node {self.info_.node}: {e}", e.exit_code
            return
        self.work = job(model)

    def info(self) -> ActorInfo:
        return self.info_

    def answer(self, row, image: bytes) -> Done | Failed:
        try:
            done = answer_row(row, image, self.work)
        except Exception as e:  # returned, not raised: Ray would log the traceback (it may quote a row's data)
            return Failed(describe(e))
        return done


_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_user_loopback_env = os.environ.get(_LOOPBACK_ENV)


def _loopback_only(on: bool) -> None:
    """Ray picks the machine's outward IP (a UDP "connect" to 8.8.8.8), binds its servers to it and turns a loopback
    address into it; with Ray's own switch for machines without clusters (its name says Windows/macOS; it works
    anywhere) a local Ray, or one named by 127.0.0.1, stays on 127.0.0.1. The processes a local Ray starts read the
    variable; this process reads it when ray is imported, so an already imported ray is told again."""
    if on:
        os.environ[_LOOPBACK_ENV] = "0"
    elif _user_loopback_env is None:
        os.environ.pop(_LOOPBACK_ENV, None)
    else:
        os.environ[_LOOPBACK_ENV] = _user_loopback_env
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = constants.env_bool(_LOOPBACK_ENV, not constants.IS_WINDOWS_OR_OSX)


def _loopback(address: str) -> bool:
    import ipaddress

    host = address.split("://")[-1].rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _probe(address: str) -> None:
    """Fail within CONNECT_TIMEOUT_S with one line when a named cluster does not answer: ray.init itself waits minutes
    for an unreachable GCS address (measured: > 150 s with Ray 2.60)."""
    from ray._private import services  # Ray's own resolution of "auto" (RAY_ADDRESS, or this machine's cluster)

    if address.startswith("ray://"):
        target = address[len("ray://") :]
    else:
        try:
            target = services.canonicalize_bootstrap_address(address, None)
        except Exception as e:  # "auto" with no cluster running: Ray's ConnectionError says what to do
            raise ClusterError(f"cannot find a Ray cluster for --ray {address}: {e}") from None
        if target is None:
            raise ClusterError(
                f"cannot find a Ray cluster for --ray {address}; start one with `ray start --head` or pass its address"
            ) from None
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        at = address if target == address else f"{address} = {target}"
        raise ClusterError(
            f"cannot reach the Ray cluster at {at} ({why} within {CONNECT_TIMEOUT_S:.0f} s); "
            f"check the address and that `ray start --head` runs there"
        ) from None


# Ray's head always starts a small web process (even with include_dashboard=False) whose usage-stats module asks the
# cloud metadata service (169.254.169.254, metadata.google.internal) what machine it runs on, whether or not usage
# stats are enabled (ray 2.60 dashboard/modules/usage_stats/usage_stats_head.py `run`). It does so with `requests`,
# which honours the proxy variables: the processes a local Ray starts get a proxy on a closed loopback port, so
# those probes end on 127.0.0.1 (measured with strace: benchmarks/README.md "Ray evaluation").
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens there
_NO_NETWORK_ENV = {
    "HTTP_PROXY": DEAD_PROXY,
    "HTTPS_PROXY": DEAD_PROXY,
    "http_proxy": DEAD_PROXY,
    "https_proxy": DEAD_PROXY,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def connect(address: str | None) -> None:
    """ray.init: a local Ray on 127.0.0.1 (address None) or the named cluster, with nothing reported anywhere."""
    import logging

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # never send usage statistics (this process and what it starts)
    _loopback_only(address is None or _loopback(address))
    if address is not None:
        _probe(address)
    import ray

    kw = dict(
        log_to_driver=False,  # workers' stdout/stderr stay in the nodes' Ray logs (actors print nothing)
        logging_level=logging.ERROR,
    )  # Ray's own start-up lines would mix with the command's output
    saved = {}
    if address is None:
        kw["include_dashboard"] = False
        saved = {k: os.environ.get(k) for k in _NO_NETWORK_ENV}
        os.environ.update(_NO_NETWORK_ENV)  # inherited by the processes ray.init starts; restored below
    try:
        # joining a cluster starts no process here, so stderr can be held: Ray's C++ core writes a warning line a
        # second while it retries a refused connection (~20 s); the outcome is reported as one line instead
        with contextlib.nullcontext() if address is None else _held_stderr():
            # "local": always a new Ray here; a bare ray.init() would join a cluster `ray start` left recorded in
            # Ray's temp folder, and wait minutes on one that is gone
            ray.init(address or "local", **kw)
    except (ConnectionError, ray.exceptions.AuthenticationError) as e:
        hint = (
            "; if the cluster uses token authentication (Ray's default), set RAY_AUTH_MODE=token and give this "
            "machine the cluster's token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token)"
            if os.environ.get("RAY_AUTH_MODE") != "token"
            else ""
        )
        raise ClusterError(
            f"cannot connect to the Ray cluster at {address}: {' '.join(str(e).split())}{hint}"
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _held_stderr():
    """File descriptor 2 pointed at a temporary file (dropped afterwards) for the duration."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _capacity(threads: int) -> tuple[int, int]:
    """(actors of `threads` CPUs that fit on the alive nodes, the cluster's CPUs)."""
    import ray

    fit, cpus = 0, 0
    for n in ray.nodes():
        if n.get("Alive"):
            c = int(n.get("Resources", {}).get("CPU", 0))
            fit += c // threads
            cpus += c
    return fit, cpus


class Cluster:
    """Connect, start the actors and check them (bundle on every node, one precision); `source` is the row source for
    runlog.run_rows. Use as a context manager: leaving it kills the actors and disconnects."""

    def __init__(
        self,
        spec: ClusterSpec,
        bundle: str | Path,
        precision: str | None,
        job: Callable,
        log: Callable[[str], None] | None = None,
    ):
        self.spec = spec
        self.bundle = str(Path(bundle).expanduser().absolute())  # the path every node must see
        self.precision = precision
        self.job = job
        self.log = log or (lambda m: None)
        self.actors: list = []
        self.infos: list[ActorInfo] = []
        self.stats: dict = {}  # for summary.json: address, actors, threads, rows per node, restarts

    # --- lifetime ---
    def __enter__(self) -> "Cluster":
        t0 = time.perf_counter()
        connect(self.spec.address)  # first: it sets what Ray reads when imported
        import ray

        try:
            self._start(ray)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        where = "a local Ray" if self.spec.address is None else f"Ray at {self.spec.address}"
        nodes = sorted({i.node for i in self.infos})
        self.stats["ready_s"] = round(time.perf_counter() - t0, 3)
        self.stats["actor_load_s"] = [i.load_s for i in self.infos]
        self.log(
            f"ray: {len(self.actors)} actor(s) x {self.spec.threads} thread(s) on {len(nodes)} node(s) of {where}, "
            f"ready in {self.stats['ready_s']:.1f} s"
        )
        return self

    def __exit__(self, *_) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []
        if ray.is_initialized():
            ray.shutdown()

    def _start(self, ray) -> None:
        spec = self.spec
        fit, cpus = _capacity(spec.threads)
        n = spec.actors or fit
        if n < 1 or n > fit:
            raise UsageError(
                f"the Ray cluster has {cpus} CPU(s): room for {fit} actor(s) of --threads {spec.threads}, "
                f"not {n}; lower --actors or --threads, or add nodes"
            )
        actor = ray.remote(EvalActor).options(
            num_cpus=spec.threads,
            max_concurrency=spec.batch,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        )  # one per node first: the rows spread over every node
        self.actors = [actor.remote(self.bundle, spec.threads, self.precision, spec.batch, self.job) for _ in range(n)]
        try:
            # waits while actors load the bundle; a restart (killed while loading) is waited for too
            self.infos = ray.get([a.info.options(max_task_retries=-1).remote() for a in self.actors])
        except ray.exceptions.RayActorError as e:
            # Ray's message ends with the cause's own last line ("ModuleNotFoundError: ...") when there is one
            cause = next((ln.strip() for ln in reversed(str(e).splitlines()) if ln.strip()), type(e).__name__)
            raise ClusterError(
                f"an actor died while starting (out of memory on its node? skin-offline missing or "
                f"another version there?): {cause[:300]}"
            ) from None
        bad = next((i for i in self.infos if i.problem), None)
        if bad is not None:
            err = ClusterError(bad.problem)
            err.exit_code = bad.problem_exit  # the code the same error has in a local run (bundle: 4)
            raise err
        kinds = {i.precision for i in self.infos}
        if len(kinds) > 1:
            raise BundleError(
                f"the nodes see different bundles at {self.bundle} (precisions {', '.join(sorted(kinds))}); "
                f"point every node at the same shared bundle"
            )
        self.stats = {
            "address": spec.address or LOCAL,
            "actors": n,
            "threads_per_actor": spec.threads,
            "batch_per_actor": spec.batch,
            "rows_per_node": {},
            "actor_restarts": 0,
            "row_retries": 0,
        }

    @property
    def info(self) -> ActorInfo:
        """The first actor's view of the bundle (all actors agree: checked at start)."""
        return self.infos[0]

    # --- the rows ---
    def source(self, pending: list) -> Iterator[Done]:
        """Send [(row, image path), ...] to the actors, `batch` in flight per actor; yield each Done as it arrives.
        A row whose actor died (Ray restarts the actor) or whose work raised is sent again, to any actor, up to
        ROW_ATTEMPTS times, then comes back as an error row; the run goes on."""
        import ray
        from ray.exceptions import RayActorError

        queue = deque((r, path, 0) for r, path in pending)  # (row, path, attempts so far)
        inflight: dict = {}  # ref -> (actor slot, row, path, attempts)
        probes: dict = {}  # ref -> slot: waiting for a died actor's restart (or for it to be gone for good)
        load = [0] * len(self.actors)
        alive = [True] * len(self.actors)
        succeeded, gave_up = 0, []
        per_node = self.stats["rows_per_node"]

        def retry_or_fail(row, path, attempts, reason):
            nonlocal gave_up
            if attempts < ROW_ATTEMPTS:
                self.stats["row_retries"] += 1
                queue.appendleft((row, path, attempts))
                return None
            gave_up.append(reason)
            if not succeeded and len(gave_up) >= FAIL_FAST_ROWS:
                raise ClusterError(
                    f"the first {len(gave_up)} rows failed {ROW_ATTEMPTS} times each on the actors "
                    f"({reason}); stopping (a rerun resumes)"
                )
            return Done(row, None, 0.0, error=f"{reason} (failed {attempts} times)")

        while queue or inflight:
            for slot, a in enumerate(self.actors):
                while alive[slot] and slot not in probes.values() and load[slot] < self.spec.batch and queue:
                    row, path, attempts = queue.popleft()
                    try:
                        image = Path(path).read_bytes()
                    except OSError:  # unreadable on the driver: listed with the missing images, as locally
                        yield Done(row, None, 0.0)
                        continue
                    inflight[a.answer.remote(row, image)] = (slot, row, path, attempts)
                    load[slot] += 1
            if not inflight and not probes:
                if not any(alive):
                    raise ClusterError(
                        f"every actor died more than {ACTOR_RESTARTS} times; stopping with "
                        f"{len(queue)} row(s) left (a rerun resumes)"
                    )
                continue
            ready, _ = ray.wait([*inflight, *probes], num_returns=1)
            ref = ready[0]
            if ref in probes:
                slot = probes.pop(ref)
                try:
                    ray.get(ref)  # restarted
                except RayActorError:
                    alive[slot] = False  # past its restarts: the others carry on
                continue
            slot, row, path, attempts = inflight.pop(ref)
            load[slot] -= 1
            try:
                out = ray.get(ref)
            except RayActorError as e:  # its process died (killed, out of memory): Ray restarts it
                if slot not in probes.values():
                    self.stats["actor_restarts"] += 1
                    probes[self.actors[slot].info.options(max_task_retries=-1).remote()] = slot
                done = retry_or_fail(row, path, attempts + 1, f"its actor died ({type(e).__name__})")
            else:
                if isinstance(out, Failed):
                    done = retry_or_fail(row, path, attempts + 1, out.reason)
                else:
                    done = out
                    succeeded += 1
                    node = self.infos[slot].node
                    per_node[node] = per_node.get(node, 0) + 1
            if done is not None:
                yield done
