"""Where one caller's time goes: a call through safechroma against the same call on chromadb.

With one thread calling, throughput is 1 / (time per call), so the one-caller ratio of the
throughput table in ``results.md`` is this table's time ratio. This script splits that time:
the wall time of a call, the CPU it costs in the caller and in the worker (user + system), and
the time the worker spent in it (``stats().last_call_worker_seconds``: decoding the request and
running Chroma, not sending the reply); ``client.heartbeat()`` is the empty round trip. A
second table, plain sockets, is the machine's price for waking a process that slept. Direct
and safechroma run in this one process, on two copies of one 10k x 384 collection, in
alternating rounds so that drift on a shared machine hits both::

    python benchmarks/bench_overhead.py [--records 10000] [--calls 1500] [--rounds 3]
        [--threads 1,2,4,8] [--seconds 3]

A third table runs ``get`` and ``query`` from 1-8 threads at once, the modes taking turns, and
reports per call what the throughput ratio is made of: CPU (direct's process; safechroma's
caller and worker) and context switches (every thread of those processes, from
``/proc/<pid>/task/*/status``): on a machine where a wake-up costs tens of microseconds, the
switches a call adds are most of its cost.

Writes ``benchmarks/results/overhead.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import chromadb  # noqa: E402
from _workload import collection_name, dataset_batches, make_call  # noqa: E402
from chromadb.config import Settings  # noqa: E402

from safechroma import SafeClient  # noqa: E402

DIM = 384
OPS = ("heartbeat", "get_ids10", "query1")
THREADED_OPS = ("get_ids10", "query1", "count")
LABELS = {
    "heartbeat": "heartbeat()",
    "get_ids10": "get(ids=10)",
    "query1": "query(1 vec, k=10)",
    "count": "count()",
}
_TICK = os.sysconf("SC_CLK_TCK")
IDLE_US = (0, 200, 1000, 3000)

# The other end of the wake-up probe: for each request, stay busy for the time it names (so
# that only the caller's CPU idles), then answer with the time it answered.
_RESPONDER = """
import socket, struct, sys, time
s = socket.socket(fileno=int(sys.argv[1]))
while True:
    m = s.recv(64)
    if not m:
        break
    end = time.perf_counter() + struct.unpack("d", m)[0]
    while time.perf_counter() < end:
        pass
    s.send(struct.pack("d", time.monotonic()))
