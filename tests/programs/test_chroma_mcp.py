"""chroma-mcp 0.2.6, the real server over real stdio MCP, under ``python -m safechroma run``.

Issue 20, "How it will be checked": with an embedding function registered only in the
program's own code, chroma-mcp's own process never opens ``chroma.sqlite3``; after a SIGKILLed
worker, after a restart, and on a copy of a directory whose index kills plain chroma-mcp, every
query gives the same answer and every write lands. Beyond that: a worker that dies with a
call in flight, a program killed by its host, damage that arrives while the program runs, two
programs on one directory, and every tool (errors included) answering as on plain chromadb.

The program is a launcher file (see ``mcp_driver.LAUNCHER``) that registers ``hash_ef`` with
``@register_embedding_function``, offers it to chroma-mcp's ``chroma_create_collection`` and
runs chroma-mcp's ``main``; the test drives it with the mcp package's own stdio client. Answers
are checked against brute force over the launcher's deterministic vectors (squared L2, as
Chroma's ``l2``), not only against each other.

Real processes and signals only; every process a session starts is gone when it ends
(``mcp_driver.Server`` fails the test naming any that outlives the program by 15 s).
chroma-mcp pins ``mcp==1.6.0``, which needs ``pydantic<2.11``: it lives in its own venv
(``.venv-mcp``); elsewhere this module skips.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "chroma_mcp",
    reason="chroma-mcp 0.2.6 pins mcp==1.6.0 (pydantic<2.11), so it runs in its own venv: "
    "python3 -m venv .venv-mcp && .venv-mcp/bin/pip install -e '.[test,mcp]' (CI's third line)",
)

import anyio  # noqa: E402
import numpy as np  # noqa: E402

from .mcp_driver import (  # noqa: E402
    DIM,
    EF_NAME,
    Server,
    ServerDied,
    ToolError,
    alive,
    hash_vector,
    holders,
    mapped_files,
    open_files,
    program_argv,
    stderr_lines,
    wait_gone,
    write_launcher,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chroma_dirs as cd  # noqa: E402

COLL = "notes"
TOPICS = ["rust", "sqlite", "hnsw", "signals", "pipes", "locks", "memory"]


def doc(i: int) -> str:
    return f"note {i} about {TOPICS[i % len(TOPICS)]}"


FIRST = range(0, 40)
LATER = range(40, 50)
MORE = range(50, 60)
QUERIES = [doc(3), doc(17), doc(39), "what did we decide about locks?", "zzz"]
K = 5


def ids_of(r: range) -> list[str]:
    return [f"n{i}" for i in r]


def expected_query(live: range, text: str, k: int = K) -> tuple[list[str], list[float]]:
    """Brute-force top-k by Chroma's ``l2`` (squared Euclidean) over the launcher's vectors."""
    vecs = np.array([hash_vector(doc(i)) for i in live], dtype=np.float32)
    q = np.array(hash_vector(text), dtype=np.float32)
    dist = ((vecs - q) ** 2).sum(axis=1)
    order = np.argsort(dist, kind="stable")[:k]
    return [f"n{live[j]}" for j in order], [float(dist[j]) for j in order]


# -- what the program answers ----------------------------------------------------------------


async def create_and_add(s: Server, r: range, metadata: dict[str, Any] | None = None) -> None:
    out = await s.call(
        "chroma_create_collection",
        collection_name=COLL,
        embedding_function_name=EF_NAME,
        metadata=metadata,
    )
    assert out.startswith(f"Successfully created collection {COLL}"), out
    await add(s, r)


async def add(s: Server, r: range) -> None:
    out = await s.call(
        "chroma_add_documents",
        collection_name=COLL,
        documents=[doc(i) for i in r],
        ids=ids_of(r),
        metadatas=[{"i": i} for i in r],
    )
    assert out.startswith(f"Successfully added {len(r)} documents"), out


async def answers(s: Server) -> dict[str, Any]:
    """Every read the test compares: queries, get of everything, count."""
    queries = await s.call(
        "chroma_query_documents", collection_name=COLL, query_texts=QUERIES, n_results=K
    )
    got = await s.call("chroma_get_documents", collection_name=COLL)
    count = await s.call("chroma_get_collection_count", collection_name=COLL)
    order = sorted(range(len(got["ids"])), key=lambda j: got["ids"][j])
    return {
        "ids": queries["ids"],
        "documents": queries["documents"],
        "metadatas": queries["metadatas"],
        "distances": queries["distances"],
        "get": [(got["ids"][j], got["documents"][j], got["metadatas"][j]) for j in order],
        "count": count,
    }


def assert_answers(got: dict[str, Any], live: range) -> None:
    """``got`` is exactly what a healthy Chroma holding ``live`` answers."""
    for qi, text in enumerate(QUERIES):
        ids, dists = expected_query(live, text)
        assert got["ids"][qi] == ids, f"query {text!r}"
        assert got["distances"][qi] == pytest.approx(dists, abs=1e-5), f"query {text!r}"
        assert got["documents"][qi] == [doc(int(i[1:])) for i in ids], f"query {text!r}"
        assert got["metadatas"][qi] == [{"i": int(i[1:])} for i in ids], f"query {text!r}"
    assert got["get"] == sorted((f"n{i}", doc(i), {"i": i}) for i in live)
    assert got["count"] == len(live)


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two runs gave the same answers: ids and documents equal, distances within 1e-5."""
    assert a["ids"] == b["ids"] and a["documents"] == b["documents"]
    assert a["metadatas"] == b["metadatas"] and a["get"] == b["get"]
    assert a["count"] == b["count"]
    for da, db in zip(a["distances"], b["distances"], strict=True):
        assert da == pytest.approx(db, abs=1e-5)


