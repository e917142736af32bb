"""``safechroma serve``: Chroma's own server (a real ``chroma run``) under supervision (issue 14).

Every test runs the real command line as a child on a free port of 127.0.0.1 and uses real
signals; directories are built by Chroma in child processes (tests/chroma_dirs.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from chromadb.config import Settings

# Slow (real `chroma run` servers): not in the everyday lane, -m "not slow".
pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.dirname(__file__))
import chroma_dirs  # noqa: E402
from servers import PlainChroma, Serve, alive, free_port, wait_heartbeat  # noqa: E402

from safechroma import (  # noqa: E402
    DirectoryLockedError,
    SafeClient,
    SafeHttpClient,
    ServerUnavailableError,
)
from safechroma._demo import _break_level0  # noqa: E402

N, DIM = 300, 8


def no_telemetry() -> Settings:
    return Settings(anonymized_telemetry=False)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("serve") / "db"
    chroma_dirs.make_collection_dir(str(root), n=N, dim=DIM, sync_threshold=100)
    return str(root)


def _copy(template: str, dest: Path) -> str:
    shutil.copytree(template, dest)
    return str(dest)


def test_segfaulting_directory_is_repaired_before_serving(template: str, tmp_path: Path) -> None:
    """The first query of plain ``chroma run`` kills it; under serve it answers correctly."""
    plain_dir = _copy(template, tmp_path / "plain")
    served_dir = _copy(template, tmp_path / "served")
    for d in (plain_dir, served_dir):
        _break_level0(chroma_dirs.segment_dir(d))
    query = chroma_dirs.vectors("coll", N, DIM)

    # The same damage, plain Chroma: the whole server dies with SIGSEGV on the first query.
    with PlainChroma(plain_dir, free_port(), tmp_path) as plain:
        client = SafeHttpClient(
            "127.0.0.1", plain.port, settings=no_telemetry(), reconnect_timeout=1
        )
        try:
            col = client.get_collection("coll", embedding_function=None)
            with pytest.raises(ServerUnavailableError):
                col.query(query_embeddings=query[:1], n_results=1)
        finally:
            client.close()
        assert plain.proc is not None and plain.proc.wait(10) == -signal.SIGSEGV

    with Serve(served_dir, free_port(), tmp_path) as serve:
        client = SafeHttpClient("127.0.0.1", serve.port, settings=no_telemetry())
        try:
            col = client.get_collection("coll", embedding_function=None)
            res = col.query(query_embeddings=query, n_results=1)
            assert [hit[0] for hit in res["ids"]] == chroma_dirs.record_ids("coll", N)
            assert col.count() == N
            assert client.stats().outages == 0  # the server never died
        finally:
            client.close()
        log = serve.stderr()
    assert "validated" in log and "damaged" in log and "repaired" in log, log
    assert "died" not in log, log


def test_damage_found_after_a_death_is_repaired_before_the_restart(
    template: str, tmp_path: Path
) -> None:
    """The index is broken on disk while Chroma runs, then Chroma is killed: serve validates
    before restarting, repairs, and the restarted server answers every query correctly."""
    path = _copy(template, tmp_path / "db")
    chroma_log = tmp_path / "chroma-output.log"
    with Serve(path, free_port(), tmp_path, "--chroma-log", str(chroma_log)) as serve:
        chroma = serve.chroma_pid
        os.kill(chroma, signal.SIGSTOP)
        _break_level0(chroma_dirs.segment_dir(path))
        os.kill(chroma, signal.SIGKILL)
        serve.wait_serving()
        client = SafeHttpClient("127.0.0.1", serve.port, settings=no_telemetry())
        try:
            col = client.get_collection("coll", embedding_function=None)
            assert _first_hits(col) == chroma_dirs.record_ids("coll", N)
        finally:
            client.close()
        log = serve.stderr()
    assert "died: SIGKILL" in log and "before restart: damaged" in log, log
    assert "repaired" in log, log
    assert chroma_log.read_text().count("Saving data to") == 2  # both lives of Chroma


def _first_hits(col: Any) -> list[str]:
    res = col.query(query_embeddings=chroma_dirs.vectors("coll", N, DIM), n_results=1)
    return [hit[0] for hit in res["ids"]]


def test_sigterm_stops_within_the_grace_period_and_releases_the_directory(
    template: str, tmp_path: Path
) -> None:
    path = _copy(template, tmp_path / "db")
    serve = Serve(path, free_port(), tmp_path).start()
    try:
        chroma = serve.chroma_pid
        assert serve.stdout().startswith(f"serving {path} at http://127.0.0.1:{serve.port}")
        # While it serves, the library refuses the directory and says where to go instead.
        with pytest.raises(DirectoryLockedError) as info:
            SafeClient(path)
        assert f"http://127.0.0.1:{serve.port}" in str(info.value)
        assert "SafeHttpClient" in str(info.value)
        assert info.value.address == f"http://127.0.0.1:{serve.port}"  # type: ignore[attr-defined]

        assert serve.proc is not None
        started = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(15) == 0
        assert time.monotonic() - started < 10.0  # the default grace period
        assert not alive(chroma)
    finally:
        serve.stop()
    assert "stopped" in serve.stderr()
    with SafeClient(path) as client:  # the lock is free again
        assert client.get_collection("coll", embedding_function=None).count() == N


def test_sigkill_of_serve_takes_the_server_with_it(template: str, tmp_path: Path) -> None:
    """No unsupervised Chroma is left on the directory when serve itself is killed."""
    path = _copy(template, tmp_path / "db")
    with Serve(path, free_port(), tmp_path) as serve:
        chroma = serve.chroma_pid
        assert serve.proc is not None
        serve.proc.kill()
        assert serve.proc.wait(15) == -signal.SIGKILL
        give_up = time.monotonic() + 15
        while alive(chroma) and time.monotonic() < give_up:
            time.sleep(0.05)
        assert not alive(chroma)
    with SafeClient(path) as client:  # and the lock went with it
        assert client.get_collection("coll", embedding_function=None).count() == N


def test_stop_is_bounded_while_a_request_hangs(template: str, tmp_path: Path) -> None:
    """Chroma alone drains in-flight requests on SIGTERM with no deadline (a request stuck on
    a locked SQLite kept it alive 15 s+): serve's stop ends at its grace period. SIGINT (a
    Ctrl-C) is handled like SIGTERM."""
    path = _copy(template, tmp_path / "db")
    with Serve(path, free_port(), tmp_path, "--stop-grace", "2") as serve:
        chroma = serve.chroma_pid
        client = SafeHttpClient("127.0.0.1", serve.port, settings=no_telemetry(), timeout=60)
        db = sqlite3.connect(os.path.join(path, "chroma.sqlite3"), timeout=0)
        outcome: list[BaseException] = []
        try:
            col = client.get_collection("coll", embedding_function=None)
            db.execute("BEGIN EXCLUSIVE")

            def write() -> None:
                try:
                    col.add(ids=["stuck"], embeddings=[[0.5] * DIM])
                except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                    outcome.append(exc)

            writer = threading.Thread(target=write)
            writer.start()
            time.sleep(1.0)
            assert writer.is_alive()  # the add hangs inside Chroma
            assert serve.proc is not None
            started = time.monotonic()
            serve.proc.send_signal(signal.SIGINT)
            assert serve.proc.wait(30) == 0
            assert time.monotonic() - started < 6.0
            assert not alive(chroma)
            writer.join(30)
        finally:
            db.rollback()
            db.close()
            client.close()
        assert "SIGKILL" in serve.stderr()
    # The write was in flight when the server went away: never replayed, said so.
    assert len(outcome) == 1 and isinstance(outcome[0], ServerUnavailableError), outcome
    assert outcome[0].outcome_unknown and outcome[0].cause == "dropped"  # type: ignore[attr-defined]


def test_second_serve_and_busy_port_are_refused(template: str, tmp_path: Path) -> None:
    path = _copy(template, tmp_path / "db")
    with Serve(path, free_port(), tmp_path) as first:
        second = subprocess.run(
            [sys.executable, "-m", "safechroma", "serve", path, "--port", str(free_port())],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        assert "in use" in second.stderr and f"serve http://127.0.0.1:{first.port}" in second.stderr

    # Chroma itself exits 0 when its port is taken; serve detects it and says so.
    other = _copy(template, tmp_path / "other")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "safechroma", "serve", other, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert busy.returncode == 2, busy.stderr
    assert "port is in use" in busy.stderr


def test_restarts_after_each_death_and_gives_up_on_a_crash_loop(
    template: str, tmp_path: Path
) -> None:
    """SIGSEGV kills are restarted (validated first); five deaths within a minute open the
    breaker: serve stops, exits 1, and says why."""
    path = _copy(template, tmp_path / "db")
    with Serve(path, free_port(), tmp_path) as serve:
        assert serve.proc is not None
        pids: list[int] = []
        for i in range(5):
            pid = serve.chroma_pid if i == 0 else serve.wait_serving()
            assert pid not in pids
            pids.append(pid)
            os.kill(pid, signal.SIGSEGV)
            give_up = time.monotonic() + 30
            while alive(pid) and time.monotonic() < give_up:
                time.sleep(0.02)
        assert serve.proc.wait(60) == 1
        log = serve.stderr()
    assert log.count("died: SIGSEGV") == 5, log
    assert log.count("before restart") == 4, log  # validated before every restart
    assert "gave up" in log and "died 5 times" in log, log
    assert not any(alive(p) for p in pids)


def test_damage_that_cannot_be_repaired_stops_serve_with_the_reason(
    template: str, tmp_path: Path
) -> None:
    """Repair backs up first; when it cannot (here its state path is a file), serve does not
    start Chroma on the damaged directory: it exits 1 and says why."""
    path = _copy(template, tmp_path / "db")
    _break_level0(chroma_dirs.segment_dir(path))
    Path(path, ".safechroma").write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, "-m", "safechroma", "serve", path, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "gave up" in proc.stderr and "recovery failed" in proc.stderr, proc.stderr
    assert "started Chroma" not in proc.stderr


def test_watchdog_restarts_a_hung_server(template: str, tmp_path: Path) -> None:
    """The heartbeat of a stopped Chroma never answers either, but a SQLite-locked one does
    (CHROMA_FACTS.md section 6): the watchdog reads data. Short watchdog timings here make
    the mechanism visible in seconds; the defaults are a minute."""
    path = _copy(template, tmp_path / "db")
    args = ("--health-interval", "0.5", "--health-timeout", "1", "--health-grace", "0")
    with Serve(path, free_port(), tmp_path, *args, "--health-failures", "2") as serve:
        first = serve.chroma_pid
        os.kill(first, signal.SIGSTOP)
        give_up = time.monotonic() + 60
        second = first
        while second == first and time.monotonic() < give_up:
            time.sleep(0.1)
            kids = [p for p in _kids(serve) if alive(p)]
            second = kids[0] if kids else first
        assert second != first, serve.stderr()
        wait_heartbeat(serve.port)
        client = SafeHttpClient("127.0.0.1", serve.port, settings=no_telemetry(), timeout=10)
        try:
            assert client.get_collection("coll", embedding_function=None).count() == N
        finally:
            client.close()
        log = serve.stderr()
    assert "health check" in log and "hung" in log, log
    assert not alive(first)


def _kids(serve: Serve) -> list[int]:
    from servers import children

    assert serve.proc is not None
    return children(serve.proc.pid)


def test_server_in_python_reports_events_and_states(template: str, tmp_path: Path) -> None:
    """The supervision without the command line: ``Server(path, ServeOptions(...)).run()``."""
    from safechroma import Event
    from safechroma.server import ServeOptions, Server, State

    path = _copy(template, tmp_path / "db")
    events: list[Event] = []
    server = Server(path, ServeOptions(port=free_port(), on_event=events.append))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        give_up = time.monotonic() + 60
        while server.state is not State.SERVING and time.monotonic() < give_up:
            time.sleep(0.05)
        assert server.state is State.SERVING, (failure, events)
        client = SafeHttpClient("127.0.0.1", server.options.port, settings=no_telemetry())
        try:
            assert client.get_collection("coll", embedding_function=None).count() == N
        finally:
            client.close()
    finally:
        server.stop()
        thread.join(30)
    assert not failure and server.state is State.STOPPED
    kinds = [e.kind for e in events]
    assert kinds[:4] == ["serving", "validated", "chroma_started", "chroma_ready"], kinds
    assert kinds[-2:] == ["stopping", "stopped"], kinds


def test_config_ignores_inherited_chroma_variables(tmp_path: Path) -> None:
    """CHROMA_* variables override YAML keys in Chroma; serve's child never sees them."""
    path = str(tmp_path / "db")
    port, decoy = free_port(), free_port()
    env: dict[str, Any] = {
        **os.environ,
        "CHROMA_PORT": str(decoy),
        "CHROMA_LISTEN_ADDRESS": "0.0.0.0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "safechroma", "serve", path, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_heartbeat(port, proc=proc)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", decoy)) != 0
        assert _listening_addresses(port) == {"127.0.0.1"}  # not 0.0.0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    out = set()
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            cols = row.split()
            addr, hexport = cols[1].split(":")
            if cols[3] == "0A" and int(hexport, 16) == port:
                out.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return out
