"""Latency of each way to reach one Chroma directory, side by side in one run.

Modes (each a driver process of ``_drivers.py``, on its own copy of one data set):

- ``direct``: ``chromadb.PersistentClient`` in the caller (the baseline, no isolation);
- ``safechroma``: ``SafeClient`` (one machine: a supervised worker process);
- ``http``: ``chromadb.HttpClient`` to a plain ``chroma run`` on loopback;
- ``safe-http/chroma-run``: ``SafeHttpClient`` to a plain ``chroma run`` (the guarded transport's
  own cost);
- ``safe-http/serve``: ``SafeHttpClient`` to ``safechroma serve`` (the full remote path; the
  watchdog's reads run at their default interval).

Rounds interleave the modes, so drift on a shared machine hits all of them alike. Reports the
median and p95 after warm-up, and each median as a ratio of ``direct``'s. A baseline, not a gate::

    .venv/bin/python benchmarks/bench_http.py --records 10000 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sysinfo  # noqa: E402
from _drivers import build_main, driver_main  # noqa: E402

FAST_OPS = ("heartbeat", "count", "get_ids10", "query1", "query16")
SLOW_OPS = ("add384",)


class _Driver:
    def __init__(self, ctx: Any, mode: str, cfg: dict[str, Any]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=driver_main, args=(child, mode, cfg))
        self.proc.start()
        child.close()

    def call(self, cmd: str, **kwargs: Any) -> Any:
        self.conn.send((cmd, kwargs))
        if not self.conn.poll(600):
            raise RuntimeError(f"{cmd} took more than 600 s")
        status, payload = self.conn.recv()
        if status != "ok":
            raise RuntimeError(payload)
        return payload

    def close(self) -> None:
        try:
            self.call("shutdown")
        finally:
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
            self.conn.close()


def _start(cmd: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
        )
    deadline = time.monotonic() + 120
    while not _sysinfo.port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start; see {log}")
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=40, help="calls per fast op per mode per round")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    args = ap.parse_args()

    ctx = multiprocessing.get_context("spawn")
    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    servers: list[subprocess.Popen[bytes]] = []
    drivers: dict[str, _Driver] = {}
    try:
        master = work / "master"
        build = ctx.Process(target=build_main, args=(str(master), args.records))
        build.start()
        build.join()
        if build.exitcode != 0:
            raise RuntimeError("building the data set failed")
        copies = {}
        for mode in ("direct", "safechroma", "chroma-run", "serve"):
            copies[mode] = work / mode
            shutil.copytree(master, copies[mode])
        chroma_port, serve_port = _sysinfo.free_port(), _sysinfo.free_port()
        chroma = Path(sys.executable).with_name("chroma")
        servers.append(
            _start(
                [
                    str(chroma),
                    "run",
                    "--path",
                    str(copies["chroma-run"]),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(chroma_port),
                ],
                chroma_port,
                work / "chroma-run.log",
            )
        )
        servers.append(
            _start(
                [
                    sys.executable,
                    "-m",
                    "safechroma",
                    "serve",
                    str(copies["serve"]),
                    "--port",
                    str(serve_port),
                ],
                serve_port,
                work / "serve.log",
            )
        )
        base = {"records": args.records}
        plan = {
            "direct": ("direct", {"path": str(copies["direct"])}),
            "safechroma": ("safechroma", {"path": str(copies["safechroma"])}),
            "http": ("http", {"path": "", "port": chroma_port}),
            "safe-http/chroma-run": ("safe-http", {"path": "", "port": chroma_port}),
            "safe-http/serve": ("safe-http", {"path": "", "port": serve_port}),
        }
        for label, (mode, cfg) in plan.items():
            drivers[label] = _Driver(ctx, mode, {**base, **cfg})
            drivers[label].call("open")
        times: dict[str, dict[str, list[int]]] = {op: {m: [] for m in plan} for op in FAST_OPS}
        times.update({op: {m: [] for m in plan} for op in SLOW_OPS})
        for d in drivers.values():  # warm-up
            for op in FAST_OPS:
                d.call("run", op=op, rnd=0, reps=10, tag="warm")
        for rnd in range(1, args.rounds + 1):
            for op in FAST_OPS + SLOW_OPS:
                reps = args.reps if op in FAST_OPS else 1
                order = list(drivers.items())
                if rnd % 2:
                    order.reverse()
                for label, d in order:
                    times[op][label] += d.call("run", op=op, rnd=rnd, reps=reps, tag=label)["ns"]
        env = _sysinfo.machine()
        print(f"# bench_http: {args.records} records x dims 384/1536, {args.rounds} rounds")
        print(f"# {json.dumps(env, default=str)}")
        header = f"{'operation':22}" + "".join(f"{m:>24}" for m in plan)
        print(header)
        for op, by_mode in times.items():
            ref = statistics.median(by_mode["direct"])
            cells = []
            for m in plan:
                xs = sorted(by_mode[m])
                med = statistics.median(xs)
                p95 = xs[min(len(xs) - 1, int(0.95 * len(xs)))]
                cells.append(f"{med / 1e6:8.2f}/{p95 / 1e6:7.2f} ms {med / ref:4.1f}x")
            print(f"{op:22}" + "".join(f"{c:>24}" for c in cells))
        print("# cells: median/p95 ms, median as a multiple of direct's")
        if args.json:
            args.json.write_text(json.dumps({"env": env, "ns": times}, default=str))
    finally:
        for d in drivers.values():
            try:
                d.close()
            except Exception as exc:  # noqa: BLE001 - report and go on closing
                print(f"closing a driver: {exc}", file=sys.stderr)
        for proc in servers:
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
