"""Drive chroma-mcp's real server over stdio MCP with the mcp package's own client.

What it owns: the program under test (a launcher file that registers a deterministic embedding
function only in the program's own code, then runs chroma-mcp's ``main``), one MCP session
with that program, and what /proc says about the processes behind it. No chromadb import: the
test process never opens a Chroma directory.

* :func:`write_launcher` - the program file (``python LAUNCHER --client-type persistent
  --data-dir DIR``), which writes its own pid to a file so the test knows which process is the
  program whatever ``safechroma run`` puts in between.
* :class:`Server` - ``async with Server(argv, ...) as s: await s.call(tool, **arguments)``;
  on exit every process the session started (the program, safechroma's template and workers)
  is gone, killed by pid if it outlives the program.
* :func:`holders` / :func:`descendants` - which processes have a file open, and a process tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, get_default_environment, stdio_client
from pydantic import ValidationError

EF_NAME = "hash_ef"
# How long a session's processes may outlive the program before the session kills them: a warm
# shared worker stays up to keep_warm (10 s by default) after a program that exited.
GRACE = 15.0
DIM = 16

LAUNCHER = '''\
"""chroma-mcp, offering one more embedding function, registered only in this program."""

import hashlib
import os
import sys

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function

import chroma_mcp.server


@register_embedding_function
class HashEF(EmbeddingFunction[Documents]):
    """Deterministic vectors from the text's SHA-256 (no model, no network)."""

    def __init__(self, dim: int = {dim}) -> None:
        self.dim = dim

    def __call__(self, input: Documents) -> Embeddings:
        out = []
        for text in input:
            digest = hashlib.sha256(text.encode()).digest()
            out.append(np.frombuffer(digest[: self.dim], dtype=np.uint8).astype(np.float32) / 255)
        return out

    @staticmethod
    def name() -> str:
        return "{name}"

    def get_config(self) -> dict:
        return {{"dim": self.dim}}

    @staticmethod
    def build_from_config(config: dict) -> "HashEF":
        return HashEF(config["dim"])

    def default_space(self) -> str:
        return "l2"

    def supported_spaces(self) -> list:
        return ["l2", "cosine", "ip"]

    def is_legacy(self) -> bool:
        return False


# chroma_create_collection looks the name up in this mapping and calls the class with no
# arguments (chroma_mcp/server.py 0.2.6).
chroma_mcp.server.mcp_known_embedding_functions["{name}"] = HashEF

with open({pidfile!r}, "w") as f:
    f.write(str(os.getpid()))

if __name__ == "__main__":
    sys.exit(chroma_mcp.server.main())
