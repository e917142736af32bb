"""Many processes, one directory: every process of the user shares the directory's one worker.

Real processes throughout: programs started with ``subprocess``, killed with SIGKILL, a worker
killed under them, a process of another user. What each test pins is in its docstring.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import lock_is_free

from safechroma import DirectoryLockedError, SafeClient
from safechroma.runtime import rendezvous
from safechroma.runtime.lock import LOCK_NAME

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
PY = sys.executable


def _run(script: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, "-c", f"import sys; sys.path.insert(0, {str(SRC)!r})\n" + script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    give_up = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < give_up, f"process {pid} is still running"
        time.sleep(0.02)


def _writers_of(name: str) -> set[int]:
    """Processes that have a file called ``name`` open for writing, from /proc."""
    found: set[int] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").endswith(name):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    info = dict(line.split(":", 1) for line in f if ":" in line)
                flags = int(info["flags"].strip(), 8)
            except (OSError, ValueError, KeyError):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                found.add(int(pid))
    return found


_HOLDER = """
import sys, time
from safechroma import SafeClient
c = SafeClient({db!r})
c.get_or_create_collection("shared", embedding_function=None).upsert(
    ids=["{name}"], embeddings=[[1.0, 0.0]], documents=["{name}"])
print(c.stats().worker_pid, flush=True)
if {hold} < 0:
    sys.stdin.readline()  # held until the test says so: a start under load takes seconds
else:
    time.sleep({hold})