# -- which process holds what ---------------------------------------------------------------


def the_worker(s: Server, data_dir: str, *, own: bool = True) -> int:
    """The one process that has ``<data_dir>/chroma.sqlite3`` open, checked against the lock
    file and against the program: it is never the program or anything else of its tree.

    The check reads ``/proc/<pid>/fd`` and ``/proc/<pid>/maps`` of every process of the
    session's tree (the program, safechroma's template and workers), and of every process on
    the machine for ``chroma.sqlite3``. ``own``: the worker is this session's to end if it
    outlives the program (not when another program's session started it).
    """
    db = os.path.join(data_dir, "chroma.sqlite3")
    owners = holders(db)
    assert len(owners) == 1, f"{db} is open in {sorted(owners)}: one owner expected"
    (worker,) = owners
    if own:
        s.seen.add(worker)
    assert worker != s.program_pid, "the program itself opened chroma.sqlite3"
    with open(os.path.join(data_dir, ".safechroma.lock")) as f:
        lock_pid = f.read().split("\n")[0]
    assert lock_pid == str(worker), f"lock file names {lock_pid!r}, sqlite is held by {worker}"
    tree = s.track() | {s.program_pid}
    data_real = os.path.realpath(data_dir)
    for pid in tree - {worker}:
        touched = {
            p
            for p in open_files(pid) | mapped_files(pid)
            if p.startswith(data_real + os.sep)
            and not os.path.basename(p).startswith(".safechroma")
            and "/.safechroma/" not in p
        }
        who = "the program" if pid == s.program_pid else "not the worker"
        assert not touched, f"pid {pid} ({who}) has Chroma's files open: {sorted(touched)}"
    return worker


def killed(s: Server, data_dir: str, errlog: Path) -> tuple[int, int]:
    """SIGKILL the worker, wait until it is gone; returns its pid and the stderr line count
    before the kill."""
    worker = the_worker(s, data_dir)
    seen = len(stderr_lines(errlog))
    os.kill(worker, signal.SIGKILL)
    assert not wait_gone({worker}, 10.0)
    return worker, seen


def check_death_told(s: Server, data_dir: str, errlog: Path, worker: int, seen: int) -> None:
    """The program lives on, a new worker owns the directory, and stderr got one line about
    the death, naming the worker's pid and the signal."""
    assert alive(s.program_pid)
    assert the_worker(s, data_dir) != worker
    lines = new_events(errlog, seen)
    assert len(lines) == 1, f"one line per worker death, got {lines}"
    assert "SIGKILL" in lines[0] and str(worker) in lines[0], lines[0]


