"""The portable mechanisms (issue 23), exercised on Linux: ``SAFECHROMA_PORTABLE=1``.

With it set, a process uses what macOS uses (:mod:`safechroma.runtime.platform`): workers are
spawned (no fork template), a worker's exit is watched through a sentinel pipe (no pidfd), an
attaching process gets that sentinel over ``SCM_RIGHTS``, and the memory ceiling is an RSS
watchdog instead of ``RLIMIT_AS``. The mode is read once, when safechroma is imported, so each
scenario runs in a child Python started with the variable set (this test process may already
run in either mode). Real faults throughout: a genuine SIGBUS, a genuinely corrupt index,
SIGKILLs under concurrent writers.

The rest of the suite runs in this mode too:
``SAFECHROMA_PORTABLE=1 python -m pytest tests/test_crash.py tests/test_concurrency.py
tests/test_shared.py tests/test_process_faults.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import chroma_dirs
import pytest

from safechroma._errors import exit_name, signal_name

TESTS = str(Path(__file__).resolve().parent)

# Run first in every child: the mode is on, and how to read the process's descriptors.
PRELUDE = """
import json, os, sys
from safechroma.runtime import platform, template
assert platform.PORTABLE, "SAFECHROMA_PORTABLE=1 did not reach the seam"

def links(pid="self"):
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out

def pidfds(pid="self"):
    return [link for link in links(pid) if link == "anon_inode:[pidfd]"]

def pipes():
    return sorted(link for link in links() if link.startswith("pipe:"))

def parent_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])

def report(**facts):
    print(json.dumps(facts))