c.close()
print("closed", flush=True)
"""


def test_processes_share_one_worker_and_the_last_close_releases_the_directory(db: str) -> None:
    """Pins: a second and a third program on the directory attach to the first one's worker
    (same pid, each other's writes visible); this process attaches too; when the last one
    closes, the worker exits and the lock is free."""
    first = _run(_HOLDER.format(db=db, name="first", hold=-1), stdin=subprocess.PIPE)
    assert first.stdout is not None
    pid = int(first.stdout.readline())
    second = _run(_HOLDER.format(db=db, name="second", hold=1))
    assert second.stdout is not None
    assert int(second.stdout.readline()) == pid
    with SafeClient(db) as client:
        assert client.stats().worker_pid == pid
        col = client.get_collection("shared", embedding_function=None)
        assert sorted(col.get()["ids"]) == ["first", "second"]
        for p, release in ((first, "\n"), (second, None)):
            out, err = p.communicate(release, timeout=60)
            assert p.returncode == 0 and "closed" in out, err
        assert _alive(pid)  # this process still uses it
        assert col.count() == 2
    _wait_gone(pid, 5)
    assert lock_is_free(db)


def test_the_starting_process_killed_the_others_keep_the_worker(db: str) -> None:
    """Pins: SIGKILL of the process that started the worker: the others keep the same worker
    with no error at all; it exits when they close."""
    first = _run(_HOLDER.format(db=db, name="first", hold=60))
    assert first.stdout is not None
    pid = int(first.stdout.readline())
    with SafeClient(db) as client:
        col = client.get_collection("shared", embedding_function=None)
        first.kill()
        first.communicate()
        for i in range(20):
            col.upsert(ids=[f"after-{i}"], embeddings=[[0.0, 1.0]], documents=[f"after {i}"])
            time.sleep(0.01)
        assert client.stats().worker_pid == pid
        assert client.stats().deaths == {}
        assert col.count() == 21
    _wait_gone(pid, 5)
    assert lock_is_free(db)


def test_exclusive_keeps_other_processes_out(db: str) -> None:
    """Pins: exclusive=True is the old contract: another process (sharing or not) gets
    DirectoryLockedError at once, and nothing of the directory is shared."""
    with SafeClient(db, exclusive=True) as client:
        other = _run(
            "from safechroma import SafeClient, DirectoryLockedError\n"
            f"try:\n    SafeClient({db!r})\nexcept DirectoryLockedError as e:\n"
            "    print('LOCKED', e)\n"
        )
        out, err = other.communicate(timeout=60)
        assert out.startswith("LOCKED") and "does not share it" in out, err
        assert client.heartbeat() > 0
        assert rendezvous.announced(os.path.join(db, LOCK_NAME)) is None


def test_a_client_of_another_version_is_refused_naming_both(db: str) -> None:
    """Pins: a process whose safechroma version differs from the worker's gets
    IncompatibleWorkerError naming both versions, and starts no Chroma of its own."""
    with SafeClient(db) as client:
        pid = client.stats().worker_pid
        other = _run(
            "import safechroma\n"
            "safechroma.__version__ = '0.0.0+other'\n"
            "from safechroma import SafeClient, IncompatibleWorkerError\n"
            f"try:\n    SafeClient({db!r})\nexcept IncompatibleWorkerError as e:\n"
            "    print('REFUSED', e)\n"
        )
        out, err = other.communicate(timeout=60)
        assert out.startswith("REFUSED"), err
        assert "0.0.0+other" in out and safechroma_version() in out
        assert client.stats().worker_pid == pid and client.heartbeat() > 0
        assert _writers_of(os.path.realpath(os.path.join(db, "chroma.sqlite3"))) <= {pid}


def safechroma_version() -> str:
    import safechroma

    return safechroma.__version__


# -- the check: three processes, the first one and then the worker killed ----------

_MEMBER = """
import json, os, sys, time, random
import safechroma
from safechroma import SafeClient, WorkerCrashedError

name, db, stop = sys.argv[1], sys.argv[2], sys.argv[3]
def event(e):
    print(json.dumps({{"event": e.kind, "pid": e.pid}}), flush=True)
client = SafeClient(db, on_event=event)
col = client.get_or_create_collection("members", embedding_function=None)
print(json.dumps({{"ready": client.stats().worker_pid}}), flush=True)
rng = random.Random(name)
acked, unknown, wrong, errors = [], [], 0, []
i = 0
while not os.path.exists(stop):
    rid = f"{{name}}-{{i}}"
    try:
        col.upsert(ids=[rid], embeddings=[[float(i), 1.0, 0.0]], documents=[f"doc of {{rid}}"])
        acked.append(rid)
    except WorkerCrashedError as exc:
        if not exc.outcome_unknown:
            errors.append(repr(exc))
        unknown.append(rid)
    i += 1
    if acked:
        probe = rng.choice(acked)
        try:
            got = col.get(ids=[probe], include=["documents"])
            if got["documents"] != [f"doc of {{probe}}"]:
                wrong += 1
        except Exception as exc:
            errors.append(repr(exc))
print(json.dumps({{"acked": acked, "unknown": unknown, "wrong": wrong, "errors": errors,
                  "stats": str(client.stats().deaths)}}), flush=True)
client.close()
"""


def _member(name: str, db: str, stop: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, "-c", f"import sys; sys.path.insert(0, {str(SRC)!r})\n" + _MEMBER.format()]
        + [name, db, stop],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ready(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "exited"
        msg = json.loads(line)
        if "ready" in msg:
            return int(msg["ready"])


@pytest.mark.slow
def test_three_processes_through_a_killed_starter_and_two_killed_workers(db: str) -> None:
    """The issue's check. Three programs write and read one directory at once; the first one
    (which started the worker) is SIGKILLed, then the worker twice. The survivors finish with no
    error but a write's outcome_unknown; every acknowledged write is there with its document;
    no read returned a wrong document; each death was validated once for the directory (3
    validations and 3 workers over all processes, counting the first start); at no instant
    did two processes have chroma.sqlite3 open for writing; nothing runs after they close."""
    sqlite = os.path.realpath(os.path.join(db, "chroma.sqlite3"))
    stop_file = os.path.join(os.path.dirname(db), "stop")
    first = _member("a", db, stop_file)
    worker = _ready(first)
    others = [_member(n, db, stop_file) for n in ("b", "c")]
    assert [_ready(p) for p in others] == [worker, worker]

    writers_seen: list[set[int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            writers_seen.append(_writers_of(sqlite))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        time.sleep(1.0)
        first.kill()  # the process that started the worker
        first.communicate()
        time.sleep(1.5)
        workers = [worker]
        # A member process may write chroma.sqlite3 too, holding the lock with no worker
        # running: its hook runner plays back the hot journal a killed worker left.
        members = {first.pid, *(p.pid for p in others)}
        for _ in range(2):
            os.kill(workers[-1], signal.SIGKILL)
            _wait_gone(workers[-1])
            give_up = time.monotonic() + 10
            while True:
                now = _writers_of(sqlite) - {workers[-1]} - members
                if now:
                    workers.append(now.pop())
                    break
                assert time.monotonic() < give_up, "no new worker"
                time.sleep(0.01)
            time.sleep(1.5)
        Path(stop_file).touch()
        results = []
        events: list[dict[str, object]] = []
        for p in others:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-3000:]
            lines = [json.loads(ln) for ln in out.splitlines()]
            events += [ln for ln in lines if "event" in ln]
            results.append(next(ln for ln in lines if "acked" in ln))
    finally:
        stop.set()
        sampler.join()
        for p in [first, *others]:
            if p.poll() is None:
                p.kill()
                p.communicate()
    # The killed starter's events before its death are in its captured output too.
    for r in results:
        assert r["errors"] == [] and r["wrong"] == 0, r
    assert max(len(w) for w in writers_seen) == 1, "two processes had chroma.sqlite3 open"
    assert len(set(workers)) == 3
    with SafeClient(db, validator=None) as client:
        col = client.get_collection("members", embedding_function=None)
        for r in results:
            acked = r["acked"]
            assert len(acked) > 20, r
            got = col.get(ids=acked, include=["documents"])
            docs = dict(zip(got["ids"], got["documents"], strict=True))
            assert docs == {rid: f"doc of {rid}" for rid in acked}
    # One death, one cycle: the survivors started at most the two replacements between them
    # and validated exactly as often (the first worker and its validation were a's).
    started = [e for e in events if e["event"] == "worker_started"]
    validated = [e for e in events if e["event"] == "validated"]
    assert len(started) == 2 and len(validated) == 2, events
    for pid in workers:
        _wait_gone(pid, 5)
    assert lock_is_free(db)


# -- only the same user ----------------------------------------------------------------------

_FOREIGN = """
import os, socket, json
from safechroma import SafeClient, DirectoryLockedError
import safechroma.runtime.supervisor, safechroma.runtime.rendezvous as rv
import safechroma.runtime.transport, safechroma.storage.wal, chromadb.api.models.Collection
address = {address!r}
os.setgid(65534)
os.setuid(65534)
try:
    SafeClient({db!r})
    print("ATTACHED")
except DirectoryLockedError as e:
    print("REFUSED", e)
except PermissionError as e:
    print("REFUSED", e)
# The second wall: a raw connection that gets past the file permissions is closed unanswered.
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(address)
    rv.send_json(s, {{**rv.versions(), "kind": "channel", "pid": os.getpid()}})
    print("RAW", repr(s.recv(100)))
except OSError as e:
    print("RAW", type(e).__name__)
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another user")
def test_a_process_of_another_user_cannot_attach(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins: a process of another user (here root's worker, `nobody`'s client) cannot attach:
    the directory is world-writable, so only safechroma stands between it and a second Chroma;
    it gets DirectoryLockedError naming the other user, and even with the rendezvous socket
    made reachable, the worker closes its connection unanswered (SO_PEERCRED)."""
    base = tempfile.mkdtemp(prefix="shared-user-", dir="/tmp")
    db = os.path.join(base, "db")
    # This user's rendezvous folder for this test alone: the test opens its walls below.
    runtime = os.path.join(base, "run")
    os.mkdir(runtime, 0o711)
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    try:
        os.chmod(base, 0o777)
        with SafeClient(db) as client:
            client.create_collection("mine", embedding_function=None).add(
                ids=["x"], embeddings=[[1.0]]
            )
            for root, dirs, files in os.walk(db):
                for n in dirs:
                    os.chmod(os.path.join(root, n), 0o777)
                for n in files:
                    os.chmod(os.path.join(root, n), 0o666)
            os.chmod(db, 0o777)
            pid = client.stats().worker_pid
            address = rendezvous.announced(os.path.join(db, LOCK_NAME))
            assert address is not None
            script = _FOREIGN.format(db=db, address=address)
            denied = _run(script)
            out, err = denied.communicate(timeout=60)
            assert out.startswith("REFUSED"), err
            assert "RAW PermissionError" in out, out
            # Open the walls: the folder and the socket reachable; the peer check remains.
            os.chmod(os.path.dirname(address), 0o755)
            os.chmod(address, 0o777)
            try:
                exposed = _run(script)
                out, err = exposed.communicate(timeout=60)
            finally:
                os.chmod(os.path.dirname(address), 0o700)
                os.chmod(address, 0o600)
            assert out.startswith("REFUSED") and "user 0" in out, out + err
            # Closed unanswered: end of file, or a reset since our hello was left unread, or
            # a broken pipe when the worker closed before our hello was written.
            assert any(
                f"RAW {how}" in out for how in ("b''", "ConnectionResetError", "BrokenPipeError")
            ), out
            assert _writers_of(os.path.realpath(os.path.join(db, "chroma.sqlite3"))) == {pid}
            assert client.heartbeat() > 0
    finally:
        subprocess.run(["rm", "-rf", base], check=False)


def test_socket_folder_is_private() -> None:
    folder = rendezvous.socket_folder()
    st = os.stat(folder)
    assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another user")
def test_the_rendezvous_refuses_a_socket_of_another_user() -> None:
    """Pins: a client checks who listens before it sends anything: a socket served by another
    user's process is refused (here a listener in a child running as nobody)."""
    base = tempfile.mkdtemp(prefix="stranger-", dir="/tmp")
    os.chmod(base, 0o777)
    address = os.path.join(base, "stranger.sock")
    listener = _run(
        "import os, socket, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "os.setgid(65534); os.setuid(65534)\n"
        f"s.bind({address!r}); os.chmod({address!r}, 0o777); s.listen(1)\n"
        "print('up', flush=True)\n"
        "c, _ = s.accept(); print('got', repr(c.recv(10)), flush=True)\n"
    )
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == "up"
    with pytest.raises(DirectoryLockedError) as info:
        rendezvous.connect(address, "/some/db", "session", "/some/db/.safechroma.lock")
    assert "user 65534" in str(info.value)
    out, _err = listener.communicate(timeout=30)
    subprocess.run(["rm", "-rf", base], check=False)
    assert "got b''" in out  # it connected, then hung up without sending a byte