"""


def _wake_latency(idle_us: int, n: int) -> float:
    """Median us from another process's reply to this one running again, after ``idle_us``."""
    mine, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-c", _RESPONDER, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    try:
        lat = []
        for _ in range(n):
            mine.send(struct.pack("d", idle_us / 1e6))
            answer = mine.recv(64)
            lat.append(time.monotonic() - struct.unpack("d", answer)[0])
        return float(statistics.median(lat[n // 10 :])) * 1e6
    finally:
        mine.close()
        proc.wait(timeout=30)


def _self_cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _proc_cpu(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _measure(
    calls: list[Callable[[], Any]], worker: int | None, spent: Callable[[], float] | None
) -> dict[str, float]:
    """Run ``calls`` back to back; per call: wall and CPU (us), and the worker's own time."""
    inside: list[float] = []
    u0, s0 = _self_cpu()
    wu0, ws0 = _proc_cpu(worker) if worker else (0.0, 0.0)
    t0 = time.perf_counter()
    if spent is None:
        for call in calls:
            call()
    else:
        for call in calls:
            call()
            inside.append(spent())
    wall = time.perf_counter() - t0
    u1, s1 = _self_cpu()
    wu1, ws1 = _proc_cpu(worker) if worker else (0.0, 0.0)
    n = len(calls)
    out = {
        "wall": wall / n * 1e6,
        "user": (u1 - u0) / n * 1e6,
        "sys": (s1 - s0) / n * 1e6,
        "worker_user": (wu1 - wu0) / n * 1e6,
        "worker_sys": (ws1 - ws0) / n * 1e6,
    }
    if inside:
        out["in_worker"] = statistics.median(inside) * 1e6
    return out


def _switches(pid: int) -> int:
    """Context switches (voluntary + involuntary) of every live thread of ``pid`` so far."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if "ctxt_switches:" in line:  # voluntary_ and nonvoluntary_
                        total += int(line.split()[-1])
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
    return total


def _threaded(
    target: Any, op: str, records: int, workers: int, seconds: float, worker: int | None
) -> dict[str, float]:
    """``workers`` threads call ``op`` for ``seconds``: calls per s, and per call CPU and
    context switches of this process and of the worker (counted while every thread lives)."""
    calls = [_calls(target, op, records, 100 + w, 64) for w in range(workers)]
    stop = threading.Event()
    counts = [0] * workers
    start, end = threading.Barrier(workers + 1), threading.Barrier(workers + 1)

    def loop(w: int) -> None:
        mine = calls[w]
        start.wait()
        k = 0
        try:
            while not stop.is_set():
                mine[k % 64]()
                k += 1
        finally:
            counts[w] = k
            end.wait()  # alive until the counters are read

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    me = os.getpid()
    start.wait()
    u0, s0 = _self_cpu()
    wu0, ws0 = _proc_cpu(worker) if worker else (0.0, 0.0)
    x0, wx0 = _switches(me), (_switches(worker) if worker else 0)
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    while end.n_waiting < workers:
        time.sleep(0.001)
    wall = time.perf_counter() - t0
    u1, s1 = _self_cpu()
    wu1, ws1 = _proc_cpu(worker) if worker else (0.0, 0.0)
    x1, wx1 = _switches(me), (_switches(worker) if worker else 0)
    end.wait()
    for t in threads:
        t.join()
    n = max(1, sum(counts))
    return {
        "per_s": sum(counts) / wall,
        "cpu": ((u1 - u0) + (s1 - s0)) / n * 1e6,
        "worker_cpu": ((wu1 - wu0) + (ws1 - ws0)) / n * 1e6,
        "switches": (x1 - x0) / n,
        "worker_switches": (wx1 - wx0) / n,
    }


def _calls(target: Any, op: str, records: int, rnd: int, n: int) -> list[Callable[[], Any]]:
    out: list[Callable[[], Any]] = []
    for k in range(n):
        c = make_call(op, records, rnd, k % 64)
        obj = target["client"] if c.collection is None else target["col"]
        fn = getattr(obj, c.method)
        out.append(functools.partial(fn, **c.kwargs))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=1500, help="calls per op per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,2,4,8", help="caller threads for the third table")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per threaded cell")
    parser.add_argument("--turns", type=int, default=3, help="turns per threaded cell and mode")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-overhead-")
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: str) -> int:
    wake = {us: _wake_latency(us, max(200, min(1500, 600_000 // max(us, 1)))) for us in IDLE_US}
    safe_path, direct_path = os.path.join(work, "safe"), os.path.join(work, "direct")
    name = collection_name(DIM)
    with SafeClient(safe_path) as builder:
        col = builder.create_collection(name, embedding_function=None)
        for ids, emb, docs, metas in dataset_batches(args.records, DIM):
            col.add(ids=ids, embeddings=emb, documents=docs, metadatas=metas)
    shutil.copytree(safe_path, direct_path, ignore=shutil.ignore_patterns(".safechroma"))
    direct_client = chromadb.PersistentClient(
        direct_path, settings=Settings(anonymized_telemetry=False)
    )
    direct = {
        "client": direct_client,
        "col": direct_client.get_collection(name, embedding_function=None),
    }
    safe_client = SafeClient(safe_path)
    safe = {
        "client": safe_client,
        "col": safe_client.get_collection(name, embedding_function=None),
    }
    worker = safe_client.stats().worker_pid

    # What stats().last_call_worker_seconds reports, read from the supervisor itself: building
    # a Stats after every call would add caller time, and idle time to the worker, between calls.
    sup = safe_client._sup

    def spent() -> float:
        return float(sup.last_worker_seconds)

    rows: dict[str, dict[str, list[dict[str, float]]]] = {}
    for rnd in range(args.rounds + 1):  # round 0 warms up both and is not kept
        for op in OPS:
            d = _measure(_calls(direct, op, args.records, rnd, args.calls), None, None)
            s = _measure(_calls(safe, op, args.records, rnd, args.calls), worker, spent)
            if rnd:
                rows.setdefault(op, {"direct": [], "safe": []})
                rows[op]["direct"].append(d)
                rows[op]["safe"].append(s)
                print(
                    f"round {rnd} {op}: direct {d['wall']:.0f} us, safechroma {s['wall']:.0f} us"
                    f" (ratio {d['wall'] / s['wall']:.2f})",
                    flush=True,
                )
    threaded: dict[tuple[str, int], dict[str, list[dict[str, float]]]] = {}
    for op in THREADED_OPS:
        for n in [int(x) for x in args.threads.split(",")]:
            cell = threaded.setdefault((op, n), {"direct": [], "safe": []})
            for turn in range(args.turns):  # the modes take turns; the first one alternates
                order = ("direct", "safe") if turn % 2 == 0 else ("safe", "direct")
                for mode in order:
                    tgt, pid = (direct, None) if mode == "direct" else (safe, worker)
                    cell[mode].append(_threaded(tgt, op, args.records, n, args.seconds, pid))
            d = statistics.median(r["per_s"] for r in cell["direct"])
            sc = statistics.median(r["per_s"] for r in cell["safe"])
            print(f"{op} x{n}: direct {d:.0f}/s, safechroma {sc:.0f}/s ({sc / d:.2f})", flush=True)
    safe_client.close()

    def med(op: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[op][mode])

    load = os.getloadavg()[0]
    lines = [
        "# One caller: where the time of a call goes",
        "",
        f"`python benchmarks/bench_overhead.py --records {args.records} --calls {args.calls} "
        f"--rounds {args.rounds}`, {os.cpu_count()} cores, load {load:.2f} after the run. "
        "Microseconds per call, medians of the rounds; CPU is user + system of the process "
        "(direct: chromadb's threads included; safechroma: the caller, then the worker). "
        "**ratio** = direct wall / safechroma wall = the one-caller throughput ratio.",
        "",
        "| call | direct wall | direct CPU (sys) | safechroma wall | caller CPU (sys) "
        "| worker CPU (sys) | in the worker | added wall | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for op in OPS:
        dw, sw = med(op, "direct", "wall"), med(op, "safe", "wall")
        dcpu = med(op, "direct", "user") + med(op, "direct", "sys")
        ccpu = med(op, "safe", "user") + med(op, "safe", "sys")
        wcpu = med(op, "safe", "worker_user") + med(op, "safe", "worker_sys")
        lines.append(
            f"| {LABELS[op]} | {dw:.0f} | {dcpu:.0f} ({med(op, 'direct', 'sys'):.0f}) "
            f"| {sw:.0f} | {ccpu:.0f} ({med(op, 'safe', 'sys'):.0f}) "
            f"| {wcpu:.0f} ({med(op, 'safe', 'worker_sys'):.0f}) "
            f"| {med(op, 'safe', 'in_worker'):.0f} | {sw - dw:+.0f} "
            + ("| - |" if op == "heartbeat" else f"| {dw / sw:.2f} |")  # Chroma does no work
        )
    lines += [
        "",
        "Per-round ratios (direct wall / safechroma wall): "
        + "; ".join(
            f"{LABELS[op]} "
            + ", ".join(
                f"{d['wall'] / s['wall']:.2f}"
                for d, s in zip(rows[op]["direct"], rows[op]["safe"], strict=True)
            )
            for op in OPS
            if op != "heartbeat"
        )
        + ".",
    ]
    lines += [
        "",
        "What this machine charges to wake a process that slept: a socket pair between two plain "
        "Python processes, the other one busy for the given time before it answers (only this "
        "one idles); the median time from its answer to this process running again, in us:",
        "",
        "| idle before the answer | " + " | ".join(f"{us} us" for us in IDLE_US) + " |",
        "|---|" + "---|" * len(IDLE_US),
        "| wake-up | " + " | ".join(f"{wake[us]:.0f}" for us in IDLE_US) + " |",
    ]
    lines += _threaded_table(threaded, args)
    out = HERE / "results" / "overhead.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


def _threaded_table(
    cells: dict[tuple[str, int], dict[str, list[dict[str, float]]]], args: argparse.Namespace
) -> list[str]:
    def m(op: str, n: int, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in cells[(op, n)][mode])

    lines = [
        "",
        f"Many callers: N threads call at once for {args.seconds:g} s, {args.turns} turns per "
        "mode, medians. Per call: CPU in us (direct: its process; safechroma: caller + worker) "
        "and context switches (every thread: Chroma's own tokio and SQLite threads included). "
        "**ratio** = safechroma calls/s / direct calls/s.",
        "",
        "| call | threads | direct /s | safechroma /s | ratio | direct CPU | safechroma CPU "
        "(caller + worker) | direct switches | safechroma switches (caller + worker) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for op, n in cells:
        d, sc = m(op, n, "direct", "per_s"), m(op, n, "safe", "per_s")
        cc, wc = m(op, n, "safe", "cpu"), m(op, n, "safe", "worker_cpu")
        cx, wx = m(op, n, "safe", "switches"), m(op, n, "safe", "worker_switches")
        lines.append(
            f"| {LABELS[op]} | {n} | {d:.0f} | {sc:.0f} | {sc / d:.2f} "
            f"| {m(op, n, 'direct', 'cpu'):.0f} | {cc + wc:.0f} ({cc:.0f} + {wc:.0f}) "
            f"| {m(op, n, 'direct', 'switches'):.1f} | {cx + wx:.1f} ({cx:.1f} + {wx:.1f}) |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