def native_core(pid: int) -> list[str]:
    """Chroma's Rust bindings as mapped into ``pid``'s memory (none: never loaded)."""
    return [m for m in mapped_files(pid) if "chromadb_rust_bindings" in os.path.basename(m)]


def new_events(errlog: Path, since: int) -> list[str]:
    """The program's stderr lines from safechroma since line ``since``."""
    return [ln for ln in stderr_lines(errlog)[since:] if ln.startswith("safechroma:")]


@contextlib.asynccontextmanager
async def program(
    launcher: tuple[str, str],
    data_dir: str,
    errlog: Path,
    *,
    safe: bool = True,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Server]:
    """One run of chroma-mcp on ``data_dir`` with an MCP session; on a normal exit, checks
    that nothing but MCP messages came out of its stdout (safechroma keeps the program's stdout
    its own: an MCP stdio server depends on it). chroma-mcp's own two ``print`` lines stay in
    its block-buffered stdout until it exits, and the client's SIGTERM discards them, so plain
    chroma-mcp sends none either."""
    argv = program_argv(launcher[0], data_dir, safe=safe)
    async with Server(argv, errlog, launcher[1], env=env) as s:
        yield s
        assert s.stdout == [], "lines on the program's stdout that are not MCP messages"


def run(fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn)


@pytest.fixture
def launcher(tmp_path: Path) -> tuple[str, str]:
    return write_launcher(tmp_path)


# -- the scenarios ---------------------------------------------------------------------------


def test_program_never_opens_chroma_sqlite(tmp_path: Path, launcher: tuple[str, str]) -> None:
    """Create a collection with the program's registered function, write, read: the answers
    are Chroma's, and only safechroma's worker ever has the directory's files open."""
    data = str(tmp_path / "db")
    errlog = tmp_path / "stderr.log"

    async def scenario() -> None:
        async with program(launcher, data, errlog) as s:
            # Before the first call: the program has created its client (chroma-mcp builds it
            # in main), so the directory is already open, by the worker.
            the_worker(s, data)
            await create_and_add(s, FIRST)
            assert_answers(await answers(s), FIRST)
            the_worker(s, data)
            await add(s, LATER)
            assert_answers(await answers(s), range(0, 50))
            the_worker(s, data)
            # /proc/<pid>/fd shows moments; this shows every moment: Chroma's native core was
            # never even loaded into the program, so it cannot have opened anything.
            assert not native_core(s.program_pid), "the program loaded Chroma's Rust core"

    run(scenario)
    assert new_events(errlog, 0) == [], "nothing died or was repaired"


def test_sigkilled_worker_same_answers_and_writes_land(
    tmp_path: Path, launcher: tuple[str, str]
) -> None:
    """SIGKILL the worker three times: between calls, then the next call is a read (same
    answers: the registered embedding function works in the new worker); between calls, then
    a write (it lands); during a call (a read: answered right). Each death is one line on
    stderr naming the pid and the signal."""
    data = str(tmp_path / "db")
    errlog = tmp_path / "stderr.log"

    async def scenario() -> None:
        async with program(launcher, data, errlog) as s:
            await create_and_add(s, FIRST)
            before = await answers(s)
            assert_answers(before, FIRST)

            worker, seen = killed(s, data, errlog)
            assert_same(await answers(s), before)
            await add(s, LATER)
            assert_answers(await answers(s), range(0, 50))
            check_death_told(s, data, errlog, worker, seen)

            worker, seen = killed(s, data, errlog)
            await add(s, MORE)
            assert_answers(await answers(s), range(0, 60))
            check_death_told(s, data, errlog, worker, seen)

            # The third death comes with a call in flight: the worker is stopped first, so the
            # program's next call is surely waiting on it when it dies.
            worker = the_worker(s, data)
            seen = len(stderr_lines(errlog))
            got: dict[str, Any] = {}

            async def ask() -> None:
                got.update(await answers(s))

            os.kill(worker, signal.SIGSTOP)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(ask)
                    await anyio.sleep(1.0)
                    assert not got, "answered by a stopped worker?"
                    os.kill(worker, signal.SIGKILL)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)
            assert_answers(got, range(0, 60))
            check_death_told(s, data, errlog, worker, seen)
            assert not native_core(s.program_pid), "the program loaded Chroma's Rust core"

    run(scenario)


