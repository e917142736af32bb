"""Mode drivers: one spawned child process per mode; each times its own calls.

The benchmark process never imports chromadb. It starts one driver per mode (multiprocessing,
spawn) and sends it requests over a Pipe: "run op X of round r, k times". The driver builds the
call from :mod:`_workload`, times the bare call with ``time.perf_counter_ns`` inside its own
process, and sends back the timings. So every mode is measured the same way, from the caller's
side of its own API, in a process of its own:

- ``direct``: ``chromadb.PersistentClient`` in the driver; the timer wraps the bare Chroma call.
- ``safechroma``: ``SafeClient`` in the driver (the caller); its worker is the driver's child.
- ``http``: ``chromadb.HttpClient`` to a ``chroma run`` on loopback that the benchmark process
  started.
- ``safe-http``: ``safechroma.SafeHttpClient`` to a server on loopback (``bench_http.py`` runs
  it against ``safechroma serve`` and against a plain ``chroma run``).
- ``process-per-call``: each call spawns ``python _oneshot.py`` (a fresh interpreter that imports
  chromadb, opens the PersistentClient, makes the one call).

A driver leaves its session (``os.setsid``) so that Ctrl-C reaches only the benchmark process,
which then closes every driver in order; a driver whose pipe closes (benchmark process gone)
closes its client and exits.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _sysinfo import (
    NetAudit,
    alive,
    children,
    cmdline,
    descendants,
    inet_endpoints,
    non_loopback,
    proc_status,
)
from _workload import (
    DIMS,
    OP_BY_NAME,
    Call,
    collection_name,
    make_call,
    result_bytes,
    throughput_call,
)

ONESHOT = str(Path(__file__).resolve().parent / "_oneshot.py")
NS = 1_000_000_000


def _rss_tree(root: int, worker_pid: int | None = None) -> dict[str, Any]:
    """RSS of ``root`` (the caller) and of each descendant (workers, standbys, servers)."""
    procs = []
    for pid in descendants(root):
        st = proc_status(pid)
        if not st:
            continue
        cmd = cmdline(pid)
        forked = "safechroma.runtime.template" in cmd  # the template and its forks
        if pid == worker_pid:
            role = "worker"
        elif forked and pid in children(root):
            role = "worker template"
        elif forked or "safechroma.runtime.worker" in cmd:
            role = "standby worker"
        else:
            role = "child"
        procs.append({"pid": pid, "role": role, "cmd": cmd[:120], **st})
    return {"caller": {"pid": root, **proc_status(root)}, "children": procs}


class Mode:
    """Opens a client on a copy of the data and runs timed calls against it."""

    name = "?"

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.path: str = cfg["path"]
        self.records: int = cfg["records"]
        self.cols: dict[str, Any] = {}
        self.rss_start = proc_status(os.getpid())

    # -- lifecycle --------------------------------------------------------------------------
    def open(self) -> dict[str, Any]:
        t0 = time.perf_counter_ns()
        self._open()
        n = self.cols[collection_name(DIMS[0])].count()
        t1 = time.perf_counter_ns()
        # Any call loads a collection's HNSW segment (CHROMA_FACTS 2): load the other one now,
        # so that the first measured call on it does not pay for that.
        for dim in DIMS[1:]:
            self.cols[collection_name(dim)].count()
        return {"open_to_first_count_ns": t1 - t0, "count": n}

    def _open(self) -> None:
        raise NotImplementedError

    def close(self) -> dict[str, Any]:
        for base in getattr(self, "_fresh_dirs", []):
            shutil.rmtree(base, ignore_errors=True)
        return {}

    # -- measurement ------------------------------------------------------------------------
    def run(self, op: str, rnd: int, reps: int, tag: str = "") -> dict[str, Any]:
        out: dict[str, list[Any]] = {"ns": [], "transport_ns": [], "bytes_out": [], "payload": []}
        for rep in range(reps):
            call = make_call(op, self.records, rnd, rep, tag)
            ns, transport, result = self._timed(call)
            out["ns"].append(ns)
            if transport is not None:
                out["transport_ns"].append(transport)
            out["bytes_out"].append(result_bytes(result))
            out["payload"].append(call.payload_bytes)
            del result
            if call.cleanup is not None:
                self._cleanup(call)
        return out

    def _timed(self, call: Call) -> tuple[int, int | None, Any]:
        fn = getattr(self._target(call.collection), call.method)
        kwargs = call.kwargs
        t0 = time.perf_counter_ns()
        result = fn(**kwargs)
        t1 = time.perf_counter_ns()
        return t1 - t0, None, result

    def _target(self, collection: str | None) -> Any:
        return self.client if collection is None else self.cols[collection]

    def _cleanup(self, call: Call) -> None:
        assert call.cleanup is not None
        method, kwargs = call.cleanup
        getattr(self.cols[call.collection], method)(**kwargs)

    def rss(self) -> dict[str, Any]:
        return {"start": self.rss_start, **_rss_tree(os.getpid())}

    # -- throughput (issue 10) --------------------------------------------------------------
    def throughput(self, op: str, workers: int, seconds: float, tag: str) -> dict[str, Any]:
        """``workers`` threads call ``op`` in a loop for ``seconds``; calls completed per s."""
        stop = threading.Event()
        counts = [0] * workers
        errors: list[str] = []
        gate = threading.Barrier(workers + 1)

        def loop(w: int) -> None:
            gate.wait()
            k = 0
            try:
                while not stop.is_set():
                    call = throughput_call(op, self.records, w, k, tag)
                    getattr(self._target(call.collection), call.method)(**call.kwargs)
                    k += 1
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
            counts[w] = k

        threads = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        gate.wait()
        t0 = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        return {
            "calls": sum(counts),
            "seconds": elapsed,
            "per_s": sum(counts) / elapsed,
            "errors": errors,
        }

    def athroughput(self, op: str, tasks: int, seconds: float, tag: str) -> dict[str, Any]:
        """``tasks`` asyncio tasks call ``op`` in a loop for ``seconds``; calls per s."""
        return asyncio.run(self._athroughput(op, tasks, seconds, tag))

    async def _athroughput(self, op: str, tasks: int, seconds: float, tag: str) -> dict[str, Any]:
        cols, close = await self._async_open()
        stop = asyncio.Event()
        counts = [0] * tasks
        errors: list[str] = []

        async def loop(w: int) -> None:
            k = 0
            try:
                while not stop.is_set():
                    call = throughput_call(op, self.records, w, k, tag)
                    await self._acall(cols, call)
                    k += 1
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
            counts[w] = k

        try:
            running = [asyncio.create_task(loop(w)) for w in range(tasks)]
            t0 = time.perf_counter()
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*running)
            elapsed = time.perf_counter() - t0
        finally:
            await close()
        return {
            "calls": sum(counts),
            "seconds": elapsed,
            "per_s": sum(counts) / elapsed,
            "errors": errors,
        }

    async def _async_open(self) -> tuple[dict[str, Any], Any]:
        async def nothing() -> None:
            return None

        return self.cols, nothing

    async def _acall(self, cols: dict[str, Any], call: Call) -> Any:
        fn = getattr(cols[call.collection], call.method)
        return await asyncio.to_thread(fn, **call.kwargs)

    def fresh_open(self, n: int) -> dict[str, Any]:
        """Open a fresh directory while this process's client is open: to the first answer."""
        base = tempfile.mkdtemp(prefix="fresh-", dir=os.path.dirname(self.path))
        self._fresh_dirs = getattr(self, "_fresh_dirs", []) + [base]
        times = []
        for i in range(n):
            path = os.path.join(base, str(i))
            t0 = time.perf_counter_ns()
            client = self._fresh_client(path)
            client.count_collections()
            times.append(time.perf_counter_ns() - t0)
            self._close_fresh(client)
        return {"open_to_first_answer_ns": times}

    def _fresh_client(self, path: str) -> Any:
        raise NotImplementedError

    def _close_fresh(self, client: Any) -> None:
        pass

    def network(self) -> dict[str, Any]:
        """Non-loopback sockets held now by this process and its children."""
        bad = []
        for pid in [os.getpid(), *descendants(os.getpid())]:
            bad += [{"pid": pid, **e} for e in non_loopback(inet_endpoints(pid))]
        return {"non_loopback_sockets": bad}


