"""Real Chroma servers for tests: a plain ``chroma run`` and ``safechroma serve``, on free ports
of 127.0.0.1, always torn down (the suite's conftest fails a test that leaves a child behind).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

# The Rust server that the `chroma` console script runs (chromadb/cli/cli.py: app()).
_CHROMA = (
    "import sys, chromadb_rust_bindings; chromadb_rust_bindings.cli(['chroma', 'run', sys.argv[1]])"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_heartbeat(
    port: int, timeout: float = 60.0, proc: subprocess.Popen[Any] | None = None
) -> None:
    give_up = time.monotonic() + timeout
    with httpx.Client(timeout=1.0, trust_env=False) as client:
        while time.monotonic() < give_up:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before answering")
            try:
                if client.get(f"http://127.0.0.1:{port}/api/v2/heartbeat").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"no heartbeat on port {port} within {timeout} s")


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(p) for p in f.read().split())
    except OSError:
        pass
    return out


def alive(pid: int) -> bool:
    """Running or stopped, not a zombie and not gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class PlainChroma:
    """``chroma run`` on ``path`` (an explicit YAML config on 127.0.0.1), no supervision."""

    def __init__(self, path: str, port: int, workdir: Path) -> None:
        self.path, self.port = path, port
        self.config = workdir / f"chroma-{port}.yaml"
        self.config.write_text(
            f'persist_path: {json.dumps(path)}\nlisten_address: "127.0.0.1"\nport: {port}\n'
        )
        self.log_path = workdir / f"chroma-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PlainChroma:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHROMA, str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("CHROMA_")},
            )
        wait_heartbeat(self.port, proc=self.proc)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        return self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> PlainChroma:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Serve:
    """``python -m safechroma serve PATH --port P [args]`` as a child; stderr kept in a file."""

    def __init__(self, path: str, port: int, workdir: Path, *args: str) -> None:
        self.path, self.port = path, port
        self.err_path = workdir / f"serve-{port}.err"
        self.out_path = workdir / f"serve-{port}.out"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []
        self._ready_lines = 0

    def start(self, wait: bool = True) -> Serve:
        out, err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self._files = [out, err]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "safechroma", "serve", self.path, "--port", str(self.port)]
            + list(self.args),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self, timeout: float = 90.0) -> int:
        """Wait until Chroma answers; returns the pid of the Chroma child."""
        assert self.proc is not None
        wait_heartbeat(self.port, timeout, self.proc)
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            kids = [p for p in children(self.proc.pid) if alive(p)]
            # serve prints its address once the child answers as itself
            if kids and self.stdout().count("serving ") > self._ready_lines:
                self._ready_lines = self.stdout().count("serving ")
                return kids[0]
            time.sleep(0.05)
        raise RuntimeError(f"serve has no answering child: {self.stderr()[-2000:]}")

    @property
    def chroma_pid(self) -> int:
        assert self.proc is not None
        kids = [p for p in children(self.proc.pid) if alive(p)]
        assert len(kids) == 1, kids
        return kids[0]

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stop(self) -> None:
        """Tear down whatever is left: SIGTERM, then SIGKILL to serve and its children."""
        if self.proc is not None and self.proc.poll() is None:
            kids = children(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for pid in kids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.proc.wait(30)
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