"""


def _portable(script: str, timeout: float = 600) -> dict[str, Any]:
    """Run ``script`` in a child Python with ``SAFECHROMA_PORTABLE=1``; its last line of
    output is a JSON object (``report(...)``), returned."""
    path = [TESTS, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "SAFECHROMA_PORTABLE": "1", "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_exit_codes_are_named_on_every_system() -> None:
    """Pins the pure naming of how a worker ended: POSIX signals from a negative
    ``Popen.returncode``, Windows crashes from their NTSTATUS exit code, read unsigned (as
    ``Popen`` gives it) or signed; a plain exit has no name."""
    assert exit_name(-7) == "SIGBUS" and exit_name(-11) == "SIGSEGV"
    assert exit_name(-9) == "SIGKILL" and exit_name(-6) == "SIGABRT"
    assert exit_name(0xC0000005) == "ACCESS_VIOLATION"
    assert exit_name(-1073741819) == "ACCESS_VIOLATION"  # the same code, signed
    assert exit_name(0xC0000006) == "IN_PAGE_ERROR"  # Windows' SIGBUS
    assert exit_name(0xC0000409) == "STACK_BUFFER_OVERRUN"  # fail-fast: abort(), Rust panics
    assert exit_name(0) is None and exit_name(3) is None and exit_name(None) is None
    assert exit_name(-200) == "signal 200"
    assert signal_name(0xC0000005) == "ACCESS_VIOLATION"  # what WorkerCrashedError.signal uses


def test_the_caller_holds_no_pidfd_and_workers_are_spawned(tmp_path: Path) -> None:
    """Pins the portable mode's mechanisms on a working client: no pidfd in the caller (nor in
    the worker), no fork template, the worker a direct child (spawned), calls from several
    threads served, and the sentinel pipes all closed again with the client."""
    out = _portable(
        f"""
        from concurrent.futures import ThreadPoolExecutor
        from safechroma import SafeClient

        before = pipes()
        with SafeClient({str(tmp_path / "db")!r}) as client:
            col = client.create_collection("col", embedding_function=None)
            col.add(ids=[f"r{{i}}" for i in range(50)], embeddings=[[i, 1.0] for i in range(50)])
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(lambda i: col.get(ids=[f"r{{i}}"])["ids"], range(40)))
            worker = client.stats().worker_pid
            facts = dict(
                caller_pidfds=pidfds(),
                worker_pidfds=pidfds(worker),
                template=template._template is not None,
                spawned_by_us=parent_of(worker) == os.getpid(),
                served=got == [[f"r{{i}}"] for i in range(40)],
                count=col.count(),
            )
        report(**facts, pipes_left=sorted(set(pipes()) - set(before)))
        """
    )
    assert out["caller_pidfds"] == [] and out["worker_pidfds"] == []
    assert out["template"] is False and out["spawned_by_us"] is True
    assert out["served"] is True and out["count"] == 50
    assert out["pipes_left"] == []


def test_a_genuine_sigbus_is_contained_and_named(tmp_path: Path) -> None:
    """Pins: a real SIGBUS (a mapping whose file was truncated) kills only the worker; the
    caller gets WorkerCrashedError naming SIGBUS with the worker's fatal-signal log, and the
    next call is served by a fresh worker. Still no pidfd in the caller."""
    out = _portable(
        f"""
        import faults
        from safechroma import SafeClient, WorkerCrashedError

        with SafeClient({str(tmp_path / "db")!r}, validator=None) as client:
            first = client.stats().worker_pid
            try:
                client.run_in_worker(faults.sigbus)
                crash = None
            except WorkerCrashedError as exc:
                crash = dict(signal=exc.signal, exitcode=exc.exitcode, log="Bus error" in str(exc))
            alive = client.heartbeat() > 0
            report(
                crash=crash,
                alive=alive,
                fresh=client.stats().worker_pid not in (None, first),
                deaths=client.stats().deaths,
                pidfds=pidfds(),
            )
        """
    )
    assert out["crash"] == {"signal": "SIGBUS", "exitcode": -7, "log": True}
    assert out["alive"] is True and out["fresh"] is True
    assert out["deaths"] == {"SIGBUS": 1}
    assert out["pidfds"] == []


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("portable") / "db"
    info = chroma_dirs.make_collection_dir(str(root), n=300, dim=8, sync_threshold=100)
    return str(root), info["spec"]


def test_a_corrupt_index_is_survived_and_repaired(
    healthy: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Pins: an index that makes Chroma segfault is found and repaired before the first worker,
    and one broken under a live worker (then SIGKILLed, seen through the sentinel) is repaired
    before the respawn; every record is then intact, read back by chromadb itself."""
    import shutil

    before, during = tmp_path / "before", tmp_path / "during"
    shutil.copytree(healthy[0], before)
    shutil.copytree(healthy[0], during)
    out = _portable(
        f"""
        import os, signal
        import chroma_dirs
        from safechroma import SafeClient
        from safechroma._demo import _break_level0

        ids = chroma_dirs.record_ids("coll", 300)
        vecs = chroma_dirs.vectors("coll", 300, 8)
        _break_level0(chroma_dirs.segment_dir({str(before)!r}))
        events = []
        with SafeClient({str(before)!r}, on_event=events.append) as client:
            col = client.get_collection("coll", embedding_function=None)
            hits = [h[0] for h in col.query(query_embeddings=vecs, n_results=1)["ids"]]
            first = dict(kinds=[e.kind for e in events][:3], found=hits == ids,
                         deaths=client.stats().deaths)
        events = []
        with SafeClient({str(during)!r}, on_event=events.append) as client:
            col = client.get_collection("coll", embedding_function=None)
            counted = col.count()
            _break_level0(chroma_dirs.segment_dir({str(during)!r}))
            os.kill(client.stats().worker_pid, signal.SIGKILL)
            hits = [h[0] for h in col.query(query_embeddings=vecs[:5], n_results=1)["ids"]]
            second = dict(
                counted=counted,
                found=hits == ids[:5],
                reasons=[e.detail["reason"] for e in events if e.kind == "validated"],
                recovered=any(e.kind == "recovered" for e in events),
            )
        report(first=first, second=second, pidfds=pidfds())
        """
    )
    assert out["first"] == {
        "kinds": ["validated", "recovered", "worker_started"],
        "found": True,
        "deaths": {},
    }
    assert out["second"] == {
        "counted": 300,
        "found": True,
        "reasons": ["start", "crash"],
        "recovered": True,
    }
    assert out["pidfds"] == []
    for path in (before, during):
        verified = chroma_dirs.verify_dir(str(path), healthy[1])["coll"]
        assert verified.get("count") == 300, verified
        assert verified["missing"] == [] and verified["bad_document"] == []
        assert verified["wrong_vector"] == []