class DirectMode(Mode):
    name = "direct"

    def _open(self) -> None:
        import chromadb
        from chromadb.config import Settings

        self.client = chromadb.PersistentClient(
            path=self.path, settings=Settings(anonymized_telemetry=False)
        )
        for dim in DIMS:
            name = collection_name(dim)
            self.cols[name] = self.client.get_collection(name, embedding_function=None)

    def _fresh_client(self, path: str) -> Any:
        import chromadb
        from chromadb.config import Settings

        # chromadb has no close: the fresh clients live until the driver exits.
        return chromadb.PersistentClient(path=path, settings=Settings(anonymized_telemetry=False))


class HttpMode(Mode):
    name = "http"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        # The question for this mode is whether the client reaches anywhere but loopback.
        self.audit = NetAudit()
        self.audit.install()

    def _open(self) -> None:
        import chromadb
        from chromadb.config import Settings

        self.client = chromadb.HttpClient(
            host="127.0.0.1", port=self.cfg["port"], settings=Settings(anonymized_telemetry=False)
        )
        for dim in DIMS:
            name = collection_name(dim)
            self.cols[name] = self.client.get_collection(name, embedding_function=None)

    async def _async_open(self) -> tuple[dict[str, Any], Any]:
        import chromadb
        from chromadb.config import Settings

        client = await chromadb.AsyncHttpClient(
            host="127.0.0.1", port=self.cfg["port"], settings=Settings(anonymized_telemetry=False)
        )
        cols = {}
        for dim in DIMS:
            name = collection_name(dim)
            cols[name] = await client.get_collection(name, embedding_function=None)

        async def close() -> None:
            return None

        return cols, close

    async def _acall(self, cols: dict[str, Any], call: Call) -> Any:
        return await getattr(cols[call.collection], call.method)(**call.kwargs)

    def rss(self) -> dict[str, Any]:
        out = super().rss()
        server = self.cfg.get("server_pid")
        if server:
            out["server"] = {"pid": server, **proc_status(server)}
        return out

    def network(self) -> dict[str, Any]:
        out = super().network()
        out["client_non_loopback_attempts"] = list(self.audit.attempts)
        return out


