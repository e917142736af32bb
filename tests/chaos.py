"""The chaos soak engine (issue 7), shared by ``tests/test_chaos.py`` and ``benchmarks/soak.py``.

Several threads run a mixed workload (add, upsert, update, delete, get, query, count) against one
``SafeClient`` with explicit embeddings, while an injector thread hurts the worker with real
signals (SIGKILL, SIGSEGV, SIGBUS sent with ``os.kill``), freezes it (SIGSTOP, cut by the client's
deadline) or makes a call hang (``run_in_worker(faults.hang)`` under ``call_timeout``).

The ledger. Each workload thread owns its own ids (``t<thread>-<n>``), so the order of the writes
on an id is that thread's program order and the ledger needs no locking. For every id it keeps the
set of states the id may be in: ``None`` (absent) or the version number of the write that put it
there (document, metadata and vector are all derived from ``(id, version)``, so a record whose
three parts do not match one version is caught). An acknowledged write maps every possible state
through the write; a write that raised with ``outcome_unknown`` adds the "applied" states to the
"not applied" ones and is then resolved at once with a ``get`` of its ids, which must show the
whole batch applied or the whole batch absent (never part of it). A read narrows the set to what
it saw. At the end the client is closed and the directory is read by chromadb in a child process
(this process never opens a Chroma directory): every id must be in one of its possible states,
present exactly once with its own document, metadata and vector.

Recall misses are not problems. HNSW is approximate: a query by a record's own vector may not
return it first even when nothing went wrong (plain chromadb, no faults, no safechroma, the same
workload serialized: 1-2 such misses per 20 s). So a query miss is followed by a ``get`` of the
record: if its stored vector, document and metadata are those of a version the ledger allows, the
miss is counted in ``recall_misses`` and is not a problem; anything else still is.

Run it as a script only as the verification child: ``python chaos.py dump DB OUT``.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
COLLECTION = "soak"

# Workload mix (weights). Writes are batches of 1..MAX_BATCH distinct ids of the thread's own.
MIX = {"add": 15, "upsert": 15, "update": 10, "delete": 8, "get": 20, "query": 15, "count": 8}
MAX_BATCH = 8
FAULT_KINDS = ("SIGKILL", "SIGSEGV", "SIGBUS", "SIGSTOP", "hang")

State = int | None  # None: absent; otherwise the version that wrote the record


@dataclasses.dataclass(frozen=True)
class SoakConfig:
    """What to run.

    Attributes:
        seconds: how long the workload runs.
        threads: workload threads.
        ids_per_thread: size of each thread's id space.
        dim: vector dimension.
        fault_gap: the injector sleeps uniformly within this range (seconds) between faults.
        faults: fault kinds to draw from (see FAULT_KINDS).
        call_timeout: the client's deadline; it is what cuts a SIGSTOPped worker.
        hang_timeout: the deadline of the injector's hanging call.
        sync_threshold: Chroma's HNSW flush threshold for the collection (small, so that faults
            also land during index flushes, where a kill can tear the index).
        seed: seeds every random choice (threads and injector get derived seeds).
        warmup: seconds after which the caller's baseline RSS is taken.
    """

    seconds: float = 35.0
    threads: int = 4
    ids_per_thread: int = 120
    dim: int = 8
    fault_gap: tuple[float, float] = (0.3, 1.2)
    faults: tuple[str, ...] = FAULT_KINDS
    call_timeout: float = 4.0
    hang_timeout: float = 1.0
    sync_threshold: int = 50
    seed: int = 7
    warmup: float = 3.0

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {FAULT_KINDS}")


@dataclasses.dataclass
class SoakReport:
    """What happened. ``problems`` and ``contradictions`` must be empty and ``records_lost`` 0
    (see :attr:`passed`)."""

    config: SoakConfig
    duration: float = 0.0
    operations: int = 0
    ops_ok: Counter[str] = dataclasses.field(default_factory=Counter)
    ops_failed: Counter[str] = dataclasses.field(default_factory=Counter)
    faults_injected: Counter[str] = dataclasses.field(default_factory=Counter)
    deaths: dict[str, int] = dataclasses.field(default_factory=dict)
    timeouts: int = 0
    respawns: int = 0
    recoveries: int = 0
    unknown_writes: int = 0
    unknown_applied: int = 0
    unknown_absent: int = 0
    unknown_unresolved: int = 0
    records_checked: int = 0
    records_present: int = 0
    records_lost: int = 0
    recall_misses: int = 0
    final_recall_misses: int = 0
    # Reads during the run that saw an acknowledged record in a state the ledger does not allow
    # (0 required: chromadb's vector swap, which once made these, is guarded against).
    contradictions: list[str] = dataclasses.field(default_factory=list)
    served_after_last_fault: bool = False
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    threads_before: int = 0
    threads_after: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and not self.contradictions and self.records_lost == 0

    @property
    def faults_survived(self) -> int:
        """Worker deaths the caller lived through and kept serving calls after."""
        return (sum(self.deaths.values())) if self.served_after_last_fault else 0

    def markdown(self) -> str:
        c = self.config
        rows = [
            ("duration", f"{self.duration:.1f} s ({c.threads} workload threads + 1 injector)"),
            (
                "operations",
                f"{self.operations} ({self.operations / max(self.duration, 1e-9):.0f}/s)",
            ),
            ("  succeeded", _counts(self.ops_ok)),
            ("  failed by a fault", _counts(self.ops_failed)),
            (
                "faults injected",
                f"{sum(self.faults_injected.values())} ({_counts(self.faults_injected)})",
            ),
            (
                "worker deaths seen",
                f"{sum(self.deaths.values())} ({_counts(Counter(self.deaths))})",
            ),
            ("faults survived", str(self.faults_survived)),
            ("respawns / recoveries", f"{self.respawns} / {self.recoveries}"),
            (
                "writes with outcome unknown",
                f"{self.unknown_writes} (applied {self.unknown_applied}, "
                f"absent {self.unknown_absent}, unresolved {self.unknown_unresolved}, partial 0 "
                "required)",
            ),
            (
                "records checked",
                f"{self.records_checked} ids ({self.records_present} present at the end)",
            ),
            (
                "query recall misses (HNSW is approximate)",
                f"{self.recall_misses} during the run, {self.final_recall_misses} in the final "
                "check "
                "(record stored intact, not returned first by its own vector; not a problem)",
            ),
            (
                "reads during the run that contradicted the ledger (0 required)",
                str(len(self.contradictions)),
            ),
            (
                "records lost",
                str(self.records_lost)
                if self.records_lost >= 0
                else "unknown: chromadb could not read the directory at the end",
            ),
            (
                "caller RSS",
                f"{self.rss_before_kib // 1024} MiB -> {self.rss_after_kib // 1024} MiB",
            ),
            ("caller threads", f"{self.threads_before} -> {self.threads_after}"),
            ("problems", "none" if not self.problems else f"{len(self.problems)}"),
        ]
        out = ["| figure | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in rows]
        if self.problems:
            out += ["", "Problems:", ""] + [f"- {p}" for p in self.problems[:50]]
        if self.contradictions:
            out += ["", "Reads during the run that contradicted the ledger:", ""]
            out += [f"- {p}" for p in self.contradictions[:20]]
        return "\n".join(out)


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"


# -- what a record looks like ---------------------------------------------------------------


def vector_of(rid: str, version: int, dim: int) -> np.ndarray:
    digest = hashlib.sha256(f"{rid}/{version}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little")).random(dim, dtype=np.float32)


def document_of(rid: str, version: int) -> str:
    return f"{rid} v{version}"


def metadata_of(rid: str, version: int) -> dict[str, Any]:
    return {"id": rid, "v": version, "even": version % 2 == 0}


def observed_state(rid: str, doc: Any, meta: Any, vec: Any, dim: int) -> State | str:
    """The version a stored record is consistent with, or a string describing the damage."""
    if not isinstance(meta, dict) or "v" not in meta:
        return f"{rid}: metadata {meta!r}"
    v = int(meta["v"])
    if meta != metadata_of(rid, v):
        return f"{rid}: metadata {meta!r} is not version {v}'s"
    if doc != document_of(rid, v):
        return f"{rid}: document {doc!r} does not belong to version {v}"
    if vec is None or not np.allclose(
        np.asarray(vec, dtype=np.float32), vector_of(rid, v, dim), atol=1e-6
    ):
        return f"{rid}: vector does not belong to version {v}"
    return v


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- the workload ---------------------------------------------------------------------------


class _Thread:
    """One workload thread and its ledger."""

    def __init__(
        self,
        tid: int,
        col: Any,
        cfg: SoakConfig,
        stop: threading.Event,
        report: SoakReport,
        lock: threading.Lock,
    ) -> None:
        self.tid = tid
        self.col = col
        self.cfg = cfg
        self.stop = stop
        self.report = report
        self.lock = lock  # guards the shared report counters
        self.rng = random.Random(cfg.seed * 1000 + tid)
        self.ids = [f"t{tid}-{n}" for n in range(cfg.ids_per_thread)]
        self.ledger: dict[str, set[State]] = {rid: {None} for rid in self.ids}
        self.version = tid * 10_000_000
        # Per id: (op, version, outcome) of every write, for the report when a check fails.
        self.history: dict[str, list[tuple[str, int, str]]] = {rid: [] for rid in self.ids}

    # bookkeeping -------------------------------------------------------------------------

    def _tally(self, counter: str, key: str) -> None:
        with self.lock:
            getattr(self.report, counter)[key] += 1
            self.report.operations += 1

    def _problem(self, text: str) -> None:
        with self.lock:
            self.report.problems.append(f"thread {self.tid}: {text}")

    def _observe(self, rid: str, seen: State | str, why: str) -> None:
        """A read during the run. One that contradicts the ledger is a failure of its own (a
        record absent, another write's vector): it is recorded and leaves the ledger as it is,
        so the final check by chromadb still judges the acknowledged state."""
        if isinstance(seen, str) or seen not in self.ledger[rid]:
            what = (
                f"damaged record {seen}"
                if isinstance(seen, str)
                else f"{rid} is {seen!r}, ledger allows {sorted(map(str, self.ledger[rid]))}"
            )
            with self.lock:
                self.report.contradictions.append(
                    f"thread {self.tid}: {why}: {what}; history {self.history[rid][-6:]}"
                )
            return
        self.ledger[rid] = {seen}

    # the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        import safechroma

        ops, weights = zip(*MIX.items(), strict=False)
        while not self.stop.is_set():
            op = self.rng.choices(ops, weights)[0]
            try:
                getattr(self, "_" + op)()
            except safechroma.WorkerError as exc:
                self._tally("ops_failed", op)
                if op in ("add", "upsert", "update", "delete") and exc.outcome_unknown:
                    raise AssertionError("unknown outcome escaped the write wrapper") from exc
            except BaseException as exc:  # noqa: BLE001 - any other error is a finding
                self._tally("ops_failed", op)
                self._problem(f"{op} raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                if isinstance(exc, safechroma.CrashLoopError):
                    self.stop.set()

    def _batch(self) -> list[str]:
        return self.rng.sample(self.ids, self.rng.randint(1, MAX_BATCH))

    def _write(self, op: str) -> None:
        import safechroma

        rids = self._batch()
        self.version += 1
        v = self.version
        dim = self.cfg.dim
        kwargs: dict[str, Any] = {"ids": rids}
        if op != "delete":
            kwargs["embeddings"] = np.stack([vector_of(r, v, dim) for r in rids])
            kwargs["documents"] = [document_of(r, v) for r in rids]
            kwargs["metadatas"] = [metadata_of(r, v) for r in rids]

        def apply(s: State) -> State:
            if op == "add":
                return s if s is not None else v  # duplicate ids in add are ignored
            if op == "upsert":
                return v
            if op == "update":
                return None if s is None else v  # update of a missing id is a no-op
            return None

        old = {r: set(self.ledger[r]) for r in rids}
        outcome = "ok"
        new = {r: {apply(s) for s in old[r]} for r in rids}
        try:
            getattr(self.col, op)(**kwargs)
        except safechroma.WorkerError as exc:
            self._tally("ops_failed", op)
            outcome = f"{type(exc).__name__}(unknown={exc.outcome_unknown})"
            for r in rids:
                self.history[r].append((op, v, outcome))
            if not exc.outcome_unknown:
                return  # the library says nothing was sent: the state is unchanged
            with self.lock:
                self.report.unknown_writes += 1
            for r in rids:
                self.ledger[r] = old[r] | new[r]
            self._resolve(op, rids, old, new)
            return
        self._tally("ops_ok", op)
        for r in rids:
            self.ledger[r] = new[r]
            self.history[r].append((op, v, outcome))

    def _resolve(
        self, op: str, rids: list[str], old: dict[str, set[State]], new: dict[str, set[State]]
    ) -> None:
        """Read back a write whose outcome is unknown: all of it applied, or none of it."""
        import safechroma

        for _ in range(5):
            try:
                got = self.col.get(ids=rids, include=["documents", "metadatas", "embeddings"])
                break
            except safechroma.WorkerError:
                continue
        else:
            with self.lock:
                self.report.unknown_unresolved += 1
            return  # the final check still holds the id to old | new
        seen: dict[str, State | str] = {r: None for r in rids}
        for i, rid in enumerate(got["ids"]):
            seen[rid] = observed_state(
                rid, got["documents"][i], got["metadatas"][i], got["embeddings"][i], self.cfg.dim
            )
        applied = all(seen[r] in new[r] for r in rids)
        absent = all(seen[r] in old[r] for r in rids)
        if not (applied or absent):
            self._problem(f"{op} of {rids} with unknown outcome was applied partially: {seen}")
        with self.lock:
            if applied and not absent:
                self.report.unknown_applied += 1
            elif absent and not applied:
                self.report.unknown_absent += 1
            else:
                self.report.unknown_applied += applied  # indistinguishable (e.g. add on present)
        for r in rids:
            self._observe(r, seen[r], f"resolving {op}")

    def _add(self) -> None:
        self._write("add")

    def _upsert(self) -> None:
        self._write("upsert")

    def _update(self) -> None:
        self._write("update")

    def _delete(self) -> None:
        self._write("delete")

    def _get(self) -> None:
        rids = self._batch()
        got = self.col.get(ids=rids, include=["documents", "metadatas", "embeddings"])
        self._tally("ops_ok", "get")
        if len(set(got["ids"])) != len(got["ids"]):
            self._problem(f"get returned duplicate ids {got['ids']}")
        seen: dict[str, State | str] = {r: None for r in rids}
        for i, rid in enumerate(got["ids"]):
            seen[rid] = observed_state(
                rid, got["documents"][i], got["metadatas"][i], got["embeddings"][i], self.cfg.dim
            )
        for r in rids:
            self._observe(r, seen[r], "get")

    def _query(self) -> None:
        known = [r for r in self.ids if len(self.ledger[r]) == 1 and None not in self.ledger[r]]
        if not known:
            self.col.count()
            self._tally("ops_ok", "count")
            return
        rid = self.rng.choice(known)
        (v,) = self.ledger[rid]
        assert v is not None
        res = self.col.query(
            query_embeddings=vector_of(rid, v, self.cfg.dim)[None, :],
            n_results=3,
            include=["distances"],
        )
        self._tally("ops_ok", "query")
        if res["ids"][0] and res["ids"][0][0] == rid and res["distances"][0][0] <= 1e-4:
            return
        # Not returned first: a recall miss if the record is stored intact (HNSW is approximate,
        # see the module docstring), damage otherwise. The get decides.
        got = self.col.get(ids=[rid], include=["documents", "metadatas", "embeddings"])
        seen: State | str = None
        if got["ids"]:
            seen = observed_state(
                rid, got["documents"][0], got["metadatas"][0], got["embeddings"][0], self.cfg.dim
            )
        if not isinstance(seen, str) and seen in self.ledger[rid] and seen is not None:
            with self.lock:
                self.report.recall_misses += 1
            self.ledger[rid] = {seen}
            return
        self._observe(
            rid,
            seen,
            f"query by {rid}'s own vector found {res['ids'][0]}, then get",
        )

    def _count(self) -> None:
        n = self.col.count()
        self._tally("ops_ok", "count")
        if not isinstance(n, int) or n < 0:
            self._problem(f"count returned {n!r}")


# -- the injector ---------------------------------------------------------------------------


def _our_child(pid: int | None) -> bool:
    """A live worker of this process: its child, or a child of its worker template (which
    forks the workers)."""
    if not pid:
        return False

    def parent(p: int) -> tuple[int, str]:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[0]

    try:
        ppid, state = parent(pid)
        if state == "Z":
            return False
        return ppid == os.getpid() or (ppid > 1 and parent(ppid)[0] == os.getpid())
    except OSError:
        return False


def _inject(
    client: Any,
    cfg: SoakConfig,
    stop: threading.Event,
    report: SoakReport,
    lock: threading.Lock,
    last_fault: list[float],
) -> None:
    import faults

    import safechroma

    kinds = tuple(k for k in cfg.faults if k)
    if not kinds:
        return  # the control run: rng.choice(()) would raise IndexError in this thread
    rng = random.Random(cfg.seed * 7919)
    signals = {
        "SIGKILL": signal.SIGKILL,
        "SIGSEGV": signal.SIGSEGV,
        "SIGBUS": signal.SIGBUS,
        "SIGSTOP": signal.SIGSTOP,
    }
    last: int | None = None
    while not stop.wait(rng.uniform(*cfg.fault_gap)):
        kind = rng.choice(kinds)
        # Faults hit a running service: a worker that was already there at the injector's last
        # wake-up (so the workload threads have been calling it). A worker hit before it served
        # a call is what the breaker calls a crash loop, which tests/test_breaker.py covers; on
        # a loaded machine a fresh worker can take seconds to serve its first call.
        current = client.stats().worker_pid
        fresh, last = current != last, current
        if current is None or fresh:
            continue
        if kind == "hang":
            try:
                with safechroma.call_timeout(cfg.hang_timeout):
                    client.run_in_worker(faults.hang)
            except safechroma.WorkerTimeoutError:
                pass
            except safechroma.WorkerError:
                pass  # the worker died under it for another reason: still a fault
            except BaseException as exc:  # noqa: BLE001
                with lock:
                    report.problems.append(f"injector: hang raised {exc!r}")
                continue
        else:
            pid = client.stats().worker_pid
            if not _our_child(pid):
                continue  # between workers: try again later
            try:
                os.kill(pid, signals[kind])
            except ProcessLookupError:
                continue
        with lock:
            report.faults_injected[kind] += 1
        last_fault[0] = time.monotonic()


# -- running and checking -------------------------------------------------------------------


def run_soak(path: str, cfg: SoakConfig) -> SoakReport:
    """Run the soak on a fresh directory ``path`` and check the result. Never raises for a
    finding: every finding is in ``report.problems`` (and ``records_lost``)."""
    import safechroma

    report = SoakReport(cfg)
    report.threads_before = threading.active_count()
    lock = threading.Lock()
    stop = threading.Event()
    last_fault = [0.0]
    # Default options but the deadline, which is what cuts a SIGSTOPped worker: the breaker
    # must tell this workload (workers that serve calls, then are killed) from a crash loop.
    client = safechroma.SafeClient(path, timeout=cfg.call_timeout)
    start = time.monotonic()
    try:
        col = client.create_collection(
            COLLECTION,
            embedding_function=None,
            configuration={
                "hnsw": {
                    "sync_threshold": cfg.sync_threshold,
                    "batch_size": min(100, cfg.sync_threshold),
                    "ef_search": 200,
                }
            },
        )
        workers = [_Thread(t, col, cfg, stop, report, lock) for t in range(cfg.threads)]
        threads = [threading.Thread(target=w.run, name=f"soak-{w.tid}") for w in workers]
        injector = threading.Thread(
            target=_inject, name="soak-injector", args=(client, cfg, stop, report, lock, last_fault)
        )
        for t in threads:
            t.start()
        injector.start()
        time.sleep(min(cfg.warmup, cfg.seconds))
        gc.collect()
        report.rss_before_kib = rss_kib()
        stop.wait(max(0.0, cfg.seconds - cfg.warmup))
        stop.set()
        injector.join()
        for t in threads:
            t.join()
        report.duration = time.monotonic() - start
        # The client must still serve calls after everything that happened.
        n = col.count()
        report.served_after_last_fault = isinstance(n, int)
        stats = client.stats()
        report.deaths = dict(stats.deaths)
        report.timeouts = stats.timeouts
        report.respawns = stats.respawns
        report.recoveries = stats.recoveries
        del col
    finally:
        stop.set()
        client.close()
    gc.collect()
    report.rss_after_kib = rss_kib()
    report.threads_after = threading.active_count()
    _final_check(path, cfg, workers, report)
    return report


def _final_check(path: str, cfg: SoakConfig, workers: list[_Thread], report: SoakReport) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "dump.pkl")
        proc = subprocess.run(
            [sys.executable, str(HERE / "chaos.py"), "dump", path, out],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            report.problems.append(f"chromadb could not read the directory: {proc.stderr[-2000:]}")
            report.records_lost = -1
            return
        with open(out, "rb") as f:
            dump = pickle.load(f)
    ids: list[str] = dump["ids"]
    if len(set(ids)) != len(ids):
        report.problems.append(f"{len(ids) - len(set(ids))} ids are stored more than once")
    if dump["count"] != len(ids):
        report.problems.append(f"count() says {dump['count']}, get() returned {len(ids)}")
    final: dict[str, State | str] = {}
    for i, rid in enumerate(ids):
        final[rid] = observed_state(
            rid, dump["documents"][i], dump["metadatas"][i], dump["embeddings"][i], cfg.dim
        )
    ledger: dict[str, set[State]] = {}
    for w in workers:
        ledger.update(w.ledger)
    history: dict[str, list[tuple[str, int, str]]] = {}
    for w in workers:
        history.update(w.history)
    for rid in set(final) - set(ledger):
        report.problems.append(f"{rid} is stored but was never written")
    lost = 0
    for rid, possible in ledger.items():
        seen = final.get(rid)
        report.records_checked += 1
        if isinstance(seen, str):
            vec = np.asarray(dump["embeddings"][ids.index(rid)], dtype=np.float32)
            match = [
                v
                for _, v, _ in history[rid]
                if np.allclose(vec, vector_of(rid, v, cfg.dim), atol=1e-6)
            ]
            report.problems.append(
                f"final: damaged record {seen}; its vector is that of "
                f"version(s) {match or 'none written'}; "
                f"history {history[rid][-6:]}"
            )
            lost += 1
        elif seen not in possible:
            report.problems.append(f"final: {rid} is {seen!r}, ledger allows {possible}")
            lost += 1 if None not in possible or seen is None else 0
        if seen is not None and not isinstance(seen, str):
            report.records_present += 1
            if rid not in dump["self_hits"]:
                # Stored intact (checked above), only not returned first: a recall miss.
                report.final_recall_misses += 1
    report.records_lost = lost


def dump_directory(db: str, out: str) -> None:
    """Child side of the final check: read everything with chromadb itself."""
    import chromadb

    client = chromadb.PersistentClient(db)
    col = client.get_collection(COLLECTION, embedding_function=None)
    got = col.get(include=["documents", "metadatas", "embeddings"])
    hits: list[str] = []
    if got["ids"]:
        res = col.query(
            query_embeddings=np.asarray(got["embeddings"], dtype=np.float32),
            n_results=1,
            include=["distances"],
        )
        hits = [
            rid
            for rid, found, dist in zip(got["ids"], res["ids"], res["distances"], strict=False)
            if found and found[0] == rid and dist[0] <= 1e-4
        ]
    with open(out, "wb") as f:
        pickle.dump(
            {
                "ids": list(got["ids"]),
                "documents": list(got["documents"]),
                "metadatas": list(got["metadatas"]),
                "embeddings": [np.asarray(e).tolist() for e in got["embeddings"]],
                "count": col.count(),
                "self_hits": set(hits),
            },
            f,
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["dump"]:
        dump_directory(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: python chaos.py dump DB OUT")