def test_restart_reads_everything_back(tmp_path: Path, launcher: tuple[str, str]) -> None:
    """Write, end the program, start it again: everything reads back and writes land; twice,
    once ended as the mcp client ends a server (SIGTERM), once killed (SIGKILL, as when the MCP
    host is force-quit). Each restart finds every earlier process gone, so its worker is new and
    has never seen the program's embedding function."""
    data = str(tmp_path / "db")
    errlog = tmp_path / "stderr.log"
    first: dict[str, Any] = {}

    async def write_then_read() -> None:
        async with program(launcher, data, errlog) as s:
            await create_and_add(s, FIRST)
            first.update(await answers(s))
        assert_answers(first, FIRST)

    async def restarted_then_killed() -> None:
        async with program(launcher, data, errlog) as s:
            assert_same(await answers(s), first)
            await add(s, LATER)
            assert_answers(await answers(s), range(0, 50))
            the_worker(s, data)
            os.kill(s.program_pid, signal.SIGKILL)
            assert not wait_gone({s.program_pid}, 10.0)

    async def restarted_again() -> None:
        async with program(launcher, data, errlog) as s:
            assert_answers(await answers(s), range(0, 50))
            await add(s, MORE)
            assert_answers(await answers(s), range(0, 60))
            the_worker(s, data)

    run(write_then_read)
    run(restarted_then_killed)
    # The killed program's worker let go of the directory (Server's exit waits for every
    # process of the run, and fails naming any still alive after GRACE seconds).
    assert not holders(os.path.join(data, "chroma.sqlite3"))
    run(restarted_again)
    assert new_events(errlog, 0) == [], "nothing died or was repaired"


def test_index_that_kills_plain_chroma_mcp(tmp_path: Path, launcher: tuple[str, str]) -> None:
    """A level-0 neighbour id past the end of the index (CHROMA_FACTS §3): plain chroma-mcp
    dies with SIGSEGV on the first query; under ``safechroma run`` every query on a copy of the
    same directory answers as plain chroma-mcp did before the damage, and writes land; plain
    chroma-mcp then reads the repaired directory. The same damage made while the program runs
    is repaired when its worker dies."""
    healthy = str(tmp_path / "healthy")
    errlog = tmp_path / "stderr.log"
    baseline: dict[str, Any] = {}

    async def build_with_plain() -> None:
        async with program(launcher, healthy, tmp_path / "build.log", safe=False) as s:
            # A small sync threshold (chroma-mcp passes collection metadata through) makes
            # Chroma write the HNSW index to disk with a few dozen records, as it does with
            # 1000 by default; the damage below is to those files.
            await create_and_add(s, FIRST, {"hnsw:sync_threshold": 10, "hnsw:batch_size": 10})
            baseline.update(await answers(s))

    run(build_with_plain)
    assert_answers(baseline, FIRST)
    seg = cd.segment_dir(healthy, COLL)
    assert os.path.exists(os.path.join(seg, "index_metadata.pickle")), "index never flushed"
    damaged = str(tmp_path / "damaged")
    shutil.copytree(healthy, damaged)
    cd.corrupt(damaged, "level0_neighbor_oob", collection=COLL)
    for_safe = str(tmp_path / "for-safe")
    shutil.copytree(damaged, for_safe)

    plain_log = tmp_path / "plain-stderr.log"

    async def plain_on_damaged() -> None:
        env = {"PYTHONFAULTHANDLER": "1"}
        async with program(launcher, damaged, plain_log, safe=False, env=env) as s:
            assert await s.call("chroma_get_collection_count", collection_name=COLL) == 40
            with pytest.raises(ServerDied):
                await s.call(
                    "chroma_query_documents", collection_name=COLL, query_texts=QUERIES[:1]
                )

    run(plain_on_damaged)
    assert "Fatal Python error: Segmentation fault" in plain_log.read_text()

    async def safe_on_damaged() -> None:
        async with program(launcher, for_safe, errlog) as s:
            assert_same(await answers(s), baseline)
            assert_answers(await answers(s), FIRST)
            await add(s, LATER)
            assert_answers(await answers(s), range(0, 50))
            the_worker(s, for_safe)
            assert alive(s.program_pid)

    run(safe_on_damaged)
    # The repair was told to the user, on stderr.
    told = new_events(errlog, 0)
    assert any(ln.startswith(f"safechroma: repaired {for_safe}") for ln in told), told

    async def plain_after_repair() -> None:
        # The repair is on disk: the user can go back to plain chroma-mcp.
        async with program(launcher, for_safe, tmp_path / "after.log", safe=False) as s:
            assert_answers(await answers(s), range(0, 50))

    run(plain_after_repair)

    # The same damage arriving under a running program (a disk error, another tool): the
    # worker holds the index in memory and answers on; once it dies, the next worker would
    # load the damaged files, so the restart must find and repair them.
    live = str(tmp_path / "live")
    shutil.copytree(healthy, live)
    live_log = tmp_path / "live.log"

    async def damaged_under_running_program() -> None:
        async with program(launcher, live, live_log) as s:
            assert_same(await answers(s), baseline)
            cd.corrupt(live, "level0_neighbor_oob", collection=COLL)
            worker, seen = killed(s, live, live_log)
            assert_same(await answers(s), baseline)
            await add(s, LATER)
            assert_answers(await answers(s), range(0, 50))
            assert the_worker(s, live) != worker
            told = new_events(live_log, seen)
            assert any(ln.startswith(f"safechroma: repaired {live}") for ln in told), told

    run(damaged_under_running_program)