def test_a_second_process_attaches_through_the_sentinel(tmp_path: Path) -> None:
    """Pins the shared worker in portable mode: a second process attaches to the worker the
    first started, watches it through the sentinel pipe it received over SCM_RIGHTS (no pidfd),
    sees it die under its own call with the signal named (the starter recorded the status),
    and starts the next worker, which the first process then uses."""
    db = str(tmp_path / "db")
    second = textwrap.dedent(
        f"""
        import faults
        from safechroma import SafeClient, WorkerCrashedError

        with SafeClient({db!r}) as client:
            col = client.get_collection("col", embedding_function=None)
            count = col.count()
            worker = client._sup.worker
            watch = os.readlink(f"/proc/self/fd/{{worker.proc.watch}}")
            attached = dict(count=count, pid=worker.pid, watch=watch, pidfds=pidfds())
            try:
                client.run_in_worker(faults.sigkill)
                crash = None
            except WorkerCrashedError as exc:
                crash = exc.signal
            col.add(ids=["late"], embeddings=[[9.0, 9.0]])
            report(**attached, crash=crash, next=client.stats().worker_pid)
        """
    )
    out = _portable(
        f"""
        import subprocess
        from safechroma import SafeClient

        with SafeClient({db!r}) as client:
            col = client.create_collection("col", embedding_function=None)
            col.add(ids=["a", "b"], embeddings=[[1.0, 2.0], [3.0, 4.0]])
            first = client.stats().worker_pid
            child = subprocess.run(
                [sys.executable, "-c", {PRELUDE!r} + {second!r}],
                capture_output=True, text=True, timeout=300,
            )
            assert child.returncode == 0, child.stderr[-4000:]
            theirs = json.loads(child.stdout.strip().splitlines()[-1])
            report(
                first=first,
                theirs=theirs,
                ids=sorted(col.get()["ids"]),
                now=client.stats().worker_pid,
                pidfds=pidfds(),
            )
        """
    )
    theirs = out["theirs"]
    assert theirs["count"] == 2 and theirs["pid"] == out["first"]
    assert theirs["watch"].startswith("pipe:") and theirs["pidfds"] == []
    assert theirs["crash"] == "SIGKILL"
    assert out["ids"] == ["a", "b", "late"]
    assert out["now"] not in (None, out["first"])
    assert out["pidfds"] == []


# Waits (bounded) for the process's spare worker of ``client``; None if none came.
_SPARE = """
import time

def live(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def spare_of(client, within=120.0):
    give_up = time.monotonic() + within
    while client._sup.standby is None and time.monotonic() < give_up:
        time.sleep(0.05)
    spare = client._sup.standby
    return None if spare is None else spare.pid
"""


def test_a_shared_directory_keeps_a_warm_standby_that_takes_over(tmp_path: Path) -> None:
    """Pins issue 23's "spawn with a warm standby" for a shared directory (the default): where
    workers are spawned, the process that started the directory's worker keeps a spare; when
    the worker is SIGKILLed, the spare becomes the next worker (handed the directory lock, so
    another process attaches to it), the read is retried on it with nothing lost, a new spare
    follows, and close leaves no process."""
    db = str(tmp_path / "db")
    out = _portable(
        _SPARE
        + textwrap.dedent(
            f"""
        import signal, subprocess
        from safechroma import SafeClient

        client = SafeClient({db!r})
        col = client.create_collection("col", embedding_function=None)
        col.add(ids=["a", "b"], embeddings=[[1.0, 2.0], [3.0, 4.0]])
        first, spare = client.stats().worker_pid, spare_of(client)
        os.kill(first, signal.SIGKILL)
        count = col.count()
        after = client.stats().worker_pid
        other = subprocess.run(
            [sys.executable, "-c",
             "from safechroma import SafeClient\\n"
             f"c = SafeClient({db!r}); c.heartbeat(); print(c.stats().worker_pid); c.close()"],
            capture_output=True, text=True, timeout=300,
        )
        assert other.returncode == 0, other.stderr[-4000:]
        next_spare = spare_of(client)
        client.close()
        report(first=first, spare=spare, count=count, after=after,
               other=int(other.stdout.split()[-1]), next_spare=next_spare,
               left=[p for p in (spare, after, next_spare) if p and live(p)])
        """
        )
    )
    assert out["spare"] is not None and out["spare"] != out["first"]
    assert out["after"] == out["spare"], "the spare did not become the worker"
    assert out["count"] == 2
    assert out["other"] == out["spare"], "another process could not attach to the promoted spare"
    assert out["next_spare"] not in (None, out["spare"])
    assert out["left"] == []