'''


def write_launcher(folder: Path) -> tuple[str, str]:
    """Write the program into ``folder``; returns (launcher path, pid file path)."""
    pidfile = str(folder / "program.pid")
    path = folder / "chroma_mcp_hash.py"
    path.write_text(LAUNCHER.format(dim=DIM, name=EF_NAME, pidfile=pidfile))
    return str(path), pidfile


def hash_vector(text: str) -> list[float]:
    """What the launcher's HashEF gives for ``text`` (float32, as Chroma stores it)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(text.encode()).digest()
    vec = np.frombuffer(digest[:DIM], dtype=np.uint8).astype(np.float32) / 255
    return [float(x) for x in vec]


# -- /proc ----------------------------------------------------------------------------------


def children(pid: int) -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out.update(int(p) for p in f.read().split())
    return out


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (zombies included: they are not reaped yet)."""
    seen: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def open_files(pid: int) -> set[str]:
    out: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def mapped_files(pid: int) -> set[str]:
    """Files mapped into ``pid``'s memory (an mmap outlives the descriptor it came from)."""
    out: set[str] = set()
    with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                out.add(parts[5].rstrip("\n").removesuffix(" (deleted)"))
    return out


def holders(path: str) -> set[int]:
    """Pids of every process of ours (any process /proc lets us read) that has ``path`` open."""
    real = os.path.realpath(path)
    found: set[int] = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and real in open_files(int(name)):
            found.add(int(name))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait until none of ``pids`` is alive; returns those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = {p for p in pids if alive(p)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is ``kind``, or a group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(e, kind) for e in exc.exceptions)
    return isinstance(exc, kind)


# -- one MCP session ------------------------------------------------------------------------


class ToolError(Exception):
    """chroma-mcp answered a tool call with ``isError`` (its message is the text)."""


class ServerDied(Exception):
    """The program died while a call waited for its answer (the mcp 1.6.0 client itself would
    wait for ever: it does not fail pending requests when the server's stdout closes)."""


class Server:
    """One run of the program, with an initialised MCP session over its stdio.

    Args:
        argv: the command (``argv[0]`` is the executable).
        errlog: file that receives the program's stderr.
        pidfile: where the launcher writes its pid.
        env: extra environment on top of the mcp client's default one (an MCP host passes
            only a few variables, as ``get_default_environment`` does).
        timeout: seconds any one request may take before the call fails.
    """

    def __init__(
        self,
        argv: list[str],
        errlog: Path,
        pidfile: str,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.params = StdioServerParameters(
            command=argv[0], args=argv[1:], env={**get_default_environment(), **(env or {})}
        )
        self.errlog_path = errlog
        self.pidfile = pidfile
        self.timeout = timeout
        self.program_pid = 0
        self.root = 0
        self.seen: set[int] = set()  # every process seen under the session's first process
        self.outlived: dict[int, str] = {}  # what was still alive GRACE s after the program
        self.ended_after = 0.0  # seconds from the program's end to the last process's
        self.stdout: list[str] = []  # the program's stdout lines that are not MCP messages
        self._stack = contextlib.AsyncExitStack()
        self.session: ClientSession

    async def __aenter__(self) -> Server:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.pidfile)
        before = children(os.getpid())
        errlog = self._stack.enter_context(open(self.errlog_path, "a"))
        try:
            read, write = await self._stack.enter_async_context(
                stdio_client(self.params, errlog=errlog)
            )
            self.root = self._find_root(before)
            messages = await self._sort_stdout(read)
            self.session = await self._stack.enter_async_context(
                ClientSession(messages, write, read_timeout_seconds=timedelta(seconds=self.timeout))
            )
            with anyio.fail_after(self.timeout):
                await self.session.initialize()
            with open(self.pidfile) as f:
                self.program_pid = int(f.read())
            self.track()
        except BaseException:
            await self.__aexit__(*sys.exc_info())
            raise
        return self

    async def _sort_stdout(
        self, read: MemoryObjectReceiveStream[Any]
    ) -> MemoryObjectReceiveStream[Any]:
        """Pass the program's MCP messages on; keep every other stdout line in ``self.stdout``
        (the mcp client reads each line as a message and turns the others into exceptions)."""
        send, receive = anyio.create_memory_object_stream[Any](0)
        self._stack.enter_context(receive)

        async def forward() -> None:
            async with send, read:
                async for item in read:
                    if isinstance(item, ValidationError):
                        self.stdout.append(str(item.errors()[0].get("input")))
                    else:
                        await send.send(item)

        tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._stack.callback(tg.cancel_scope.cancel)
        tg.start_soon(forward)
        return receive

    def _find_root(self, before: set[int]) -> int:
        new = children(os.getpid()) - before
        mine = [p for p in new if cmdline(p)[: len(self.params.args) + 1][1:] == self.params.args]
        assert len(mine) == 1, f"cannot tell the server among new children {new}"
        return mine[0]

    def _hung(self) -> None:
        self.outlived[self.root] = "did not end 30 s after SIGTERM: " + " ".join(cmdline(self.root))
        _kill(self.root)

    def track(self) -> set[int]:
        """Note every process now under the session's first process; returns them."""
        now = {self.root} | descendants(self.root)
        self.seen |= now
        return now

    async def __aexit__(self, *exc: Any) -> None:
        with contextlib.suppress(BaseException):
            self.track()
        # The mcp client sends SIGTERM to the process it started and waits for it; a program
        # that ignores SIGTERM gets SIGKILL after a while instead of hanging the test.
        watchdog = threading.Timer(30.0, self._hung)
        watchdog.start()
        try:
            await self._stack.aclose()
        except BaseException as err:
            # The client's SIGTERM finds no process when the program already died.
            if not _only(err, ProcessLookupError) or alive(self.root):
                raise
        finally:
            watchdog.cancel()
            # A worker may outlive its program for a while by design (a warm shared worker);
            # give it that while, then end whatever this session started, by pid.
            ended = time.monotonic()
            left = wait_gone(self.seen, GRACE)
            self.ended_after = time.monotonic() - ended
            for pid in left:
                self.outlived[pid] = " ".join(cmdline(pid))[:300]
                _kill(pid)
            wait_gone(left, 5.0)
        if self.outlived and exc[0] is None:
            raise AssertionError(
                f"processes outlived the program by more than {GRACE} s: {self.outlived}"
            )

    async def call(self, tool: str, **arguments: Any) -> Any:
        """Call ``tool``; returns its JSON result decoded (or the text when it is not JSON).

        Raises:
            ToolError: the tool answered with an error.
            ServerDied: the program died before answering.
        """
        result: Any = None
        died = False

        async def watch(scope: anyio.CancelScope) -> None:
            nonlocal died
            while alive(self.root) and alive(self.program_pid):
                await anyio.sleep(0.05)
            await anyio.sleep(1.0)  # an answer already on its way still wins
            died = True
            scope.cancel()

        with anyio.fail_after(self.timeout):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, tg.cancel_scope)
                result = await self.session.call_tool(tool, arguments)
                tg.cancel_scope.cancel()
        if result is None:
            assert died
            raise ServerDied(f"the program (pid {self.program_pid}) died during {tool}")
        text = "".join(getattr(c, "text", "") for c in result.content)
        if result.isError:
            raise ToolError(text)
        try:
            return json.loads(text)
        except ValueError:
            return text


def stderr_lines(errlog: Path) -> list[str]:
    return errlog.read_text(errors="replace").splitlines() if errlog.exists() else []


def program_argv(launcher: str, data_dir: str, *, safe: bool) -> list[str]:
    """The command an MCP host runs: chroma-mcp on ``data_dir``, under ``safechroma run`` or
    plain."""
    prog = [sys.executable, launcher, "--client-type", "persistent", "--data-dir", data_dir]
    return [sys.executable, "-m", "safechroma", "run", "--", *prog] if safe else prog


__all__ = [
    "DIM",
    "EF_NAME",
    "Server",
    "ServerDied",
    "ToolError",
    "alive",
    "cmdline",
    "descendants",
    "hash_vector",
    "holders",
    "mapped_files",
    "open_files",
    "program_argv",
    "stderr_lines",
    "wait_gone",
    "write_launcher",
]