def test_two_programs_share_one_worker(tmp_path: Path, launcher: tuple[str, str]) -> None:
    """Two chroma-mcp servers on one directory at once (two MCP hosts, say): one Chroma
    serves both, and each sees the other's writes (CHROMA_FACTS §4: two plain Chromas on one
    directory lose writes silently)."""
    data = str(tmp_path / "db")
    errlog = tmp_path / "stderr.log"

    async def scenario() -> None:
        async with program(launcher, data, errlog) as a:
            await create_and_add(a, FIRST)
            worker = the_worker(a, data)
            async with program(launcher, data, errlog) as b:
                assert the_worker(b, data, own=False) == worker
                assert_answers(await answers(b), FIRST)
                await add(b, LATER)
                assert_answers(await answers(a), range(0, 50))
                await add(a, MORE)
                assert_answers(await answers(b), range(0, 60))
                assert the_worker(b, data, own=False) == worker
            # The first program goes on after the second one left.
            assert_answers(await answers(a), range(0, 60))
            assert the_worker(a, data) == worker

    run(scenario)
    assert new_events(errlog, 0) == [], "nothing died or was repaired"


# -- every tool, against plain chroma-mcp ------------------------------------------------------

# Every chroma-mcp tool, with the errors a user meets: (tool, arguments).
TOOL_SCRIPT: list[tuple[str, dict[str, Any]]] = [
    ("chroma_list_collections", {}),
    ("chroma_create_collection", {"collection_name": COLL, "embedding_function_name": EF_NAME}),
    ("chroma_create_collection", {"collection_name": COLL, "embedding_function_name": EF_NAME}),
    (
        "chroma_add_documents",
        {
            "collection_name": COLL,
            "documents": [doc(i) for i in range(12)],
            "ids": ids_of(range(12)),
            "metadatas": [{"i": i, "topic": TOPICS[i % len(TOPICS)]} for i in range(12)],
        },
    ),
    ("chroma_add_documents", {"collection_name": COLL, "documents": ["x"], "ids": ["n3"]}),
    ("chroma_get_collection_count", {"collection_name": COLL}),
    ("chroma_peek_collection", {"collection_name": COLL, "limit": 3}),
    ("chroma_get_collection_info", {"collection_name": COLL}),
    (
        "chroma_query_documents",
        {"collection_name": COLL, "query_texts": QUERIES[:2], "where": {"i": {"$gt": 3}}},
    ),
    (
        "chroma_query_documents",
        {
            "collection_name": COLL,
            "query_texts": QUERIES[2:4],
            "n_results": 3,
            "where_document": {"$contains": "sqlite"},
            "include": ["documents", "distances", "embeddings"],
        },
    ),
    (
        "chroma_query_documents",
        {"collection_name": COLL, "query_texts": ["q"], "where": {"i": {"$bogus": 1}}},
    ),
    (
        "chroma_get_documents",
        {"collection_name": COLL, "ids": ["n1", "n2"], "include": ["embeddings", "metadatas"]},
    ),
    ("chroma_get_documents", {"collection_name": COLL, "where": {"topic": "hnsw"}, "limit": 1}),
    ("chroma_update_documents", {"collection_name": COLL, "ids": ["n1"], "documents": ["new"]}),
    (
        "chroma_update_documents",
        {"collection_name": COLL, "ids": ["n4"], "embeddings": [[0.5] * DIM]},
    ),
    ("chroma_get_documents", {"collection_name": COLL, "ids": ["n1", "n4"]}),
    ("chroma_query_documents", {"collection_name": COLL, "query_texts": ["new"], "n_results": 2}),
    ("chroma_delete_documents", {"collection_name": COLL, "ids": ["n2", "nope"]}),
    ("chroma_get_collection_count", {"collection_name": COLL}),
    ("chroma_modify_collection", {"collection_name": COLL, "new_metadata": {"k": "v"}}),
    ("chroma_modify_collection", {"collection_name": COLL, "new_name": "renamed"}),
    ("chroma_fork_collection", {"collection_name": "renamed", "new_collection_name": "f"}),
    ("chroma_get_documents", {"collection_name": COLL}),
    ("chroma_list_collections", {}),
    ("chroma_delete_collection", {"collection_name": "renamed"}),
    ("chroma_delete_collection", {"collection_name": "renamed"}),
    ("chroma_list_collections", {}),
]


