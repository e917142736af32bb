"""``safechroma serve``: Chroma's own server (``chroma run``) on one directory, supervised.

Chroma's server is one crash domain: a query on one damaged collection kills it with SIGSEGV,
and a restart loop (Docker, systemd) restarts it into the same crash forever. Its heartbeat
never touches storage, it takes no lock on the directory, it drains in-flight requests on
SIGTERM with no deadline, and "port in use" exits 0 (CHROMA_FACTS.md section 6). A
:class:`Server` runs the unmodified server from the installed chromadb as a child process and
adds what is missing:

- the directory lock (``<path>/.safechroma.lock``, the library's own flock) for its whole life,
  with the served address written into the lock file, so a ``SafeClient`` opened meanwhile is
  told where to connect instead; the locked descriptor is inherited by the child too;
- validation, and repair on damage, with the library's hooks before the first start and
  before every restart; pending salvage is written back before Chroma opens the directory;
- a restart after every death, with backoff, and the crash-loop breaker that gives up;
- a health watchdog that reads data (a timed ``count`` of every collection), with a start-up
  grace period and a failure budget;
- a bounded stop: SIGTERM, ``stop_grace`` seconds, then SIGKILL;
- an explicit YAML config written here, and a child environment without ``CHROMA_*``
  variables, so nothing inherited changes what is served.

States, as the main loop sees its child (:class:`State`, ``Server.state``)::

    CHECKING   no child: validating, repairing, writing back salvage (the lock is held)
    STARTING   spawned; waiting for its heartbeat and its listening socket
    SERVING    answering; the watchdog probes it
    STOPPING   SIGTERM sent, waiting up to the grace period, then SIGKILL
    STOPPED    no child, the lock released: run() has returned or raised

All process management happens in the thread that calls :meth:`Server.run` (the child's
parent-death signal is tied to it); the watchdog thread only probes and reports. This module
never prints: it reports :class:`safechroma.Event` objects to ``on_event`` and to the
``safechroma.serve`` logger; ``safechroma.cli`` turns them into lines.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import httpx
import tenacity

from .._env import private_env
from .._errors import CrashLoopError, DirectoryLockedError, RecoveryError, ServeError, signal_name
from .._policy import (
    BreakerPolicy,
    Event,
    Recovery,
    Validator,
    default_recovery,
    default_validator,
)
from ..jobs.runner import run_job
from ..runtime import platform
from ..runtime.breaker import Breaker
from ..runtime.hooks import check_and_recover, describe_report
from ..runtime.lock import LOCK_NAME
from ..runtime.rendezvous import take_lock, write_lock_file
from ._host import listens, log_size, log_tail, port_free

__all__ = ["ServeOptions", "Server", "State", "describe"]

logger = logging.getLogger("safechroma.serve")
logger.addHandler(logging.NullHandler())

# The child: tie its life to this process (PR_SET_PDEATHSIG = 1, SIGKILL), so that a serve
# killed with SIGKILL does not leave an unsupervised Chroma on the directory; then run the
# server exactly as the `chroma` console script does (chromadb/cli/cli.py: app()).
_CHILD: Final = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
if os.getppid() != int(sys.argv[2]):
    sys.exit(70)
import chromadb_rust_bindings
chromadb_rust_bindings.cli(["chroma", "run", sys.argv[1]])
"""


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """How ``safechroma serve`` runs and watches Chroma's server.

    Attributes:
        host: address to listen on (127.0.0.1: this machine only).
        port: TCP port.
        validator: called before each start (see ``safechroma.Options``); None disables.
        recovery: called when the validator reports damage; None: damage stops the server.
        breaker: when serve gives up (``safechroma.runtime.breaker``): ``max_deaths`` deaths
            without progress within ``window`` seconds, or ``max_total_deaths`` of any kind. A
            server made progress when it answered ``progress_calls`` health checks (reads of
            every collection) before it died. ``cooldown`` is not used: a server that gives
            up exits, so that an operator (or the service manager) looks.
        restart_wait: tenacity wait strategy between restarts of a server that died without
            progress (the first restart, and any after progress, is immediate).
        start_timeout: seconds for a new server to answer its heartbeat.
        health_interval: seconds between two watchdog rounds.
        health_timeout: seconds one round (a ``count`` of every collection) may take.
        health_grace: seconds after a start during which failed rounds are not counted (the
            first read of a collection loads its index).
        health_failures: consecutive failed rounds after which the server is restarted.
        stop_grace: seconds between SIGTERM and SIGKILL when stopping the server.
        chroma_log: a file that Chroma's own output is appended to (None: a temporary file,
            removed at exit; its tail is in each ``chroma_died`` event either way).
        on_event: called with each :class:`safechroma.Event`, in the thread that saw it.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    validator: Validator | None = default_validator
    recovery: Recovery | None = default_recovery
    breaker: BreakerPolicy = BreakerPolicy()
    restart_wait: Any = tenacity.wait_exponential(multiplier=0.5, max=30.0)
    start_timeout: float = 60.0
    health_interval: float = 5.0
    health_timeout: float = 10.0
    health_grace: float = 30.0
    health_failures: int = 3
    stop_grace: float = 10.0
    chroma_log: str | None = None
    on_event: Callable[[Event], None] | None = None


def describe(event: Event) -> str:
    """One readable line for an event of :class:`Server` (for the command line's log)."""
    d = event.detail
    pid = f" pid {event.pid}" if event.pid else ""
    k = event.kind
    if k == "serving":
        return f"serving {event.path} at {d['address']} (config {d['config']})"
    if k == "validated":
        return f"validated {event.path} before {d['reason']}: {d['summary']}"
    if k == "recovered":
        return f"repaired {event.path}: {d['summary']}"
    if k == "recovery_failed":
        return f"repair failed: {d['error']}"
    if k == "salvage_applied":
        return f"wrote back salvaged vectors: {d['summary']}"
    if k == "chroma_started":
        return f"started Chroma{pid} ({d['command']})"
    if k == "chroma_ready":
        return f"Chroma{pid} answers at {d['address']} after {d['seconds']:.1f} s"
    if k == "chroma_died":
        tail = d.get("log_tail") or ""
        tail = ("; last output: " + tail.strip().splitlines()[-1][:200]) if tail.strip() else ""
        return f"Chroma{pid} died: {d['how']} after {d['uptime']:.1f} s{tail}"
    if k == "probe_failed":
        return (
            f"health check of Chroma{pid} failed ({d['failures']}/{d['budget']}"
            f"{', in grace period' if d['in_grace'] else ''}): {d['error']}"
        )
    if k == "probe_error":
        return f"health check of Chroma{pid}: the server answered an error: {d['error']}"
    if k == "watchdog_restart":
        return f"Chroma{pid} is hung ({d['failures']} failed health checks): restarting it"
    if k == "restarting":
        return f"restarting Chroma in {d['delay']:.1f} s (restart {d['restart']})"
    if k == "breaker_open":
        return "giving up: " + "; ".join(d["deaths"])
    if k == "stopping":
        return f"stopping Chroma{pid} ({d['why']}): SIGTERM, up to {d['grace']:.0f} s"
    if k == "killed":
        return f"Chroma{pid} did not stop within {d['grace']:.0f} s: SIGKILL"
    if k == "stopped":
        return f"stopped; {event.path} is released"
    return f"{k}{pid} {d}"


class State(enum.Enum):
    CHECKING = "checking"  # no child: validating, repairing, writing back salvage
    STARTING = "starting"  # spawned, not answering yet
    SERVING = "serving"  # answering; the watchdog probes it
    STOPPING = "stopping"  # SIGTERM sent; SIGKILL after the grace period
    STOPPED = "stopped"  # no child, lock released


class _Died(Exception):
    """Internal: the child died (or was killed by the watchdog); restart it."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class _StopRequested(Exception):
    """Internal: stop() was called."""


class Server:
    """Runs Chroma's server on ``path`` until :meth:`stop` (from a signal handler) is called.

    :meth:`run` returns after a requested stop and raises when it gives up:
    :class:`safechroma.CrashLoopError` (breaker), :class:`safechroma.RecoveryError` (damage that
    could not be repaired), :class:`safechroma.ServeError` (port in use, start failed),
    :class:`safechroma.DirectoryLockedError` (another owner),
    :class:`safechroma.IncompatibleDirectoryError` (written by a newer chromadb). The directory
    is released and no child is left in every case.
    """

    def __init__(self, path: str, options: ServeOptions = ServeOptions()) -> None:
        self.path = os.path.abspath(path)
        self.options = options
        self.address = f"http://{_url_host(options.host)}:{options.port}"
        # Set from a signal handler: a plain flag and a self-pipe (a threading.Event's lock
        # could be held by the very frame the handler interrupts).
        self._stopping = False
        self._watchdog_stop = threading.Event()
        self._wake_r, self._wake_w = platform.nonblocking_pipe()
        self._lock_fd: int | None = None
        self._workdir = ""
        self._child: subprocess.Popen[bytes] | None = None
        self._child_started = 0.0
        self._log_offset = 0
        self._breaker = Breaker(options.breaker)
        self._restarts = 0
        # shared with the watchdog thread, under _state_lock
        self._state_lock = threading.Lock()
        self._generation = 0
        self._ready_at: float | None = None
        self._hung_generation = -1
        self._hung_failures = 0
        self._rounds_ok = 0  # health rounds the current child answered
        self.state = State.CHECKING

    # -- public ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to stop the server and return (safe from a signal handler)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"s")
        except OSError:
            pass

    @property
    def child_pid(self) -> int | None:
        """The pid of the running Chroma server, if any."""
        child = self._child
        return None if child is None or child.returncode is not None else child.pid

    def run(self) -> None:
        """Serve until stopped; see the class docstring for how it ends."""
        watchdog: threading.Thread | None = None
        try:
            self._take_lock()
            self._workdir = tempfile.mkdtemp(prefix="safechroma-serve-")
            config = self._write_config()
            self._emit("serving", None, address=self.address, config=config)
            watchdog = threading.Thread(target=self._watchdog, name="safechroma-serve-health")
            watchdog.daemon = True
            watchdog.start()
            reason = "start"
            while not self._stopping:
                self.state = State.CHECKING
                self._check_and_recover(reason)
                if self._stopping:
                    break
                try:
                    self._serve_once(config)
                except _StopRequested:
                    break
                except _Died as died:
                    self._after_death(died.how)
                    reason = "crash"
        finally:
            self._watchdog_stop.set()
            self._terminate("stop requested" if self._stopping else "giving up")
            if watchdog is not None:
                # A round in flight ends at its own deadline; the thread is a daemon and
                # touches nothing but HTTP, so the stop does not wait for it.
                watchdog.join(timeout=1.0)
            locked = self._lock_fd is not None
            self._release()
            self.state = State.STOPPED
            if locked:
                self._emit("stopped", None)

    # -- the directory ---------------------------------------------------------------------

    def _take_lock(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ServeError(
                f"{self.path} is not a directory",
                reason="not_a_directory",
                address=self.address,
            )
        os.makedirs(self.path, exist_ok=True)
        lock_path = os.path.join(self.path, LOCK_NAME)
        # A shared worker kept warm with no process using it (keep_warm) leaves at once.
        fd = take_lock(self.path, lock_path)
        if fd is None:
            try:
                with open(lock_path) as f:
                    holder = " ".join(f.read().split())
            except OSError:
                holder = "?"
            raise DirectoryLockedError(
                f"{self.path} is in use by another process ({LOCK_NAME}: {holder}); Chroma is "
                "not safe with two owners, so it is not served twice.",
                path=self.path,
                lock_path=lock_path,
            ) from None
        # Read by the library's lock error (runtime/lock.py): "pid" then "serve <url>"; written
        # as the CLI writes it, with no instant at which a reader finds the file empty.
        write_lock_file(fd, f"{os.getpid()}\nserve {self.address}\n")
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd is not None:
            try:
                os.ftruncate(self._lock_fd, 0)
            except OSError:
                pass
            os.close(self._lock_fd)  # releases the flock (the child, if any, is reaped)
            self._lock_fd = None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def _check_and_recover(self, reason: str) -> None:
        """Validate, repair on damage and write back pending salvage, with no child running."""

        def emit(kind: str, pid: int | None, **detail: Any) -> None:
            # The serve log's words (describe()): when, and what the reports say.
            if kind == "validated":
                detail["reason"] = "first start" if reason == "start" else "restart"
                detail["summary"] = describe_report(detail["report"])
            elif kind == "recovery_failed" and "error" not in detail:
                detail["error"] = str(getattr(detail["report"], "message", detail["report"]))
            self._emit(kind, pid, **detail)

        check_and_recover(
            self.path,
            reason=reason,
            crash=None,
            attempt=max(1, self._breaker.consecutive),
            validator=self.options.validator,
            recovery=self.options.recovery,
            emit=emit,
        )
        if self.options.recovery is not None:
            self._apply_salvage()

    def _apply_salvage(self) -> None:
        from ..storage.recovery import pending_salvage_files

        pending = pending_salvage_files(self.path)
        if not pending:
            return
        # Its own session: a Ctrl-C reaches serve, which lets the write-back finish.
        job = run_job("apply_salvage", [self.path, *pending], env=_child_env(), new_session=True)
        if not job.ok:
            self._emit("recovery_failed", None, error=f"write-back exited {job.returncode}")
            raise RecoveryError(
                f"{self.path} was repaired but writing back the salvaged vectors failed "
                f"(exit {job.returncode}); run `safechroma repair {self.path}`.\n{job.stderr}",
                path=self.path,
                report=None,
            )
        applied = job.result
        summary = ", ".join(
            f"{s.get('collection')}: {s.get('recovered')} vectors"
            + (f", {len(s['removed'])} records removed" if s.get("removed") else "")
            for s in applied
        )
        self._emit("salvage_applied", None, summary=summary, applied=applied)

    # -- one life of the child -------------------------------------------------------------

    def _write_config(self) -> str:
        # JSON strings are valid YAML scalars; every key is explicit (YAML mode otherwise
        # listens on 0.0.0.0: CHROMA_FACTS.md section 6).
        config = os.path.join(self._workdir, "chroma.yaml")
        with open(config, "w") as f:
            f.write(f"persist_path: {json.dumps(self.path)}\n")
            f.write(f"listen_address: {json.dumps(self.options.host)}\n")
            f.write(f"port: {int(self.options.port)}\n")
            f.write("allow_reset: false\n")
        return config

    def _serve_once(self, config: str) -> None:
        if not port_free(self.options.host, self.options.port):
            raise ServeError(
                f"cannot serve at {self.address}: the port is in use by another program",
                reason="port_in_use",
                address=self.address,
            )
        log_path = self.options.chroma_log or os.path.join(self._workdir, "chroma.log")
        log = open(log_path, "ab")
        try:
            assert self._lock_fd is not None
            self._child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, config, str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                # Its own session: a Ctrl-C in the terminal reaches serve only, which then
                # stops the server within the grace period (Chroma alone waits forever).
                start_new_session=True,
                # The lock's descriptor: the directory stays locked while the child lives.
                pass_fds=(self._lock_fd,),
            )
        finally:
            log.close()
        self._child_started = time.monotonic()
        self.state = State.STARTING
        self._log_offset = log_size(log_path)
        with self._state_lock:
            self._generation += 1
            self._ready_at = None
            self._rounds_ok = 0
        self._emit("chroma_started", self._child.pid, command="chroma run " + config)
        pidfd = platform.watch_popen(self._child)  # a pidfd on Linux, a pipe elsewhere
        try:
            self._wait_ready(pidfd, log_path)
            self._watch(pidfd, log_path)
        finally:
            os.close(pidfd)

    def _wait_ready(self, pidfd: int, log_path: str) -> None:
        assert self._child is not None
        give_up = self._child_started + self.options.start_timeout
        url = f"{self.address}/api/v2/heartbeat"
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                if self._wait(pidfd, 0.1):
                    if self._child.returncode == 0 and not port_free(
                        self.options.host, self.options.port
                    ):
                        raise ServeError(
                            f"cannot serve at {self.address}: the port is in use by another "
                            "program (Chroma exited with status 0)",
                            reason="port_in_use",
                            address=self.address,
                        )
                    raise _Died(self._death(log_path, "while starting"))
                try:
                    ok = client.get(url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok and listens(self._child.pid, self.options.port):
                    break
                if time.monotonic() > give_up:
                    self._terminate("no heartbeat within start_timeout")
                    raise _Died(
                        self._death(
                            log_path, f"no heartbeat within {self.options.start_timeout:g} s"
                        )
                    )
        now = time.monotonic()
        self._log_offset = log_size(log_path)  # Chroma's banner is not news
        self.state = State.SERVING
        with self._state_lock:
            self._ready_at = now
        self._emit(
            "chroma_ready",
            self._child.pid,
            address=self.address,
            seconds=now - self._child_started,
        )

    def _watch(self, pidfd: int, log_path: str) -> None:
        assert self._child is not None
        generation = self._generation
        while True:
            if self._wait(pidfd, None):
                raise _Died(self._death(log_path, ""))
            with self._state_lock:
                hung = self._hung_generation == generation
                failures = self._hung_failures
            if hung:
                self._emit("watchdog_restart", self._child.pid, failures=failures)
                self._terminate("hung")
                raise _Died(
                    self._death(log_path, f"killed by the watchdog after {failures} failed checks")
                )

    def _wait(self, pidfd: int, timeout: float | None) -> bool:
        """Wait for the child's exit, a stop or a wake-up; True when the child has exited."""
        assert self._child is not None
        readable, _, _ = select.select([pidfd, self._wake_r], [], [], timeout)
        if self._wake_r in readable:
            _drain(self._wake_r)
        if self._stopping:
            raise _StopRequested()
        if pidfd in readable:
            self._child.wait()
            return True
        return False

    def _death(self, log_path: str, context: str) -> str:
        assert self._child is not None
        rc = self._child.returncode
        how = signal_name(rc) or f"exit status {rc}"
        if context:
            how = f"{how} ({context})" if rc is not None else context
        uptime = time.monotonic() - self._child_started
        self._emit(
            "chroma_died",
            self._child.pid,
            how=how,
            exitcode=rc,
            signal=signal_name(rc),
            uptime=uptime,
            log_tail=log_tail(log_path, self._log_offset),
        )
        return f"pid {self._child.pid}: {how} after {uptime:.1f} s"

    def _after_death(self, how: str) -> None:
        now = time.monotonic()
        self._child = None
        with self._state_lock:
            self._ready_at = None
            served = self._rounds_ok
        if self._breaker.record(now, how, served=served):
            deaths = self._breaker.recent(now)
            window = f"{self.options.breaker.window:.0f} s"
            stalled = sum(1 for d in self._breaker.deaths if not d.progress)
            why = (
                f"died {stalled} times without answering a health check within {window}"
                if stalled >= self.options.breaker.max_deaths
                else f"died {len(deaths)} times within {window}"
            )
            self._emit("breaker_open", None, deaths=deaths)
            raise CrashLoopError(
                f"Chroma's server on {self.path} {why}, so safechroma serve gave up (the "
                f"last: {deaths[-1]}). Check the directory with `safechroma check {self.path}` "
                "and Chroma's output above.",
                path=self.path,
                deaths=deaths,
                retry_after=0.0,
            )
        self._restarts += 1
        delay = 0.0
        if self._breaker.consecutive > 1:
            state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
            state.attempt_number = self._breaker.consecutive - 1
            delay = float(self.options.restart_wait(state))
        self._emit("restarting", None, delay=delay, restart=self._restarts)
        if delay:
            give_up = time.monotonic() + delay
            while not self._stopping and (left := give_up - time.monotonic()) > 0:
                select.select([self._wake_r], [], [], left)
                _drain(self._wake_r)

    def _terminate(self, why: str) -> None:
        """SIGTERM, up to ``stop_grace`` seconds, then SIGKILL; reaps the child."""
        child = self._child
        if child is None or child.poll() is not None:
            return
        grace = self.options.stop_grace
        self.state = State.STOPPING
        self._emit("stopping", child.pid, why=why, grace=grace)
        try:
            child.send_signal(signal.SIGTERM)
            # A stopped process keeps SIGTERM pending; let it run so that it can stop cleanly.
            if sys.platform != "win32":  # no SIGSTOP, no SIGCONT there
                child.send_signal(signal.SIGCONT)
            child.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:  # pragma: no cover - reaped in between
            return
        self._emit("killed", child.pid, grace=grace)
        child.kill()
        child.wait()

    # -- the watchdog (its own thread: probes only, never touches the process) -------------

    def _watchdog(self) -> None:
        o = self.options
        failures = 0
        generation = -1
        next_at = 0.0
        while not self._stopping:
            with self._state_lock:
                ready_at, gen = self._ready_at, self._generation
            if ready_at is None:
                if self._watchdog_stop.wait(0.1):
                    return
                continue
            if gen != generation:
                # Rounds are timed from each child's start, so a new server gets a full
                # interval before its first check.
                generation, failures, next_at = gen, 0, ready_at + o.health_interval
            left = next_at - time.monotonic()
            if left > 0:
                if self._watchdog_stop.wait(min(left, 0.5)):
                    return
                continue
            error = self._probe()
            next_at = time.monotonic() + o.health_interval
            if error is None:
                failures = 0
                with self._state_lock:
                    if self._generation == gen:
                        self._rounds_ok += 1
                continue
            if error.startswith("answered "):
                self._emit("probe_error", self.child_pid, error=error)
                continue
            in_grace = time.monotonic() - ready_at < o.health_grace
            if not in_grace:
                failures += 1
            self._emit(
                "probe_failed",
                self.child_pid,
                failures=failures,
                budget=o.health_failures,
                in_grace=in_grace,
                error=error,
            )
            if failures >= o.health_failures:
                with self._state_lock:
                    if self._generation == gen:
                        self._hung_generation = gen
                        self._hung_failures = failures
                try:
                    os.write(self._wake_w, b"h")
                except OSError:
                    pass
                failures = 0

    def _probe(self) -> str | None:
        """One timed read of every collection; None if it answered, else what went wrong."""
        o = self.options
        deadline = time.monotonic() + o.health_timeout
        base = f"{self.address}/api/v2/tenants/default_tenant/databases"

        def get(client: httpx.Client, url: str) -> Any:
            left = deadline - time.monotonic()
            if left <= 0:
                raise httpx.ReadTimeout("health check round over its deadline")
            response = client.get(url, timeout=left)
            if response.status_code >= 400:
                raise _Answered(f"answered {response.status_code} to GET {url}: {response.text}")
            return response.json()

        try:
            with httpx.Client(trust_env=False) as client:
                for db in get(client, base):
                    name = db["name"]
                    for col in get(client, f"{base}/{name}/collections"):
                        get(client, f"{base}/{name}/collections/{col['id']}/count")
        except _Answered as exc:
            return str(exc)[:300]
        except httpx.TimeoutException:
            return f"no answer within {o.health_timeout:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _emit(self, kind: str, pid: int | None, **detail: Any) -> None:
        event = Event(kind, self.path, pid, detail)
        level = logging.WARNING if kind in _WARN else logging.INFO
        logger.log(level, "%s", describe(event))
        if self.options.on_event is not None:
            self.options.on_event(event)


class _Answered(Exception):
    """Internal: the server answered a health check with an error status (not a hang)."""


_WARN: Final = frozenset(
    {
        "chroma_died",
        "probe_failed",
        "watchdog_restart",
        "breaker_open",
        "recovery_failed",
        "killed",
        "recovered",
    }
)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _child_env() -> dict[str, str]:
    # Chroma reads CHROMA_* variables over the YAML keys: none of them reach the child.
    # And never the launcher's trigger: `chroma run` here is safechroma's own, supervised.
    return {k: v for k, v in private_env().items() if not k.upper().startswith("CHROMA_")}
