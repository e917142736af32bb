"""Shared fixtures. The suite polices itself: a test that leaves a child process or an open
file descriptor behind fails (the pattern of loky's ``_check_subprocesses_number``)."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs  # noqa: E402


def _children(pid: int) -> set[int]:
    pids: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return pids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


def child_pids() -> set[int]:
    """Live (non-zombie) descendants of this process, read from /proc: workers are children of
    the worker template, which is a child of this process."""
    pids: set[int] = set()
    todo = [os.getpid()]
    while todo:
        for child in _children(todo.pop()):
            if child not in pids:
                pids.add(child)
                todo.append(child)
    live = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    live.add(pid)
        except OSError:
            continue
    return live


def lock_is_free(db: str) -> bool:
    """Whether no process holds the directory lock of ``db`` (taken and released at once)."""
    from safechroma.runtime import rendezvous
    from safechroma.runtime.lock import LOCK_NAME

    fd = rendezvous.try_lock(os.path.join(db, LOCK_NAME))
    if fd is None:
        return False
    os.close(fd)
    return True


def open_fds() -> set[str]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue
    return fds


@pytest.fixture(autouse=True, scope="session")
def shared_builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under pytest-xdist the test processes of one run build each Chroma directory spec once
    and copy it (tests/chroma_dirs.py): a 2,000-record base took each process 20 s."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_dir = tmp_path_factory.getbasetemp().parent  # shared by this run's processes
        os.environ[chroma_dirs.BUILD_CACHE_ENV] = str(run_dir / "chroma-builds")
    yield


@pytest.fixture(autouse=True, scope="session")
def worker_template() -> Iterator[None]:
    """The process-wide warm worker template (safechroma.runtime.template) lives as long as the
    process that uses safechroma, as in any program: start it before the first test so that the
    per-test leak check below does not count it."""
    from safechroma.runtime import template

    template.warm()
    yield


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves a worker process or a file descriptor behind."""
    before_pids = child_pids()
    before_fds = open_fds()
    yield
    deadline = time.monotonic() + 5.0
    collected = False
    while True:
        extra_pids = child_pids() - before_pids
        # Only what the library opens counts: sockets, pidfds, the lock file and worker logs
        # (pytest's own capture files come and go on their own schedule).
        extra_fds = {
            f
            for f in open_fds() - before_fds
            if "socket:" in f or "pidfd" in f or ".lock" in f or "safechroma" in f
        }
        if not extra_pids and not extra_fds:
            return
        if not collected:
            # A client the test dropped without closing is closed by its finalizer. A full
            # collection costs ~50 ms with chromadb loaded, so it runs only when something is
            # still open.
            gc.collect()
            collected = True
            continue
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    pytest.fail(f"leaked child processes {sorted(extra_pids)} / descriptors {sorted(extra_fds)}")


DIM = 16


def embed_text(text: str, dim: int = DIM) -> list[float]:
    """A deterministic toy embedding: no model, no network."""
    digest = hashlib.sha256(text.encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return [float(x) for x in rng.random(dim)]


class HashEmbedding(EmbeddingFunction[Documents]):
    """An embedding function defined in the test suite (travels to the worker by value)."""

    def __init__(self, dim: int = DIM) -> None:
        self.dim = dim

    def __call__(self, input: Documents) -> Embeddings:  # noqa: A002 - chromadb's name
        return [np.asarray(embed_text(t, self.dim), dtype=np.float32) for t in input]

    @staticmethod
    def name() -> str:
        return "safechroma-test-hash"

    def get_config(self) -> dict[str, int]:
        return {"dim": self.dim}

    @staticmethod
    def build_from_config(config: dict[str, int]) -> HashEmbedding:
        return HashEmbedding(config["dim"])

    def is_legacy(self) -> bool:
        return False


def vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, dim), dtype=np.float32)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "db")


def run_plain_chromadb(script: str, path: str) -> str:
    """Run ``script`` with plain chromadb on ``path`` in a child process (so the test process
    never opens a Chroma directory); ``path`` and ``chromadb`` are defined. Returns stdout."""
    code = "import sys, chromadb\npath = sys.argv[1]\n" + textwrap.dedent(script)
    proc = subprocess.run(
        [sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str, why: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (root only; otherwise the test is skipped with
    ``why``), unmounted afterwards."""
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); {why}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
