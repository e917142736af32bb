"""One call in a fresh process: the process-per-call mode.

Run as ``python _oneshot.py``. Reads one pickled request from stdin: ``(path, collection, method,
kwargs)``; imports chromadb, opens a PersistentClient on ``path``, makes the one call, writes the
pickled ``(result, breakdown)`` to stdout (8-byte length first) and exits. This is what a
caller that isolates Chroma by running each call in a new process pays (the approach of
mcp-vector-search).
"""

from __future__ import annotations

import os
import pickle
import sys
import time


def main() -> None:
    t_start = time.perf_counter_ns()
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _sysinfo import NetAudit, proc_status

    audit = NetAudit()
    audit.install()
    path, collection, method, kwargs = pickle.loads(sys.stdin.buffer.read())

    t0 = time.perf_counter_ns()
    import chromadb
    from chromadb.config import Settings

    t1 = time.perf_counter_ns()
    client = chromadb.PersistentClient(path=path, settings=Settings(anonymized_telemetry=False))
    target = (
        client if collection is None else client.get_collection(collection, embedding_function=None)
    )
    t2 = time.perf_counter_ns()
    result = getattr(target, method)(**kwargs)
    t3 = time.perf_counter_ns()
    breakdown = {
        "start_to_request_ns": t0 - t_start,
        "import_chromadb_ns": t1 - t0,
        "open_ns": t2 - t1,
        "call_ns": t3 - t2,
        "vmhwm": proc_status(os.getpid()).get("VmHWM", 0),
        "net_attempts": audit.attempts,
    }
    if isinstance(result, dict):  # QueryResult/GetResult are TypedDicts: plain dicts
        result = dict(result)
    blob = pickle.dumps((result, breakdown), protocol=5)
    # Length first, so the caller can time the answer apart from this process's exit.
    sys.stdout.buffer.write(len(blob).to_bytes(8, "little") + blob)
    sys.stdout.buffer.flush()
    # A normal exit, as a plain process-per-call caller would have it (interpreter and Chroma
    # teardown included); the caller times both the answer and the exit.


if __name__ == "__main__":
    main()
