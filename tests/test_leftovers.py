"""Nothing left behind: what dead workers leave in the rendezvous folder goes (issue 22).

Before: after 80 minutes of tests and benchmarks the per-user folder held 62 files, none of a
living process (sockets, .end/.served/.status markers, worker logs); 762 after 35 minutes of the
chroma-mcp tests.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
from crash_matrix import HOW

from safechroma import SafeClient
from safechroma.runtime import rendezvous


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A rendezvous folder of this test's own (a short path: a socket address is short)."""
    base = tempfile.mkdtemp(prefix="scrt-", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", base)
    yield os.path.join(base, f"safechroma-{os.getuid()}")
    shutil.rmtree(base, ignore_errors=True)


# The next process: it starts a worker, and looks at the folder while that worker lives.
LOOK = """
import json, os, sys, time
from safechroma import SafeClient
from safechroma.runtime import rendezvous

folder = sys.argv[2]
with SafeClient(sys.argv[1], validator=None) as client:
    client.heartbeat()
    time.sleep(1.0)  # the sweep runs in the background once a worker is started
    worker = client.stats().worker_pid
    held = rendezvous._open_files(folder)
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".log"):
            files[name] = path in held
        elif name.endswith(".sock"):
            files[name] = rendezvous._listened_on(path)
        else:
            files[name] = f".sock.{worker}." in name
print(json.dumps(files))
"""


# A program whose workers die in every way of the crash matrix (tests/crash_matrix.py, HOW: its
# names are argv[3]), each during a call, then once more by a SIGKILL from outside between calls,
# and which is then killed itself, so that no orderly close tidies up after it.
DEATHS = """
import json, os, signal, sys, time
from safechroma import SafeClient, WorkerError, call_timeout
sys.path.insert(0, sys.argv[2])
import faults

client = SafeClient(sys.argv[1], validator=None)
client.heartbeat()
for how in json.loads(sys.argv[3]):
    try:
        with call_timeout(1.0 if how == "hang" else None):
            client.run_in_worker(faults.FAULTS[how])
    except WorkerError:
        pass
    client.heartbeat()  # served: the breaker sees progress
os.kill(client.stats().worker_pid, signal.SIGKILL)
time.sleep(0.2)
client.heartbeat()
print(json.dumps(client.stats().deaths), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_every_kind_of_death_leaves_nothing_for_the_next_process(db: str, runtime_dir: str) -> None:
    """Workers killed in every way of the crash matrix leave files; the next process to start a
    worker finds the folder holding only the living (its own worker's files)."""
    env = {**os.environ, "XDG_RUNTIME_DIR": os.path.dirname(runtime_dir)}
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", DEATHS, db, tests, json.dumps(list(HOW))],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    deaths = json.loads(out.stdout)
    # Each way of the table once, and the kill from outside: SIGKILL twice.
    expected = collections.Counter(how.death for how in HOW.values())
    expected["SIGKILL"] += 1
    assert deaths == dict(expected), deaths
    time.sleep(1.0)  # its last worker leaves after the idle grace
    assert len(os.listdir(runtime_dir)) > 3, os.listdir(runtime_dir)  # it did leave files
    time.sleep(rendezvous.SWEEP_AGE + 0.5)
    out = subprocess.run(
        [sys.executable, "-c", LOOK, db, runtime_dir],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    files = json.loads(out.stdout)
    # What the next process saw while its worker lived: that worker's files, nothing else.
    assert files and all(files.values()), files
    assert len(files) <= 4, files  # its socket, its log, its markers (served; status later)


def test_the_sweep_leaves_what_the_living_use(runtime_dir: str, db: str) -> None:
    with SafeClient(db, validator=None) as client:
        client.heartbeat()
        before = sorted(os.listdir(runtime_dir))
        assert rendezvous.sweep(runtime_dir, now=time.time() + 3600) == []
        assert sorted(os.listdir(runtime_dir)) == before
        assert client.heartbeat() > 0
