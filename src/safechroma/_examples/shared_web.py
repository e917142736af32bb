"""A web service run by uvicorn with two worker processes on one Chroma directory.

Both uvicorn workers open the directory with :class:`safechroma.AsyncSafeClient`; the first
starts the directory's supervised worker, the second attaches to it, and both are served by it
in parallel. Plain Chroma would run two Chromas on one directory here (and lose vectors).

Serve it yourself::

    SAFECHROMA_DB=/tmp/notes uvicorn safechroma._examples.shared_web:app --workers 2

Endpoints: ``POST /notes?id=ID&text=TEXT`` (upsert), ``GET /notes?id=ID``, ``GET /stats``.
A call that fails is answered ``503`` with a JSON body that says why and whether a write may
have been applied (``outcome_unknown``), never with a dropped connection.

Or run the whole demonstration with ``python -m safechroma._examples.shared_web``: it starts
uvicorn with two workers on a temporary directory, writes and reads notes through HTTP while it
SIGKILLs one uvicorn worker and then the safechroma worker, checks that every acknowledged note
is there with its text, and exits 0. No network beyond loopback, no model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any
from urllib.parse import parse_qs

from safechroma import AsyncSafeClient, SafeChromaError, WorkerError

DIM = 16


def embed(text: str) -> list[float]:
    """A toy embedding: deterministic, offline."""
    digest = hashlib.blake2b(text.encode(), digest_size=DIM).digest()
    return [b / 255.0 for b in digest]


_state: dict[str, Any] = {}


async def _collection() -> Any:
    if "col" not in _state:
        client = await AsyncSafeClient.create(os.environ["SAFECHROMA_DB"])
        _state["client"] = client
        _state["col"] = await client.get_or_create_collection("notes", embedding_function=None)
    return _state["col"]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI application."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await _collection()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                client = _state.pop("client", None)
                if client is not None:
                    await client.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    try:
        status, body = await _handle(scope["method"], scope["path"], query)
    except WorkerError as exc:
        status, body = 503, {"error": str(exc), "outcome_unknown": exc.outcome_unknown}
    except SafeChromaError as exc:
        status, body = 503, {"error": str(exc), "outcome_unknown": False}
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _handle(method: str, path: str, query: dict[str, str]) -> tuple[int, Any]:
    col = await _collection()
    if path == "/notes" and method == "POST":
        await col.upsert(
            ids=[query["id"]], embeddings=[embed(query["text"])], documents=[query["text"]]
        )
        return 200, {"ok": True}
    if path == "/notes" and method == "GET":
        got = await col.get(ids=[query["id"]], include=["documents"])
        return 200, {"documents": got["documents"]}
    if path == "/stats":
        stats = _state["client"].stats()
        return 200, {"pid": os.getpid(), "worker_pid": stats.worker_pid, "count": await col.count()}
    return 404, {"error": f"no route {method} {path}"}


# -- the demonstration -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    """uvicorn's worker processes: the master's children started by multiprocessing's spawn
    (not its resource tracker)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    workers = []
    for kid in kids:
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    workers.append(kid)
        except OSError:
            continue
    return workers


def main() -> int:
    if sys.platform == "win32":  # it kills processes with SIGKILL and reads /proc
        raise SystemExit("this example runs on Linux")
    import httpx

    workdir = tempfile.mkdtemp(prefix="safechroma-web-")
    db = os.path.join(workdir, "db")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "safechroma._examples.shared_web:app"]
        + ["--workers", "2", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "SAFECHROMA_DB": db},
    )
    base = f"http://127.0.0.1:{port}"
    acked: dict[str, str] = {}
    last_worker = 0
    answers = {"ok": 0, "503": 0, "dropped": 0}
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            give_up = time.monotonic() + 60
            while True:
                try:
                    first = http.get("/stats").json()
                    break
                except httpx.TransportError:
                    if time.monotonic() > give_up or server.poll() is not None:
                        print("FAILED: the server did not come up")
                        return 1
                    time.sleep(0.2)
            print(
                f"uvicorn workers {_children(server.pid)}, safechroma worker {first['worker_pid']}"
            )

            def write(i: int) -> None:
                note, text = f"note-{i}", f"text of note {i}"
                try:
                    r = http.post("/notes", params={"id": note, "text": text})
                except httpx.TransportError:
                    answers["dropped"] += 1  # the uvicorn worker serving it was killed
                    return
                if r.status_code == 200:
                    acked[note] = text
                    answers["ok"] += 1
                else:
                    answers["503"] += 1

            i = 0
            for phase in ("kill a uvicorn worker", "kill the safechroma worker", "done"):
                for _ in range(60):
                    write(i)
                    i += 1
                if phase == "kill a uvicorn worker":
                    victim = _children(server.pid)[0]
                    os.kill(victim, signal.SIGKILL)
                    print(f"SIGKILLed uvicorn worker {victim}")
                elif phase == "kill the safechroma worker":
                    worker = int(open(os.path.join(db, ".safechroma.lock")).readline())
                    os.kill(worker, signal.SIGKILL)
                    print(f"SIGKILLed safechroma worker {worker}")
            missing = []
            for note, text in acked.items():
                for _attempt in range(5):
                    try:
                        r = http.get("/notes", params={"id": note})
                        break
                    except httpx.TransportError:
                        time.sleep(0.2)
                if r.status_code != 200 or r.json()["documents"] != [text]:
                    missing.append(note)
            last_worker = http.get("/stats").json()["worker_pid"]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    give_up = time.monotonic() + 10
    while os.path.exists(f"/proc/{last_worker}") and time.monotonic() < give_up:
        time.sleep(0.05)  # the last uvicorn worker to close its client ends it
    if os.path.exists(f"/proc/{last_worker}"):
        print(f"FAILED: the safechroma worker {last_worker} outlived the server")
        return 1
    print(
        f"{i} writes: {answers['ok']} acknowledged, {answers['503']} answered 503, "
        f"{answers['dropped']} dropped with their uvicorn worker; "
        f"{len(acked) - len(missing)}/{len(acked)} acknowledged notes read back"
    )
    if missing or not acked:
        print(f"FAILED: missing {missing[:10]}")
        return 1
    print("OK: two uvicorn workers shared one supervised Chroma through both kills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