class SafeHttpMode(HttpMode):
    """``safechroma.SafeHttpClient`` to a server on loopback (``safechroma serve`` or a plain
    ``chroma run``, whichever the benchmark started): what the guarded transport adds."""

    name = "safe-http"

    def _open(self) -> None:
        from chromadb.config import Settings

        from safechroma import SafeHttpClient

        self.client = SafeHttpClient(
            host="127.0.0.1", port=self.cfg["port"], settings=Settings(anonymized_telemetry=False)
        )
        for dim in DIMS:
            name = collection_name(dim)
            self.cols[name] = self.client.get_collection(name, embedding_function=None)

    def close(self) -> dict[str, Any]:
        self.client.close()
        return {}


class SafechromaMode(Mode):
    name = "safechroma"

    def _open(self) -> None:
        from safechroma import SafeClient

        self.client = SafeClient(self.path)
        for dim in DIMS:
            name = collection_name(dim)
            self.cols[name] = self.client.get_collection(name, embedding_function=None)

    def _timed(self, call: Call) -> tuple[int, int | None, Any]:
        fn = getattr(self._target(call.collection), call.method)
        kwargs = call.kwargs
        t0 = time.perf_counter_ns()
        result = fn(**kwargs)
        t1 = time.perf_counter_ns()
        worker_s = self.client.stats().last_call_worker_seconds
        return t1 - t0, (t1 - t0) - int(worker_s * NS), result

    async def _async_open(self) -> tuple[dict[str, Any], Any]:
        from safechroma import AsyncSafeClient

        # The same directory as the sync client: they share one supervisor and one worker.
        client = await AsyncSafeClient.create(self.path)
        cols = {}
        for dim in DIMS:
            name = collection_name(dim)
            cols[name] = await client.get_collection(name, embedding_function=None)
        return cols, client.aclose

    async def _acall(self, cols: dict[str, Any], call: Call) -> Any:
        return await getattr(cols[call.collection], call.method)(**call.kwargs)

    def _fresh_client(self, path: str) -> Any:
        from safechroma import SafeClient

        return SafeClient(path)

    def _close_fresh(self, client: Any) -> None:
        client.close()

    def close(self) -> dict[str, Any]:
        client = getattr(self, "client", None)
        if client is None:
            return {}
        pid = client.stats().worker_pid
        kids = descendants(os.getpid())
        t0 = time.perf_counter_ns()
        client.close()
        t1 = time.perf_counter_ns()
        self.client = None
        # Did close() take its worker (and any standby) down with it?
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(alive(k) for k in kids):
            time.sleep(0.02)
        return {
            "close_ns": t1 - t0,
            "worker_pid": pid,
            "children_left_after_close": [k for k in kids if alive(k)],
        }

    def rss(self) -> dict[str, Any]:
        worker = self.client.stats().worker_pid if self.client is not None else None
        return {"start": self.rss_start, **_rss_tree(os.getpid(), worker)}

    def startup(self, n: int) -> dict[str, Any]:
        """SafeClient(path) to the first answered count(), then close(); ``n`` times.

        The main client must be closed first: one process per directory (CHROMA_FACTS 4).
        """
        from safechroma import SafeClient

        assert getattr(self, "client", None) is None, "close the main client first"
        first, closes = [], []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            client = SafeClient(self.path)
            col = client.get_collection(collection_name(DIMS[0]), embedding_function=None)
            col.count()
            t1 = time.perf_counter_ns()
            client.close()
            t2 = time.perf_counter_ns()
            first.append(t1 - t0)
            closes.append(t2 - t1)
        return {"open_to_first_count_ns": first, "close_ns": closes}

    def crash(self, n: int, settle_s: float) -> dict[str, Any]:
        """SIGKILL the worker between calls, time until the next count() returns.

        Each trial uses a fresh client, warmed up and left idle ``settle_s`` seconds (steady
        state: whatever the client prepares in the background is ready), so that one trial's
        respawn and the crash-loop breaker do not colour the next.
        """
        from safechroma import SafeClient

        assert getattr(self, "client", None) is None, "close the main client first"
        trials = []
        for _ in range(n):
            client = SafeClient(self.path)
            try:
                col = client.get_collection(collection_name(DIMS[0]), embedding_function=None)
                for _ in range(5):
                    col.count()
                time.sleep(settle_s)
                col.count()
                old = client.stats().worker_pid
                errors: list[str] = []
                t0 = time.perf_counter_ns()
                os.kill(old, signal.SIGKILL)
                answered = None
                for _attempt in range(5):  # bounded: a call may fail once on the dead worker
                    try:
                        answered = col.count()
                        break
                    except Exception as exc:  # noqa: BLE001 - recorded, then retried
                        errors.append(f"{type(exc).__module__}.{type(exc).__name__}: {exc}"[:300])
                t1 = time.perf_counter_ns()
                st = client.stats()
                trials.append(
                    {
                        "ns": t1 - t0,
                        "answered": answered,
                        "errors_before_answer": errors,
                        "old_pid": old,
                        "new_pid": st.worker_pid,
                        "respawns": st.respawns,
                        "deaths": dict(st.deaths),
                    }
                )
            finally:
                client.close()
        return {"trials": trials}


