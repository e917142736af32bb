"""``safechroma`` command line: check, repair, info, serve, demo. The only module that prints.

Exit codes: 0 healthy / done, 1 damaged (``check``), repair incomplete, or records removed by
the repair (their vectors existed nowhere; saved for re-adding), 2 cannot check
(not a Chroma directory, SQLite busy, directory locked by another process), 3 written by a
newer chromadb than the installed one (nothing checked further, nothing changed).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from safechroma.storage.recovery import pending_salvage_files, repair_directory
from safechroma.storage.validate import DirectoryReport, check_directory

LOCK_NAME = ".safechroma.lock"

# Runs in a short-lived child: the CLI process itself never opens the directory with Chroma
# (FACTS §4: one owner per directory; a fresh process is the clean reset after a repair).
_APPLY = """
import json, sys
import chromadb
from safechroma.storage.recovery import apply_salvage
client = chromadb.PersistentClient(sys.argv[1])
out = [apply_salvage(client, f) for f in sys.argv[2:]]
print("RESULT " + json.dumps(out), flush=True)
"""


def _progress(step: str, details: dict[str, Any]) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(
            f"\r  ... {step}: {', '.join(f'{k}={v}' for k, v in details.items())}\x1b[K\n"
        )
        sys.stderr.flush()


def _print_check(rep: DirectoryReport, out: TextIO) -> None:
    mark = {
        "healthy": "OK",
        "damaged": "DAMAGED",
        "unknown": "UNKNOWN",
        "incompatible": "INCOMPATIBLE",
    }
    out.write(
        f"{mark[rep.status]}  {rep.path}  ({rep.elapsed_s * 1000:.0f} ms, sqlite "
        f"{rep.sqlite_status})\n"
    )
    for f in rep.findings:
        out.write(f"  [{f.severity}] {f.code}: {f.message}\n")
    for c in rep.collections:
        out.write(
            f"  {mark[c.status]:8} {c.name or c.segment_id}  "
            f"({c.records if c.records is not None else '?'} records, {c.space}, "
            f"dim {c.dimension})\n"
        )
        for f in c.findings:
            out.write(f"      [{f.severity}] {f.code}: {f.message}\n")


def _lock(path: str) -> int | None:
    """Take the directory lock (shared with the core's SafeClient) without waiting."""
    fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _cmd_check(a: argparse.Namespace) -> int:
    rep = check_directory(a.path, deep=not a.quick)
    if a.json:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        _print_check(rep, sys.stdout)
    return {"healthy": 0, "damaged": 1, "unknown": 2, "incompatible": 3}[rep.status]


def _cmd_info(a: argparse.Namespace) -> int:
    rep = check_directory(a.path, deep=False, wal_coverage=True)
    if a.json:
        print(json.dumps(rep.to_dict(), indent=1))
        return 0 if rep.status != "unknown" else 2
    if rep.sqlite_status != "ok":
        _print_check(rep, sys.stdout)
        return 2
    purge = {True: "on (Chroma default)", False: "off (full WAL kept)", None: "unknown"}[
        rep.wal_purge
    ]
    print(f"{rep.path}\n  WAL purge: {purge}")
    print(
        f"  {'collection':24} {'records':>8} {'dim':>5} {'space':6} {'index':>8} {'index MB':>9} "
        f"{'WAL rows':>9}  WAL covers all"
    )
    for c in rep.collections:
        size = 0
        if c.segment_path and os.path.isdir(c.segment_path):
            size = sum(
                os.path.getsize(os.path.join(c.segment_path, n)) for n in os.listdir(c.segment_path)
            )
        idx = c.hnsw.element_count if c.hnsw else "-"
        print(
            f"  {str(c.name):24} {c.records!s:>8} {c.dimension!s:>5} {c.space:6} {idx!s:>8} "
            f"{size / 1e6:9.2f} {c.wal_rows:>9}  {c.wal_covers_all}"
        )
    return 0


def _cmd_repair(a: argparse.Namespace) -> int:
    path = a.path
    if not os.path.isfile(os.path.join(path, "chroma.sqlite3")):
        print(f"error: {path} is not a Chroma directory (no chroma.sqlite3)", file=sys.stderr)
        return 2
    fd = _lock(path)
    if fd is None:
        print(
            f"error: {path} is in use: another process holds {LOCK_NAME}. Stop it (or close its "
            "SafeClient) and retry.",
            file=sys.stderr,
        )
        return 2
    try:
        before = check_directory(path, wal_coverage=True)
        if before.status in ("unknown", "incompatible"):
            _print_check(before, sys.stderr)
            return 2 if before.status == "unknown" else 3
        rep = repair_directory(path, before, dry_run=a.dry_run, progress=_progress)
        pending = [] if a.dry_run else pending_salvage_files(path)
        applied: list[dict[str, Any]] = []
        if pending:
            _progress("write-back", {"files": len(pending)})
            p = subprocess.run(
                [sys.executable, "-c", _APPLY, path, *pending], capture_output=True, text=True
            )
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                print(
                    f"error: write-back of salvaged vectors failed (rc={p.returncode}); the "
                    f"backup is in {rep.backup_dir}; run repair again\n{p.stderr[-2000:]}",
                    file=sys.stderr,
                )
                return 1
            applied = json.loads(lines[-1][7:])
        after = None if a.dry_run or rep.status == "nothing_to_do" else check_directory(path)
        result = {
            "repair": rep.to_dict(),
            "applied": applied,
            "after": after.to_dict() if after else None,
        }
        if a.json:
            print(json.dumps(result, indent=1))
        else:
            print(f"{rep.status.upper()}: {rep.message}")
            for c in rep.collections:
                print(
                    f"  {c.name}: {', '.join(c.reasons)} -> {c.action}; WAL covers all: "
                    f"{c.wal_covers_all}; salvaged {c.salvaged}; "
                    f"not recoverable {len(c.not_recovered)}"
                )
            for s in applied:
                removed = s.get("removed") or []
                print(
                    f"  wrote back {s['recovered']} vectors to {s['collection']}; "
                    f"{s.get('reembedded', 0)} re-embedded; {len(removed)} removed "
                    f"(their vectors exist nowhere; documents and metadata saved in "
                    f"{s['salvage_file']}.removed.json: re-add them with embeddings)"
                )
                for r in s["not_recovered"][:10]:
                    print(f"      {r['id']}: {str(r['document'])[:60]!r}")
            if after is not None:
                print(f"  after repair: {after.status}")
        if rep.status == "not_repairable":
            return 1
        if after is not None and after.status != "healthy":
            return 1
        if any(s.get("removed") for s in applied):
            return 1  # healthy again, but records are gone until the caller re-adds them
        return 0
    finally:
        os.close(fd)


def _cmd_serve(a: argparse.Namespace) -> int:
    """``safechroma serve PATH``: Chroma's server on PATH, supervised, until SIGTERM/SIGINT.

    Exit 0 after a requested stop; 1 when it gave up (crash loop, damage it could not repair,
    Chroma would not start); 2 when it could not begin (port in use, directory in use, a
    directory written by a newer chromadb).
    """
    import datetime
    import signal

    from safechroma._errors import (
        CrashLoopError,
        DirectoryLockedError,
        IncompatibleDirectoryError,
        RecoveryError,
        ServeError,
    )
    from safechroma._policy import Event
    from safechroma.server import ServeOptions, Server, describe

    def log(event: Event) -> None:
        stamp = datetime.datetime.fromtimestamp(event.time, datetime.UTC)
        sys.stderr.write(f"{stamp:%Y-%m-%dT%H:%M:%S}Z safechroma serve: {describe(event)}\n")
        if event.kind == "chroma_died" and event.detail.get("log_tail", "").strip():
            for line in event.detail["log_tail"].strip().splitlines()[-15:]:
                sys.stderr.write(f"    | {line}\n")
        sys.stderr.flush()
        if event.kind == "chroma_ready":
            print(f"serving {a.path} at {event.detail['address']}", flush=True)

    options = ServeOptions(
        host=a.host,
        port=a.port,
        stop_grace=a.stop_grace,
        health_interval=a.health_interval,
        health_timeout=a.health_timeout,
        health_grace=a.health_grace,
        health_failures=a.health_failures,
        chroma_log=a.chroma_log,
        on_event=log,
    )
    server = Server(a.path, options)
    previous = {
        sig: signal.signal(sig, lambda _signo, _frame: server.stop())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        server.run()
    except (DirectoryLockedError, IncompatibleDirectoryError, ServeError) as exc:
        print(f"safechroma serve: error: {exc}", file=sys.stderr)
        return 1 if getattr(exc, "reason", None) == "start_failed" else 2
    except (CrashLoopError, RecoveryError) as exc:
        print(f"safechroma serve: gave up: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _add_serve(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="run Chroma's server on a directory, supervised (repair, restart, watchdog)",
    )
    s.add_argument("path")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--stop-grace", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL")
    s.add_argument(
        "--health-interval", type=float, default=5.0, help="seconds between health checks"
    )
    s.add_argument(
        "--health-timeout", type=float, default=10.0, help="seconds one health check may take"
    )
    s.add_argument(
        "--health-grace", type=float, default=30.0, help="seconds after a start not counted"
    )
    s.add_argument(
        "--health-failures", type=int, default=3, help="failed checks in a row before a restart"
    )
    s.add_argument("--chroma-log", help="append Chroma's own output to this file")
    s.set_defaults(fn=_cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["demo"]:
        from safechroma._demo import main as demo_main  # type: ignore[import-not-found,unused-ignore]

        return int(demo_main(args[1:]))
    ap = argparse.ArgumentParser(
        prog="safechroma", description="Check and repair Chroma persist directories."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser(
        "check", help="validate a directory (exit 0 healthy, 1 damaged, 2 cannot check)"
    )
    c.add_argument("path")
    c.add_argument("--json", action="store_true")
    c.add_argument("--quick", action="store_true", help="headers, sizes and pickles only")
    c.set_defaults(fn=_cmd_check)
    r = sub.add_parser(
        "repair", help="back up, quarantine damaged indexes, write back salvaged vectors"
    )
    r.add_argument("path")
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=_cmd_repair)
    i = sub.add_parser("info", help="collections, counts, dimensions, spaces, sizes, WAL coverage")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_info)
    sub.add_parser("demo", help="run the crash-safety demo")
    _add_serve(sub)
    a = ap.parse_args(args)
    return int(a.fn(a))