def test_a_spare_whose_process_vanished_leaves_the_shared_worker_alone(tmp_path: Path) -> None:
    """Pins: a spare is never the directory's worker until promoted. When the process holding
    it is SIGKILLed, the spare exits without touching the rendezvous socket of the live worker,
    which the other process keeps using and a third one still attaches to."""
    db = str(tmp_path / "db")
    holder = _SPARE + textwrap.dedent(
        f"""
        from safechroma import SafeClient

        client = SafeClient({db!r})
        client.get_or_create_collection("col", embedding_function=None).add(
            ids=["a"], embeddings=[[1.0, 2.0]])
        print(client.stats().worker_pid, spare_of(client), flush=True)
        time.sleep(600)
        """
    )
    out = _portable(
        f"""
        import subprocess, time
        from safechroma import SafeClient

        starter = subprocess.Popen([sys.executable, "-c", {PRELUDE!r} + {holder!r}],
                                   stdout=subprocess.PIPE, text=True)
        worker, spare = (int(x) for x in starter.stdout.readline().split())
        client = SafeClient({db!r})
        col = client.get_collection("col", embedding_function=None)
        attached = client.stats().worker_pid
        address = client._sup.address
        starter.kill()
        starter.wait()
        give_up = time.monotonic() + 60
        while os.path.exists(f"/proc/{{spare}}") and time.monotonic() < give_up:
            time.sleep(0.05)  # not our child: gone from /proc once its own parent reaped it
        spare_gone = not os.path.exists(f"/proc/{{spare}}")
        col.add(ids=["b"], embeddings=[[3.0, 4.0]])
        third = subprocess.run(
            [sys.executable, "-c",
             "from safechroma import SafeClient\\n"
             f"c = SafeClient({db!r}); print(c.stats().worker_pid, "
             "c.get_collection('col', embedding_function=None).count()); c.close()"],
            capture_output=True, text=True, timeout=300,
        )
        assert third.returncode == 0, third.stderr[-4000:]
        report(worker=worker, attached=attached, spare_gone=spare_gone,
               socket=os.path.exists(address), now=client.stats().worker_pid,
               third=third.stdout.split())
        client.close()
        """
    )
    assert out["attached"] == out["worker"] and out["spare_gone"]
    assert out["socket"], "the vanished process's spare removed the live worker's socket"
    assert out["now"] == out["worker"]
    assert out["third"] == [str(out["worker"]), "2"]


@pytest.mark.slow
def test_a_sigkill_storm_under_concurrent_writers_loses_no_acknowledged_write(
    tmp_path: Path,
) -> None:
    """Pins, in portable mode, the chaos soak's guarantee (tests/chaos.py) under SIGKILLs
    alone: every acknowledged write present exactly once with its document, metadata and
    vector, no read contradicting the ledger, the client serving after the last kill."""
    out = _portable(
        f"""
        from chaos import SoakConfig, run_soak

        cfg = SoakConfig(seconds=20, threads=4, faults=("SIGKILL",), seed=23)
        rep = run_soak({str(tmp_path / "db")!r}, cfg)
        report(
            problems=rep.problems,
            contradictions=rep.contradictions,
            lost=rep.records_lost,
            checked=rep.records_checked,
            kills=sum(rep.faults_injected.values()),
            deaths=sum(rep.deaths.values()),
            served_after=rep.served_after_last_fault,
            pidfds=pidfds(),
        )
        """,
        timeout=900,
    )
    assert out["problems"] == [] and out["contradictions"] == []
    assert out["lost"] == 0 and out["checked"] == 4 * 120
    assert out["kills"] >= 3 and out["deaths"] >= 3 and out["served_after"] is True
    assert out["pidfds"] == []


def test_the_rss_watchdog_ends_a_runaway_worker(tmp_path: Path) -> None:
    """Pins the portable memory ceiling: no RLIMIT_AS (macOS rejects it), so a worker whose
    resident memory passes ``memory_limit`` ends itself, saying why in the log the crash error
    carries; the next call gets a fresh worker."""
    out = _portable(
        f"""
        import resource
        from safechroma import SafeClient, WorkerCrashedError

        def grow(_client):
            chunks = []
            while True:  # 32 MiB at a time, each byte written: resident, not just reserved
                chunks.append(b"x" * (32 << 20))

        def address_limit(_client):
            return resource.getrlimit(resource.RLIMIT_AS)[0]

        with SafeClient({str(tmp_path / "db")!r}, validator=None, memory_limit=1 << 30) as client:
            unlimited = client.run_in_worker(address_limit) == resource.RLIM_INFINITY
            try:
                client.run_in_worker(grow)
                crash = None
            except WorkerCrashedError as exc:
                crash = dict(signal=exc.signal, said="passed memory_limit" in str(exc))
            report(unlimited=unlimited, crash=crash, alive=client.heartbeat() > 0)
        """
    )
    assert out["unlimited"] is True
    assert out["crash"] == {"signal": "SIGKILL", "said": True}
    assert out["alive"] is True


