"""Several independent programs on one Chroma directory, as MCP servers (one per editor
window), hooks and a CLI are in the field.

Run it with ``python -m safechroma._examples.shared_processes``. It starts three programs that
each open the same directory with a plain ``SafeClient(path)`` (no server, no configuration),
remember notes and recall each other's, and SIGKILLs the first one (the one that started the
directory's worker) halfway through. The other two keep going on the same worker; at the end
every acknowledged note is there and nothing is left running. No network, no model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from safechroma import SafeClient, WorkerError


def _embed(text: str) -> Any:
    return [b / 255.0 for b in hashlib.blake2b(text.encode(), digest_size=8).digest()]


def member(name: str, path: str, notes: int) -> None:
    """One program: remembers ``notes`` notes, recalling another program's now and then."""
    client = SafeClient(path)
    col = client.get_or_create_collection("memory", embedding_function=None)
    print(json.dumps({"name": name, "worker": client.stats().worker_pid}), flush=True)
    acked = []
    for i in range(notes):
        text = f"{name} remembers {i}"
        try:
            col.upsert(ids=[f"{name}-{i}"], embeddings=[_embed(text)], documents=[text])
            acked.append(f"{name}-{i}")
        except WorkerError as exc:
            print(json.dumps({"name": name, "error": str(exc)[:200]}), flush=True)
        col.query(query_embeddings=[_embed(text)], n_results=3)  # recall, anyone's notes
        time.sleep(0.01)
    print(json.dumps({"name": name, "acked": acked, "worker": client.stats().worker_pid}))
    client.close()


def main() -> int:
    if sys.platform == "win32":  # it kills a program with SIGKILL
        raise SystemExit("this example runs on Linux and macOS")
    workdir = tempfile.mkdtemp(prefix="safechroma-procs-")
    path = os.path.join(workdir, "db")
    me = [sys.executable, "-m", "safechroma._examples.shared_processes", "member"]
    try:
        programs = {
            name: subprocess.Popen(me + [name, path, "150"], stdout=subprocess.PIPE, text=True)
            for name in ("editor-1", "editor-2", "cli")
        }
        workers = {}
        for name, proc in programs.items():
            assert proc.stdout is not None
            workers[name] = json.loads(proc.stdout.readline())["worker"]
        print(f"three programs, worker pids {sorted(set(workers.values()))}")
        time.sleep(0.5)
        programs["editor-1"].send_signal(signal.SIGKILL)
        programs["editor-1"].communicate()
        print("SIGKILLed editor-1, which had started the worker")
        acked: list[str] = []
        for name in ("editor-2", "cli"):
            out, _ = programs[name].communicate(timeout=300)
            last = json.loads(out.strip().splitlines()[-1])
            acked += last["acked"]
            print(f"{name}: {len(last['acked'])} notes acknowledged, worker {last['worker']}")
        with SafeClient(path) as client:
            got = client.get_collection("memory", embedding_function=None).get(ids=acked)
        ok = len(set(workers.values())) == 1 and sorted(got["ids"]) == sorted(acked)
        worker = next(iter(workers.values()))
        give_up = time.monotonic() + 10
        while os.path.exists(f"/proc/{worker}") and time.monotonic() < give_up:
            time.sleep(0.05)
        ok = ok and not os.path.exists(f"/proc/{worker}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        "OK: one worker served all three; every acknowledged note is there; nothing left running"
        if ok
        else "FAILED"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["member"]:
        member(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(main())
