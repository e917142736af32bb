"""The directory lock (runtime/lock.py, rendezvous.try_lock/take_lock/write_lock_file and the
platform's ``try_lock``) between real processes.

A child Python process takes the lock the way each face does (``DirectoryLock`` for a client,
``take_lock`` + ``write_lock_file`` for a repair or ``safechroma serve``) and holds it until told
to let go or until it is killed: the lock is exclusive between processes, it goes with its
holder's death (SIGKILL, no cleanup), and the lock file names the holder in the error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from safechroma import DirectoryLockedError
from safechroma.runtime import platform, rendezvous
from safechroma.runtime.lock import LOCK_NAME, DirectoryLock, being_shared, locked_error

# The holder: takes the lock as asked, says so on stdout, then holds it until stdin closes.
HOLDER = """
import os, sys
from safechroma.runtime.lock import DirectoryLock, LOCK_NAME
from safechroma.runtime import rendezvous

path, how, text = sys.argv[1], sys.argv[2], sys.argv[3]
if how == "client":
    lock = DirectoryLock(path, 0)
else:
    os.makedirs(path, exist_ok=True)
    fd = rendezvous.take_lock(path, os.path.join(path, LOCK_NAME))
    assert fd is not None
    rendezvous.write_lock_file(fd, text.replace("PID", str(os.getpid())))
print("held", flush=True)
sys.stdin.read()
"""


class Holder:
    """A child process holding the lock of ``path``."""

    def __init__(self, path: str, how: str = "client", text: str = "") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, path, how, text],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "held\n"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def folder(tmp_path: Path) -> str:
    return str(tmp_path / "db")


@pytest.fixture
def holder(folder: str) -> Iterator[Holder]:
    h = Holder(folder)
    yield h
    h.close()


def test_the_lock_is_exclusive_between_processes(folder: str, holder: Holder) -> None:
    lock_path = os.path.join(folder, LOCK_NAME)
    with pytest.raises(DirectoryLockedError) as info:
        DirectoryLock(folder, 0)
    assert info.value.path == folder and info.value.lock_path == lock_path
    assert f"an exclusive client or a repair, pid {holder.pid}" in str(info.value)
    assert rendezvous.try_lock(lock_path) is None  # the no-wait probe agrees
    assert rendezvous.take_lock(folder, lock_path) is None
    fd = os.open(lock_path, os.O_RDWR)
    try:
        assert platform.try_lock(fd) is False
    finally:
        os.close(fd)


def test_the_lock_file_names_its_holder(folder: str, holder: Holder) -> None:
    """A client's lock file holds its pid and nothing else: not shared, not served."""
    lock_path = os.path.join(folder, LOCK_NAME)
    assert Path(lock_path).read_text() == f"{holder.pid}\n"
    assert not being_shared(lock_path)
    assert rendezvous.announced(lock_path) is None


def test_the_lock_goes_with_its_holders_death(folder: str, holder: Holder) -> None:
    """SIGKILL runs no cleanup: the kernel drops the flock with the process's last descriptor."""
    holder.kill()
    lock = DirectoryLock(folder, 0)
    try:
        assert Path(lock.lock_path).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
    assert lock.fd is None


def test_a_waiting_lock_is_taken_once_the_holder_dies(folder: str, holder: Holder) -> None:
    """``timeout`` > 0: the caller waits, and gets the lock once the holder is killed."""
    got: list[DirectoryLock | BaseException] = []

    def take() -> None:
        try:
            got.append(DirectoryLock(folder, 30))
        except BaseException as exc:  # noqa: BLE001 - reported below
            got.append(exc)

    taker = threading.Thread(target=take)
    taker.start()
    assert got == []  # still waiting: the holder lives
    holder.kill()
    taker.join(30)
    (lock,) = got
    assert isinstance(lock, DirectoryLock), lock
    lock.release()


def test_release_lets_another_process_take_it(folder: str) -> None:
    lock = DirectoryLock(folder, 0)
    lock.release()
    lock.release()  # twice is harmless
    h = Holder(folder)
    try:
        assert Path(folder, LOCK_NAME).read_text() == f"{h.pid}\n"
    finally:
        h.close()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("PID\nrepair\n", "(`safechroma repair`, pid {pid};"),
        ("PID\nrelease\n", "(`safechroma release`, pid {pid};"),
        ("PID\nserve http://127.0.0.1:8123\n", "served by `safechroma serve` at "),
    ],
    ids=["repair", "release", "serve"],
)
def test_each_face_names_itself_in_the_lock_file(folder: str, text: str, says: str) -> None:
    """Pins the repair bug of issue 22: the lock file names the process that holds the lock
    now (a repair, a release, a server), not an old shared worker, and a client that finds it
    held gets DirectoryLockedError at once saying who holds it."""
    h = Holder(folder, "take", text)
    try:
        lock_path = os.path.join(folder, LOCK_NAME)
        assert Path(lock_path).read_text() == text.replace("PID", str(h.pid))
        with pytest.raises(DirectoryLockedError) as info:
            DirectoryLock(folder, 0)
        assert says.format(pid=h.pid) in str(info.value)
        if "serve" in text:
            assert info.value.address == "http://127.0.0.1:8123"  # type: ignore[attr-defined]
            assert f"(pid {h.pid})" in str(info.value)
        assert not being_shared(lock_path)
    finally:
        h.close()


def test_write_lock_file_replaces_a_longer_text(tmp_path: Path) -> None:
    """The new text is written over the old, then the file is cut to it: no old tail stays."""
    path = tmp_path / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        rendezvous.write_lock_file(fd, "123\nshare /tmp/some/long/address.sock\n")
        assert rendezvous.announced(str(path)) == "/tmp/some/long/address.sock"
        assert being_shared(str(path))
        rendezvous.write_lock_file(fd, "456\nrepair\n")
        assert path.read_text() == "456\nrepair\n"
        assert rendezvous.announced(str(path)) is None and not being_shared(str(path))
    finally:
        os.close(fd)


def test_a_lock_file_not_yet_written_counts_as_being_shared(tmp_path: Path) -> None:
    """Its holder has only just taken it: worth waiting for, not a reason to fail."""
    path = tmp_path / "lock"
    path.write_text("")
    assert being_shared(str(path))
    assert not being_shared(str(tmp_path / "missing"))
    error = locked_error(str(tmp_path), str(tmp_path / "missing"))
    assert "(an exclusive client or a repair; it holds" in str(error)  # no pid to name


def test_the_platform_lock_is_per_open_file_not_per_process(tmp_path: Path) -> None:
    """``flock`` belongs to an open file description: a second open of the lock file in the
    same process is refused like another process would be, and closing the holder's descriptor
    (what the kernel does for a dead process) frees it."""
    path = str(tmp_path / LOCK_NAME)
    first = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    second = os.open(path, os.O_RDWR)
    try:
        assert platform.try_lock(first) is True
        assert platform.try_lock(second) is False
        assert rendezvous.try_lock(path) is None
        os.close(first)
        first = -1
        assert platform.try_lock(second) is True
    finally:
        for fd in (first, second):
            if fd >= 0:
                os.close(fd)