class ProcessPerCallMode(Mode):
    name = "process-per-call"

    def _open(self) -> None:
        pass

    def open(self) -> dict[str, Any]:
        return {}

    def _spawn(self, call: Call, method: str, kwargs: dict[str, Any]) -> tuple[int, int, Any, dict]:
        t0 = time.perf_counter_ns()
        blob = pickle.dumps((self.path, call.collection, method, kwargs), protocol=5)
        proc = subprocess.Popen(
            [sys.executable, ONESHOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
            proc.stdin.write(blob)
            proc.stdin.close()
            head = proc.stdout.read(8)
            if len(head) != 8:
                raise RuntimeError(f"one-shot process failed: {proc.stderr.read()[-2000:]!r}")
            body = proc.stdout.read(int.from_bytes(head, "little"))
            result, breakdown = pickle.loads(body)
            t1 = time.perf_counter_ns()
            proc.stdout.read()
            proc.stderr.read()
            rc = proc.wait(timeout=300)
            t2 = time.perf_counter_ns()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if rc != 0:
            raise RuntimeError(f"one-shot process exited with {rc}")
        return t1 - t0, t2 - t0, result, breakdown

    def run(self, op: str, rnd: int, reps: int, tag: str = "") -> dict[str, Any]:
        out: dict[str, list[Any]] = {
            "ns": [],
            "transport_ns": [],
            "bytes_out": [],
            "payload": [],
            "exit_ns": [],
            "breakdown": [],
        }
        for rep in range(reps):
            call = make_call(op, self.records, rnd, rep, tag)
            answer_ns, exit_ns, result, breakdown = self._spawn(call, call.method, call.kwargs)
            out["ns"].append(answer_ns)
            out["exit_ns"].append(exit_ns)
            out["breakdown"].append(breakdown)
            out["bytes_out"].append(result_bytes(result))
            out["payload"].append(call.payload_bytes)
            if call.cleanup is not None:
                self._spawn(call, *call.cleanup)  # untimed
        return out


MODES: dict[str, type[Mode]] = {
    m.name: m for m in (DirectMode, SafechromaMode, HttpMode, SafeHttpMode, ProcessPerCallMode)
}


def driver_main(conn: Connection, mode: str, cfg: dict[str, Any]) -> None:
    """Entry point of a driver process: serve requests until "shutdown" or until the pipe closes."""
    os.setsid()  # Ctrl-C goes to the benchmark process only; it closes us in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["ANONYMIZED_TELEMETRY"] = "False"
    impl: Mode | None = None
    try:
        impl = MODES[mode](cfg)
        for _ in range(10_000_000):  # bounded; ends on "shutdown" or EOF
            try:
                cmd, kwargs = conn.recv()
            except (EOFError, OSError):
                break
            try:
                if cmd == "shutdown":
                    conn.send(("ok", impl.close()))
                    impl = None
                    break
                conn.send(("ok", getattr(impl, cmd)(**kwargs)))
            except BaseException:  # noqa: BLE001 - reported to the benchmark process
                conn.send(("error", traceback.format_exc()))
    finally:
        if impl is not None:
            try:
                impl.close()
            except BaseException:  # noqa: BLE001 - best effort on the way out
                pass
        conn.close()


def available(mode: str) -> str | None:
    """None when ``mode`` can run here, else why not (checked in the benchmark process)."""
    if mode == "safechroma":
        import importlib.util

        if importlib.util.find_spec("safechroma") is None:
            return "safechroma is not installed"
        try:
            out = subprocess.run(
                [sys.executable, "-c", "from safechroma import SafeClient, SafeCollection"],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            return "importing safechroma timed out"
        if out.returncode != 0:
            return (
                "cannot import SafeClient from safechroma: " + out.stderr.strip().splitlines()[-1]
            )
    return None


def build_main(path: str, records: int) -> None:
    """Build the master data set: one collection per dimension, ``records`` each (spawned child)."""
    os.environ["ANONYMIZED_TELEMETRY"] = "False"
    import chromadb
    from _workload import dataset_batches
    from chromadb.config import Settings

    client = chromadb.PersistentClient(path=path, settings=Settings(anonymized_telemetry=False))
    for dim in DIMS:
        col = client.create_collection(collection_name(dim), embedding_function=None)
        for ids, emb, docs, metas in dataset_batches(records, dim):
            col.add(ids=ids, embeddings=emb, documents=docs, metadatas=metas)
        if col.count() != records:
            raise RuntimeError(f"built {col.count()} records, wanted {records}")


__all__ = ["MODES", "OP_BY_NAME", "available", "build_main", "driver_main"]