def _sorted_dict(match: re.Match[str]) -> str:
    try:
        value = ast.literal_eval(match.group(0))
    except (ValueError, SyntaxError):
        return match.group(0)
    return repr(dict(sorted(value.items()))) if isinstance(value, dict) else match.group(0)


def canonical(text: str) -> str:
    """Mask object addresses, and sort the keys of flat dicts in a ``repr``: chroma-mcp falls
    back to ``str(result)`` when a result holds numpy arrays, and Chroma's metadata dicts come
    back in a different key order in each process, plain or not (a Rust ``HashMap``)."""
    text = re.sub(r" at 0x[0-9a-f]+", " at 0x?", text)
    return re.sub(r"\{[^{}]*\}", _sorted_dict, text)


async def play(s: Server) -> list[tuple[str, Any]]:
    """Run :data:`TOOL_SCRIPT`; each step's answer or error text, made :func:`canonical`."""
    out: list[tuple[str, Any]] = []
    for tool, arguments in TOOL_SCRIPT:
        try:
            result: Any = ("ok", await s.call(tool, **arguments))
        except ToolError as exc:
            result = ("error", str(exc))
        if isinstance(result[1], str):
            result = (result[0], canonical(result[1]))
        out.append(result)
    return out


def test_every_tool_answers_as_on_plain_chroma_mcp(
    tmp_path: Path, launcher: tuple[str, str]
) -> None:
    """Every chroma-mcp tool, errors included, gives under ``safechroma run`` exactly what it
    gives on plain chromadb: results, exception messages, embeddings (a proxy that changed a
    type or a message would show here, as the MCP client sees it)."""
    got: dict[bool, list[tuple[str, Any]]] = {}

    async def scenario(safe: bool) -> None:
        data = str(tmp_path / ("safe" if safe else "plain"))
        async with program(launcher, data, tmp_path / f"{safe}.log", safe=safe) as s:
            got[safe] = await play(s)

    run(lambda: scenario(False))
    run(lambda: scenario(True))
    plain, safe = got[False], got[True]
    assert [kind for kind, _ in plain].count("error") >= 5  # the script does meet errors
    for step, (a, b) in enumerate(zip(plain, safe, strict=True)):
        assert a == b, f"step {step} {TOOL_SCRIPT[step][0]}"
