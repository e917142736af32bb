"""What crash isolation costs: safechroma vs direct Chroma, a Chroma server, a process per call.

Usage (from the repository root)::

    .venv/bin/python benchmarks/run.py              # full run, ~10 min on a 2-core machine
    .venv/bin/python benchmarks/run.py --quick      # ~2 min, fewer rounds
    .venv/bin/python benchmarks/run.py --records 100000

Writes ``results.md``, ``results.json`` and ``results.png`` to ``--out`` (default
``benchmarks/results``). See ``benchmarks/README.md`` for how to read them.

How it measures (issue 5): every mode runs in a driver process of its own on its own copy of the
same data; round by round, each operation is run in every mode in turn (the order of the modes
rotates each round), so slow drift of this noisy shared machine hits all modes alike and the
ratios hold. Each driver times the bare call with ``time.perf_counter_ns`` inside its process.
Median and p95 after a warm-up.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _sysinfo  # noqa: E402
from _drivers import available, build_main, driver_main  # noqa: E402
from _workload import (  # noqa: E402
    BATCH,
    BULK_IDS,
    OP_BY_NAME,
    OPS,
    TASKS,
    THREADS,
    THROUGHPUT_OPS,
)

THROUGHPUT_MODES = ("direct", "safechroma", "http")

ALL_MODES = ("direct", "safechroma", "http", "process-per-call")
PPC_FAST_REPS = 3  # process-per-call: calls per fast op per round (each costs ~1 s)
SCHEMA_VERSION = 1


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class DriverError(RuntimeError):
    pass


class Driver:
    """The benchmark process's handle on one mode's driver process."""

    def __init__(self, ctx: Any, mode: str, cfg: dict[str, Any]) -> None:
        self.mode = mode
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=driver_main, args=(child, mode, cfg), name=f"bench-{mode}")
        self.proc.start()
        child.close()
        self.broken: str | None = None

    def call(self, cmd: str, timeout: float = 600.0, **kwargs: Any) -> Any:
        if self.broken:
            raise DriverError(f"{self.mode} driver is broken: {self.broken}")
        self.conn.send((cmd, kwargs))
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.5):
            if not self.proc.is_alive():
                self.broken = f"driver process died (exit code {self.proc.exitcode})"
                raise DriverError(f"{self.mode}: {self.broken} during {cmd}")
            if time.monotonic() > deadline:
                self.broken = f"{cmd} took more than {timeout:.0f} s"
                self.kill()
                raise DriverError(f"{self.mode}: {self.broken}")
        status, payload = self.conn.recv()
        if status != "ok":
            raise DriverError(f"{self.mode} {cmd} failed:\n{payload}")
        return payload

    def shutdown(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.proc.is_alive() and not self.broken:
            try:
                out = self.call("shutdown", timeout=60)
            except (DriverError, OSError, EOFError) as exc:
                out = {"error": str(exc)}
        self.proc.join(30)
        self.kill()
        self.conn.close()
        return out

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


class ChromaServer:
    """``chroma run`` on loopback, on a free port, started and stopped by the suite."""

    def __init__(self, path: Path, log_path: Path) -> None:
        self.port = _sysinfo.free_port()
        self.log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        chroma = Path(sys.executable).with_name("chroma")
        t0 = time.perf_counter_ns()
        # Own session: Ctrl-C in the terminal must not kill it before the drivers are closed.
        self.proc = subprocess.Popen(
            [
                str(chroma),
                "run",
                "--path",
                str(path),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
        )
        deadline = time.monotonic() + 120
        while not _sysinfo.port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"chroma run exited with {self.proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"chroma run did not listen within 120 s; see {log_path}")
            time.sleep(0.02)
        self.listen_ns = time.perf_counter_ns() - t0

    def network(self) -> dict[str, Any]:
        eps = _sysinfo.inet_endpoints(self.proc.pid)
        for kid in _sysinfo.descendants(self.proc.pid):
            eps += _sysinfo.inet_endpoints(kid)
        return {"sockets": eps, "non_loopback_sockets": _sysinfo.non_loopback(eps)}

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.proc.pid}
        if self.proc.poll() is None:
            t0 = time.perf_counter_ns()
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                out["killed"] = True
                self.proc.kill()
                self.proc.wait(10)
            out["stop_ns"] = time.perf_counter_ns() - t0
        out["returncode"] = self.proc.returncode
        out["port_closed"] = not _sysinfo.port_open(self.port)
        out["process_gone"] = not _sysinfo.alive(self.proc.pid)
        self.log_file.close()
        return out


# --- data --------------------------------------------------------------------------------------


def dataset(ctx: Any, records: int, cache_dir: Path | None, workdir: Path) -> tuple[Path, float]:
    """The master copy of the data (built once per records/chromadb version when cached)."""
    version = _sysinfo.machine()["chromadb"]
    name = f"dataset-v{SCHEMA_VERSION}-r{records}-chromadb{version}"
    if cache_dir is not None:
        final = cache_dir / name
        if (final / "chroma.sqlite3").exists():
            return final, 0.0
        cache_dir.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=name + ".building-", dir=cache_dir))
    else:
        final = workdir / name
        build = final
    log(f"building {records} records x {{384, 1536}} dims (one time)")
    t0 = time.perf_counter()
    proc = ctx.Process(target=build_main, args=(str(build), records), name="bench-build")
    proc.start()
    proc.join(3600)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"building the data set failed (exit code {proc.exitcode})")
    if build != final:
        os.replace(build, final)  # atomic: a half-built cache is never used
    return final, time.perf_counter() - t0


# --- the run -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=10_000, help="records per collection (10000)")
    p.add_argument("--rounds", type=int, help="measured rounds (full 20, quick 3)")
    p.add_argument(
        "--reps", type=int, help="calls per mode per round for fast ops (full 15, quick 8)"
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds and trials: ~2 minutes")
    p.add_argument(
        "--modes",
        default=",".join(ALL_MODES),
        help=f"comma-separated subset of {','.join(ALL_MODES)}",
    )
    p.add_argument(
        "--slow-rounds",
        type=int,
        help="rounds that include the slow ops: bulk get, add, upsert (full 5, quick 1)",
    )
    p.add_argument(
        "--ppc-rounds",
        type=int,
        help="rounds that include process-per-call (full 1, quick 1: fast ops only)",
    )
    p.add_argument("--crash-trials", type=int, help="worker SIGKILL trials (full 5, quick 2)")
    p.add_argument(
        "--startup-trials", type=int, help="SafeClient open-to-first-count trials (full 5, quick 2)"
    )
    p.add_argument(
        "--throughput-seconds",
        type=float,
        help="seconds per throughput cell (op x callers x mode; full 4, quick 1.5)",
    )
    p.add_argument(
        "--fresh-trials", type=int, help="open-a-fresh-directory trials (full 8, quick 4)"
    )
    p.add_argument(
        "--no-throughput", action="store_true", help="skip the throughput and fresh-open section"
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the results go")
    p.add_argument(
        "--workdir", type=Path, help="where the per-mode copies go (default: a temp dir)"
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=HERE / "results" / "tmp",
        help="keep the built master data set here between runs",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="build the data set afresh in the workdir"
    )
    p.add_argument("--no-chart", action="store_true", help="skip results.png")
    a = p.parse_args(argv)
    quick = a.quick
    a.rounds = a.rounds if a.rounds is not None else (3 if quick else 20)
    a.reps = a.reps if a.reps is not None else (8 if quick else 15)
    a.slow_rounds = a.slow_rounds if a.slow_rounds is not None else (1 if quick else 5)
    a.ppc_rounds = a.ppc_rounds if a.ppc_rounds is not None else 1
    a.crash_trials = a.crash_trials if a.crash_trials is not None else (2 if quick else 5)
    a.startup_trials = a.startup_trials if a.startup_trials is not None else (2 if quick else 5)
    if a.throughput_seconds is None:
        a.throughput_seconds = 1.5 if quick else 4.0
    a.fresh_trials = a.fresh_trials if a.fresh_trials is not None else (4 if quick else 8)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = set(a.modes) - set(ALL_MODES)
    if unknown:
        p.error(f"unknown modes: {sorted(unknown)}")
    if "direct" not in a.modes:
        p.error("direct is the baseline: it must be among --modes")
    if a.records < 100 or a.rounds < 1 or a.reps < 1:
        p.error("--records >= 100, --rounds >= 1, --reps >= 1")
    return a


def throughput(drivers: dict[str, Driver], args: argparse.Namespace, res: dict[str, Any]) -> None:
    """Calls per second with 1-8 threads and 8 and 64 asyncio tasks at once, and the time to
    the first answer on a fresh directory in a process that already has a client (issue 10).

    Each cell (op x number of callers x mode) runs for ``--throughput-seconds``; the modes take
    turns within a cell, the first one rotating, so drift hits every mode alike. The upserts
    run last: they grow the collection (100 new records per call, alike in every mode).
    """
    modes = [m for m in drivers if m in THROUGHPUT_MODES]
    out: dict[str, Any] = {"threads": {}, "tasks": {}, "modes": modes}
    res["throughput"] = out
    turn = 0
    for op in THROUGHPUT_OPS:
        for kind, counts, cmd in (
            ("threads", THREADS, "throughput"),
            ("tasks", TASKS, "athroughput"),
        ):
            for n in counts:
                order = modes[turn % len(modes) :] + modes[: turn % len(modes)]
                turn += 1
                cell = out[kind].setdefault(op, {}).setdefault(str(n), {})
                for mode in order:
                    try:
                        cell[mode] = drivers[mode].call(
                            cmd,
                            op=op,
                            **({"workers": n} if kind == "threads" else {"tasks": n}),
                            seconds=args.throughput_seconds,
                            tag=f"{kind[0]}{n}",
                            timeout=300,
                        )
                    except DriverError as exc:
                        res["errors"].append(f"throughput {op} {kind}={n} {mode}: {exc}")
                        log(str(exc).splitlines()[0])
                log(
                    f"throughput {op} {kind}={n}: "
                    + ", ".join(f"{m} {cell[m]['per_s']:.0f}/s" for m in modes if m in cell)
                )
    res["fresh_open"] = {}
    for mode in ("direct", "safechroma"):
        if mode in drivers:
            try:
                res["fresh_open"][mode] = drivers[mode].call(
                    "fresh_open", n=args.fresh_trials, timeout=600
                )
            except DriverError as exc:
                res["errors"].append(f"fresh_open {mode}: {exc}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    explicit_modes = any(x == "--modes" or x.startswith("--modes=") for x in given)
    t_start = time.perf_counter()
    os.environ["ANONYMIZED_TELEMETRY"] = "False"  # inherited by every child (workers included)
    ctx = multiprocessing.get_context("spawn")  # never fork: CHROMA_FACTS 4

    skipped: dict[str, str] = {}
    for mode in list(args.modes):
        why = available(mode)
        if why:
            if explicit_modes:
                log(f"mode {mode} was asked for but cannot run: {why}")
                return 2
            skipped[mode] = why
            args.modes.remove(mode)
            log(f"skipping mode {mode}: {why}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="safechroma-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    own_workdir = args.workdir is None
    drivers: dict[str, Driver] = {}
    server: ChromaServer | None = None
    results: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "machine": _sysinfo.machine(),
        "config": {
            "records": args.records,
            "rounds": args.rounds,
            "reps_fast_ops": args.reps,
            "slow_rounds": min(args.slow_rounds, args.rounds),
            "ppc_rounds": min(args.ppc_rounds, args.rounds),
            "ppc_reps_fast_ops": PPC_FAST_REPS,
            "crash_trials": args.crash_trials,
            "startup_trials": args.startup_trials,
            "throughput_seconds": None if args.no_throughput else args.throughput_seconds,
            "fresh_trials": args.fresh_trials,
            "quick": args.quick,
            "modes": args.modes,
            "batch": BATCH,
            "bulk_ids": BULK_IDS,
            "command": " ".join(
                [Path(sys.executable).name, "benchmarks/run.py", *(argv or sys.argv[1:])]
            ),
        },
        "skipped_modes": skipped,
        "wall_seconds": {},
        "errors": [],
    }
    raw: dict[str, dict[str, dict[str, Any]]] = {op.name: {} for op in OPS}

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        master, build_s = dataset(
            ctx, args.records, None if args.no_cache else args.cache_dir, workdir
        )
        results["build_seconds"] = build_s
        copies: dict[str, Path] = {}
        for mode in args.modes:
            copies[mode] = workdir / f"copy-{mode}"
            shutil.copytree(master, copies[mode])

        if "http" in args.modes:
            server = ChromaServer(copies["http"], workdir / "chroma-server.log")
            log(
                f"chroma run listening on 127.0.0.1:{server.port} after "
                f"{server.listen_ns / 1e9:.2f} s"
            )

        for mode in args.modes:
            cfg = {"path": str(copies[mode]), "records": args.records}
            if mode == "http":
                assert server is not None
                cfg.update(port=server.port, server_pid=server.proc.pid)
            drivers[mode] = Driver(ctx, mode, cfg)

        # Open every client (first answer), then warm every op up in every mode.
        results["open"] = {}
        for mode, drv in drivers.items():
            results["open"][mode] = drv.call("open", timeout=300)
        if server is not None:
            results["open"]["http"]["server_listen_ns"] = server.listen_ns
        log("warming up")
        # Every read op a few times and one add: the write path warm. (open() loaded both
        # collections; not every slow op: at 10k records a 1536-dim add costs seconds.)
        warm = [op.name for op in OPS if not op.slow] + ["get_bulk_emb", "add384"]
        for name in warm:
            for mode, drv in drivers.items():
                if mode == "process-per-call" and name != "count":
                    continue
                reps = 1 if (OP_BY_NAME[name].slow or mode == "process-per-call") else 3
                drv.call("run", op=name, rnd=-1, reps=reps, tag="w")

        timed = list(drivers)
        for rnd in range(args.rounds):
            t_round = time.perf_counter()
            shift = rnd % len(timed)
            order = timed[shift:] + timed[:shift]  # rotate: no mode always goes first
            for op in OPS:
                if op.slow and rnd >= args.slow_rounds:
                    continue
                for mode in order:
                    if mode == "process-per-call":
                        if rnd >= args.ppc_rounds or (op.slow and args.quick):
                            continue
                        reps = 1 if op.slow else PPC_FAST_REPS
                    else:
                        reps = 1 if op.slow else args.reps
                    t_call = time.perf_counter()
                    try:
                        got = drivers[mode].call("run", op=op.name, rnd=rnd, reps=reps)
                    except DriverError as exc:
                        results["errors"].append(f"round {rnd} {op.name} {mode}: {exc}")
                        log(str(exc).splitlines()[0])
                        continue
                    wall = results["wall_seconds"].setdefault(op.name, {})
                    wall[mode] = wall.get(mode, 0.0) + time.perf_counter() - t_call  # incl. cleanup
                    slot = raw[op.name].setdefault(mode, {"rounds": {}})
                    slot["rounds"].setdefault(rnd, [])
                    slot["rounds"][rnd] += got["ns"]
                    for key in (
                        "ns",
                        "transport_ns",
                        "bytes_out",
                        "payload",
                        "exit_ns",
                        "breakdown",
                    ):
                        slot.setdefault(key, []).extend(got.get(key, []))
            log(f"round {rnd + 1}/{args.rounds} done in {time.perf_counter() - t_round:.1f} s")

        # Resident memory and sockets in steady state, before anything is closed.
        results["rss"] = {}
        results["network"] = {}
        for mode, drv in drivers.items():
            try:
                results["rss"][mode] = drv.call("rss", timeout=60)
                results["network"][mode] = drv.call("network", timeout=60)
            except DriverError as exc:
                results["errors"].append(str(exc))
        if server is not None:
            results["network"]["http-server"] = server.network()

        if not args.no_throughput:
            throughput(drivers, args, results)

        if "safechroma" in drivers:
            sc = drivers["safechroma"]
            try:
                results["safechroma_close"] = sc.call("close", timeout=120)
                log("safechroma: start-up trials")
                results["startup"] = sc.call("startup", n=args.startup_trials, timeout=600)
                log("safechroma: crash trials (SIGKILL the worker)")
                results["crash"] = sc.call("crash", n=args.crash_trials, settle_s=1.0, timeout=600)
            except DriverError as exc:
                results["errors"].append(str(exc))
                log(str(exc).splitlines()[0])
    except KeyboardInterrupt:
        log("interrupted: stopping drivers and the server")
        results["errors"].append("interrupted")
        raise
    finally:
        results["shutdown"] = {}
        for mode, drv in drivers.items():
            results["shutdown"][mode] = drv.shutdown()
        if server is not None:
            results["shutdown"]["http-server"] = server.stop()
            if not results["shutdown"]["http-server"]["port_closed"]:
                log("WARNING: chroma run still answers on its port")
        leftovers = [
            {"pid": p, "cmd": _sysinfo.cmdline(p)[:120]}
            for p in _sysinfo.descendants(os.getpid())
            # multiprocessing's resource tracker is its own helper; it exits with this process
            if _sysinfo.alive(p) and "resource_tracker" not in _sysinfo.cmdline(p)
        ]
        results["leftover_children"] = leftovers
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    results["machine"]["loadavg_end"] = os.getloadavg()
    results["duration_seconds"] = time.perf_counter() - t_start
    from _report import analyse, write_outputs

    analyse(results, raw)
    paths = write_outputs(results, args.out, chart_too=not args.no_chart)
    print(paths["md"].read_text())
    log(f"wrote {', '.join(str(p) for p in paths.values())} in {results['duration_seconds']:.0f} s")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything the suite started has been stopped", file=sys.stderr)
        sys.exit(130)