def test_import_works_and_safeclient_names_what_works_without_posix() -> None:
    """Pins issue 23's Windows floor, as far as Linux can show it: with every POSIX-only module
    and name the runtime uses taken away (fcntl, resource, os.register_at_fork, os.fork,
    pidfds, AF_UNIX and descriptor passing, select.poll, SIGKILL) and ``sys.platform`` set to
    win32, ``import safechroma`` and its runtime work, and ``SafeClient(...)`` raises the one
    UnsupportedPlatformError naming SafeHttpClient and ``safechroma serve``. (A simulation:
    the modules a real Windows has, subprocess and chromadb among them, are imported first;
    mypy --platform win32 checks the rest of the code.)"""
    script = """
        import os, select, signal, socket, sys, types
        import asyncio, logging, subprocess, sysconfig, tempfile  # real on Windows too
        import chromadb, chromadb.api.models.Collection, numpy

        sys.platform = "win32"
        for name in ("fcntl", "resource", "termios", "grp", "pwd"):
            sys.modules[name] = None  # importing it raises ImportError
        sys.modules["_winapi"] = types.ModuleType("_winapi")
        sys.modules["msvcrt"] = types.ModuleType("msvcrt")
        gone = {
            os: ["register_at_fork", "fork", "pidfd_open", "getuid", "pwrite", "pipe2"],
            socket: ["AF_UNIX", "send_fds", "recv_fds", "SO_PEERCRED"],
            select: ["poll", "POLLIN", "POLLOUT"],
            signal: ["SIGKILL", "SIGXFSZ", "SIGBUS", "pidfd_send_signal"],
        }
        for module, names in gone.items():
            for name in names:
                if hasattr(module, name):
                    delattr(module, name)

        import safechroma
        import safechroma.runtime.session, safechroma.runtime.supervisor
        from safechroma.runtime import platform, template, transport, worker

        errors = []
        for exclusive in (False, True):
            try:
                safechroma.SafeClient(sys.argv[1], exclusive=exclusive)
            except safechroma.SafeChromaError as exc:
                errors.append([type(exc).__name__, str(exc)])
        print(json.dumps(dict(errors=errors, template=template.warm() is None)))
        """
    proc = subprocess.run(
        [sys.executable, "-c", "import json\n" + textwrap.dedent(script), "/nonexistent/db"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["template"] is True
    assert [kind for kind, _ in out["errors"]] == ["UnsupportedPlatformError"] * 2
    for _, message in out["errors"]:
        assert "SafeHttpClient" in message and "safechroma serve" in message


# -- the portable mechanisms one by one, in this process (they work on Linux in any mode) ----


def test_a_sentinel_pipe_turns_readable_exactly_when_its_only_writer_exits() -> None:
    """Pins multiprocessing's sentinel idea as the seam uses it: the worker alone holds the
    write end (a grandchild it starts does not inherit it), so the caller's read end is quiet
    while the worker lives and readable once it has exited, whoever reaps it."""
    from safechroma.runtime.platform import posix

    sentinel = posix.PipeSentinel()
    assert sentinel.child_fd is not None
    # The child marks the write end non-inheritable, as the worker does, then starts a
    # grandchild that outlives it, asking it to inherit every inheritable descriptor. Before
    # the child is started the read end is quiet.
    code = (
        "import os, subprocess, sys; os.set_inheritable(int(sys.argv[1]), False); "
        "print(subprocess.Popen(['sleep', '60'], close_fds=False, start_new_session=True, "
        "stdout=subprocess.DEVNULL).pid)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(sentinel.child_fd)],
        pass_fds=[sentinel.child_fd],
        stdout=subprocess.PIPE,
        text=True,
    )
    watch = sentinel.started(child.pid)
    assert watch is not None and sentinel.child_fd is None
    grandchild = 0
    try:
        grandchild = int(child.communicate()[0])  # returns once the child has exited
        assert posix.exited(watch, 0)  # the grandchild lives on without the write end
        posix.kill(child.pid, watch)  # no-op: the sentinel says the pid is no longer ours
    finally:
        os.close(watch)
        if grandchild:
            os.kill(grandchild, signal.SIGKILL)


def test_the_peer_check_and_the_lock_of_the_posix_column(tmp_path: Path) -> None:
    """Pins the pieces the rendezvous and the directory lock use: the peer of a Unix socket is
    this user; a second open file description cannot take a held lock; resident memory is
    readable (the RSS watchdog's input)."""
    import socket as socket_module

    from safechroma.runtime.platform import posix

    a, b = socket_module.socketpair()
    try:
        assert posix.peer_uid(a) == os.getuid()
    finally:
        a.close()
        b.close()
    path = str(tmp_path / "lock")
    first = os.open(path, os.O_RDWR | os.O_CREAT)
    second = os.open(path, os.O_RDWR)
    try:
        assert posix.try_lock(first) is True
        assert posix.try_lock(second) is False
        os.close(first)
        first = -1
        assert posix.try_lock(second) is True
    finally:
        for fd in (first, second):
            if fd >= 0:
                os.close(fd)
    rss = posix.self_rss()
    assert rss is not None and rss > 10 << 20
