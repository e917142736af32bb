"""The normal path (issue 2): drop-in API, same results and errors, one owner per directory."""

from __future__ import annotations

import inspect
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import chromadb
import chromadb.errors
import numpy as np
import pytest
from chromadb.api.client import Client
from chromadb.api.models.Collection import Collection
from conftest import DIM, HashEmbedding, child_pids, vectors
from twin import run_ops

import safechroma
from safechroma import (
    ClientClosedError,
    DirectoryLockedError,
    ProtocolError,
    SafeClient,
    SafeCollection,
)

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def test_public_surface_is_exactly_all() -> None:
    public = {n for n in dir(safechroma) if not n.startswith("_")}
    assert public == set(safechroma.__all__) - {"__version__"}
    assert safechroma.__all__ == sorted(safechroma.__all__)
    assert set(safechroma._EXPORTS) | {"__version__"} == set(safechroma.__all__)
    for name in safechroma.__all__:
        assert getattr(safechroma, name) is not None


def test_import_is_cheap_and_does_not_load_chromadb() -> None:
    """The worker's parent-death watchdog and ``safechroma check`` rely on this."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, safechroma, safechroma.storage.validate, safechroma.runtime.worker; "
            "print('chromadb' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    "name",
    sorted(
        n for n in dir(Collection) if not n.startswith("_") and callable(getattr(Collection, n))
    ),
)
def test_collection_method_signatures_match_chromadb(name: str) -> None:
    assert inspect.signature(getattr(SafeCollection, name)) == inspect.signature(
        getattr(Collection, name)
    )


def test_collection_properties_are_chromadbs() -> None:
    props = [
        n for n in dir(Collection) if isinstance(inspect.getattr_static(Collection, n), property)
    ]
    assert {"name", "id", "metadata", "configuration"} <= set(props)
    for name in props:
        assert inspect.getattr_static(SafeCollection, name) is inspect.getattr_static(
            Collection, name
        )


@pytest.mark.parametrize(
    "name",
    sorted(
        n
        for n in dir(chromadb.api.ClientAPI)
        if not n.startswith("_") and callable(getattr(chromadb.api.ClientAPI, n))
    ),
)
def test_client_method_signatures_match_chromadb(name: str) -> None:
    ours = inspect.signature(getattr(SafeClient, name))
    theirs = inspect.signature(getattr(Client, name))
    assert list(ours.parameters) == list(theirs.parameters)
    for p, q in zip(ours.parameters.values(), theirs.parameters.values(), strict=False):
        assert (p.kind, p.default) == (q.kind, q.default), name


def _sequence() -> list[tuple[str, str, tuple[Any, ...], dict[str, Any]]]:
    emb = vectors(30, 4, seed=1).tolist()
    q = vectors(2, 4, seed=2).tolist()
    return [
        ("client", "heartbeat_is_int", (), {}),  # unknown method: AttributeError both sides
        ("client", "count_collections", (), {}),
        ("client", "create_collection", ("alpha",), {"embedding_function": None}),
        ("client", "create_collection", ("alpha",), {"embedding_function": None}),  # duplicate
        ("client", "create_collection", ("a",), {"embedding_function": None}),  # invalid name
        (
            "client",
            "create_collection",
            ("beta",),
            {"embedding_function": None, "metadata": {"hnsw:space": "cosine", "k": 1}},
        ),
        ("client", "get_collection", ("missing",), {"embedding_function": None}),
        ("client", "get_or_create_collection", ("alpha",), {"embedding_function": None}),
        ("client", "list_collections", (), {}),
        ("client", "count_collections", (), {}),
        (
            "alpha",
            "add",
            (),
            {
                "ids": [f"id{i}" for i in range(30)],
                "embeddings": emb,
                "documents": [f"doc {i}" for i in range(30)],
                "metadatas": [{"i": i, "even": i % 2 == 0} for i in range(30)],
            },
        ),
        ("alpha", "add", (), {"ids": ["bad"], "embeddings": [[1.0, 2.0]]}),  # wrong dimension
        ("alpha", "add", (), {"ids": ["x", "x"], "embeddings": [[0.0] * 4, [0.0] * 4]}),
        ("alpha", "add", (), {"ids": ["y"]}),  # neither embeddings nor documents
        ("alpha", "count", (), {}),
        (
            "alpha",
            "get",
            (),
            {"ids": ["id1", "id2", "nope"], "include": ["documents", "metadatas", "embeddings"]},
        ),
        ("alpha", "get", (), {"where": {"i": {"$gte": 25}}}),
        ("alpha", "get", (), {"where": {"i": {"$bogus": 1}}}),  # bad where operator
        ("alpha", "get", (), {"where": {"$and": [{"even": True}, {"i": {"$lt": 6}}]}}),
        ("alpha", "get", (), {"where_document": {"$contains": "doc 1"}, "limit": 5}),
        ("alpha", "get", (), {"include": ["nonsense"]}),
        ("alpha", "get", (), {"limit": 3, "offset": 2}),
        ("alpha", "peek", (), {"limit": 4}),
        ("alpha", "query", (), {"query_embeddings": q, "n_results": 3}),
        (
            "alpha",
            "query",
            (),
            {
                "query_embeddings": q,
                "n_results": 3,
                "where": {"even": False},
                "include": ["distances", "embeddings"],
            },
        ),
        ("alpha", "query", (), {"query_embeddings": [[1.0, 2.0]], "n_results": 3}),
        ("alpha", "query", (), {"query_embeddings": q, "n_results": 0}),
        (
            "alpha",
            "update",
            (),
            {
                "ids": ["id3"],
                "embeddings": emb[5:6],
                "documents": ["changed"],
                "metadatas": [{"i": -3}],
            },
        ),
        ("alpha", "update", (), {"ids": ["ghost"], "metadatas": [{"i": 0}]}),
        (
            "alpha",
            "upsert",
            (),
            {"ids": ["id4", "new"], "embeddings": emb[:2], "documents": ["four", "new"]},
        ),
        ("alpha", "get", (), {"ids": ["id3", "id4", "new"]}),
        ("alpha", "delete", (), {"ids": ["id5", "id6"]}),
        ("alpha", "delete", (), {"where": {"i": {"$gt": 27}}}),
        ("alpha", "delete", (), {}),  # nothing to select
        ("alpha", "count", (), {}),
        ("alpha", "modify", (), {"metadata": {"owner": "me"}}),
        ("alpha", "count", (), {"read_level": "bogus"}),
        ("alpha", "add", ("positional-but-wrong", 1, 2, 3, 4, 5, 6, 7), {}),  # TypeError
        ("alpha", "fork", ("alpha2",), {}),  # not in local chroma
        ("alpha", "get_indexing_status", (), {}),
        ("client", "delete_collection", ("beta",), {}),
        ("client", "delete_collection", ("beta",), {}),
        ("client", "list_collections", (), {}),
        ("client", "get_max_batch_size", (), {}),
        ("client", "reset", (), {}),  # not allowed by default settings
    ]


def test_same_outcomes_as_chromadb_on_twin_directories(tmp_path: Path) -> None:
    """Same calls, same results and same exception types, including invalid input."""
    ops = _sequence()
    ops_file, out_file = tmp_path / "ops.pkl", tmp_path / "out.pkl"
    ops_file.write_bytes(pickle.dumps(ops))
    subprocess.run(
        [
            sys.executable,
            str(TESTS / "twin.py"),
            str(ops_file),
            str(tmp_path / "direct"),
            str(out_file),
        ],
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
        capture_output=True,
    )
    direct = pickle.loads(out_file.read_bytes())
    with SafeClient(tmp_path / "safe", validator=None) as client:
        pid = client.stats().worker_pid
        safe = run_ops(client, ops)
        assert client.stats().worker_pid == pid, "errors must not cost the worker"
    assert len(safe) == len(direct) == len(ops)
    for op, s, d in zip(ops, safe, direct, strict=False):
        assert s == d, op
    errors = [d for d in direct if d[0] == "error"]
    assert len(errors) >= 15  # the sequence really exercises invalid input


def test_chroma_errors_arrive_as_chromas_types_with_remote_traceback(db: str) -> None:
    with SafeClient(db, validator=None) as client:
        with pytest.raises(chromadb.errors.NotFoundError, match="does not exist") as info:
            client.get_collection("nothere", embedding_function=None)
        assert "Traceback" in str(info.value.__cause__)
        col = client.create_collection("things", embedding_function=None)
        col.add(ids=["a"], embeddings=[[1.0, 2.0]])
        with pytest.raises(chromadb.errors.InvalidArgumentError, match="dimension"):
            col.add(ids=["b"], embeddings=[[1.0, 2.0, 3.0]])
        with pytest.raises(ValueError):
            col.get(where={"x": {"$nope": 1}})
        assert col.count() == 1


def test_results_are_chromadbs_shapes_and_arrays_survive(db: str) -> None:
    emb = vectors(2000, 1536, seed=3)
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("big", embedding_function=None)
        col.add(ids=[str(i) for i in range(2000)], embeddings=emb)
        got = col.get(ids=["0", "1999"], include=["embeddings"])
        assert isinstance(got["embeddings"], np.ndarray)
        np.testing.assert_allclose(got["embeddings"], emb[[0, 1999]], rtol=1e-6)
        res = col.query(query_embeddings=emb[:16], n_results=1, include=["distances"])
        assert [ids[0] for ids in res["ids"]] == [str(i) for i in range(16)]
        everything = col.get(include=["embeddings"])
        assert everything["embeddings"].shape == (2000, 1536)


def test_collection_is_a_chromadb_collection_with_live_model(db: str) -> None:
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("model", embedding_function=None, metadata={"a": 1})
        assert isinstance(col, Collection)
        assert col.metadata == {"a": 1}
        assert col.configuration_json["hnsw"]["space"] == "l2"
        col.modify(name="renamed", metadata={"b": 2})
        assert (col.name, col.metadata) == ("renamed", {"b": 2})
        again = client.get_collection("renamed", embedding_function=None)
        assert again.id == col.id and again.metadata == {"b": 2}
        assert client.get_collection_by_id(col.id, embedding_function=None).name == "renamed"


def test_embedding_function_from_test_module_and_lambda_run_in_worker(db: str) -> None:
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("efs", embedding_function=HashEmbedding())
        col.add(ids=["a", "b"], documents=["apple pie", "bicycle"])
        res = col.query(query_texts=["bicycle"], n_results=1)
        assert res["ids"] == [["b"]]
        pid = client.stats().worker_pid
        where = client.run_in_worker(lambda _c: os.getpid())
        assert where == pid != os.getpid()


def test_embedding_function_defined_in_main_script(tmp_path: Path) -> None:
    """An EF class defined in __main__ (no import guard) is carried by value to the worker."""
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SRC)!r})
        from safechroma import SafeCollection
        from chromadb.api.types import EmbeddingFunction

        class MyEF(EmbeddingFunction):
            def __init__(self):
                pass
            def __call__(self, input):
                return [[float(len(t)), 1.0, 0.5] for t in input]
            @staticmethod
            def name():
                return "my-ef"
            def get_config(self):
                return {{}}
            @staticmethod
            def build_from_config(config):
                return MyEF()

        with SafeCollection({str(tmp_path / "db")!r}, "docs", embedding_function=MyEF(),
                            validator=None) as col:
            col.add(ids=["s", "long"], documents=["ab", "abcdefghij"])
            print(col.query(query_texts=["abcdefghi"], n_results=1)["ids"][0][0])
    """)
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "long"


def test_many_threads_at_once(db: str) -> None:
    with SafeClient(db, validator=None) as client:
        col = client.create_collection("threads", embedding_function=None)
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                for i in range(20):
                    col.add(ids=[f"{t}-{i}"], embeddings=vectors(1, DIM, seed=t * 100 + i))
                    assert col.get(ids=[f"{t}-{i}"])["ids"] == [f"{t}-{i}"]
                    col.query(query_embeddings=vectors(1, DIM, seed=i), n_results=1)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert col.count() == 160


def test_clients_on_one_path_share_one_worker(db: str) -> None:
    with SafeClient(db, validator=None) as a, SafeClient(db) as b:
        assert a.stats().worker_pid == b.stats().worker_pid
        a.create_collection("shared", embedding_function=None).add(ids=["1"], embeddings=[[1.0]])
        assert b.get_collection("shared", embedding_function=None).count() == 1
        a.close()
        assert b.heartbeat() > 0  # b still owns the worker
        with pytest.raises(ClientClosedError):
            a.heartbeat()


def test_standalone_collection_owns_its_worker(db: str) -> None:
    with SafeCollection(db, "solo", embedding_function=None, validator=None) as col:
        col.add(ids=["1"], embeddings=[[1.0, 0.0]])
        pid = col._client.stats().worker_pid
        assert pid in child_pids()
    deadline = time.monotonic() + 5
    while pid in child_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid not in child_pids()
    with pytest.raises(chromadb.errors.NotFoundError):
        SafeCollection(db, "absent", create=False, embedding_function=None, validator=None)
    with SafeCollection(db, "solo", create=False, embedding_function=None) as col:
        assert col.count() == 1


_HOLDER = """
import sys, time
sys.path.insert(0, {src!r})
from safechroma import SafeClient
c = SafeClient({db!r}, validator=None, exclusive=True)
standby = c._sup.standby.pid if c._sup.standby else 0
print(c.stats().worker_pid, standby, flush=True)
time.sleep({hold})
"""


def test_second_program_is_refused_cleanly_by_an_exclusive_owner(db: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(src=str(SRC), db=db, hold=60)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        holder.stdout.readline()
        start = time.monotonic()
        with pytest.raises(DirectoryLockedError) as info:
            SafeClient(db, validator=None)
        assert time.monotonic() - start < 2.0
        assert info.value.path == os.path.realpath(db)
        assert "lock_timeout" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def test_waiting_for_the_lock_succeeds_when_the_owner_leaves(db: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(src=str(SRC), db=db, hold=1.5)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        holder.stdout.readline()
        with SafeClient(db, validator=None, lock_timeout=60) as client:
            assert client.heartbeat() > 0
    finally:
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def test_parent_killed_leaves_no_worker_and_releases_the_lock(db: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(src=str(SRC), db=db, hold=60)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    workers = [int(p) for p in holder.stdout.readline().split() if int(p)]
    holder.stdout.close()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    # "Within a second or two": 3 s of slack for a loaded 2-core CI machine.
    deadline = time.monotonic() + 3.0
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()], "a worker outlived its parent"
    with SafeClient(db, validator=None) as client:  # the lock is free again, at once
        assert client.heartbeat() > 0


class Evil:
    """A class the caller never allows a worker to name in a reply."""

    def __reduce__(self) -> Any:
        return (os.system, ("echo pwned > /tmp/safechroma-pwned",))


def test_reply_naming_a_forbidden_global_is_refused(db: str) -> None:
    """Hostile input: a worker answering with a pickle that would run code."""
    with SafeClient(db, validator=None) as client:
        pid = client.stats().worker_pid
        with pytest.raises(ProtocolError, match="forbidden global"):
            client.run_in_worker(lambda _c: Evil())
        assert not Path("/tmp/safechroma-pwned").exists()
        assert client.heartbeat() > 0
        assert client.stats().worker_pid != pid


def test_get_settings_is_chromadbs(db: str) -> None:
    with SafeClient(db, validator=None) as client:
        s = client.get_settings()
        assert s.is_persistent and s.persist_directory == db
        assert client.get_version() == chromadb.__version__


def test_function_the_worker_cannot_decode_runs_in_the_caller_not_a_death(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: an embedding function pickled by reference to a module the worker cannot
    import used to kill the worker's loop. Then it was the call's error; now (issue 20) the
    function runs in the caller, only vectors are sent, and a warning names it."""
    with SafeClient(db, validator=None) as client:
        pid = client.stats().worker_pid
        (tmp_path / "late_module.py").write_text(
            textwrap.dedent("""
            from chromadb.api.types import EmbeddingFunction
            class LateEF(EmbeddingFunction):
                def __init__(self): pass
                def __call__(self, input): return [[1.0, 2.0] for _ in input]
        """)
        )
        monkeypatch.syspath_prepend(str(tmp_path))  # after the worker started: it lacks it
        import late_module  # type: ignore[import-not-found]

        col = client.create_collection("late", embedding_function=late_module.LateEF())
        assert "LateEF cannot run in the worker" in caplog.text
        assert "late_module" in caplog.text
        col.add(ids=["a", "b"], documents=["x", "y"])
        got = col.get(include=["embeddings", "documents"])
        assert got["documents"] == ["x", "y"]
        assert got["embeddings"].tolist() == [[1.0, 2.0], [1.0, 2.0]]
        # Both records have the same vector: which one comes first is Chroma's choice.
        assert sorted(col.query(query_texts=["z"], n_results=2)["ids"][0]) == ["a", "b"]
        assert client.stats().worker_pid == pid
        assert client.heartbeat() > 0


def test_client_used_after_fork_refuses_instead_of_sharing_the_socket(db: str) -> None:
    with SafeClient(db, validator=None) as client:
        client.heartbeat()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the forked child
            try:
                client.heartbeat()
                os._exit(1)
            except safechroma.SafeChromaError as exc:
                os._exit(0 if "fork" in str(exc) else 2)
            except BaseException:
                os._exit(3)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client.heartbeat() > 0  # the parent's channel is untouched


def test_reset_when_settings_allow_it_keeps_the_directory_locked(db: str) -> None:
    from chromadb.config import Settings

    with SafeClient(db, Settings(allow_reset=True), validator=None, exclusive=True) as client:
        client.create_collection("gone", embedding_function=None).add(ids=["1"], embeddings=[[1.0]])
        assert client.reset() is True
        assert client.list_collections() == []
        assert (Path(db) / ".safechroma.lock").exists()
        other = subprocess.run(  # a second program is still refused after the reset
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(SRC)!r}); "
                f"from safechroma import SafeClient; SafeClient({db!r}, validator=None)",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode == 1 and "DirectoryLockedError" in other.stderr


def test_add_of_existing_ids_is_ignored_and_leaves_no_wal_row(db: str) -> None:
    """Regression (issue 7 soak): Chroma ignores an add of an existing id but kept the row in
    its WAL, and a replay after a worker death was seen to give the record that ignored vector.
    The worker now sends only new ids; what the caller sees is chromadb's behaviour."""
    import sqlite3

    with SafeClient(db, validator=None) as client:
        col = client.create_collection("dups", embedding_function=None)
        col.add(ids=["x", "y"], embeddings=[[1.0, 0.0], [0.0, 1.0]], documents=["x1", "y1"])
        col.add(ids=["x", "z"], embeddings=[[9.0, 9.0], [0.5, 0.5]], documents=["x2", "z1"])
        col.add(ids=["y"], embeddings=[[7.0, 7.0]], documents=["y2"])  # nothing new: no call
        got = col.get(ids=["x", "y", "z"], include=["documents", "embeddings"])
        assert dict(zip(got["ids"], got["documents"], strict=True)) == {
            "x": "x1",
            "y": "y1",
            "z": "z1",
        }
        assert np.allclose(got["embeddings"][got["ids"].index("x")], [1.0, 0.0])
        with pytest.raises(chromadb.errors.InvalidArgumentError, match="dimension"):
            col.add(ids=["x"], embeddings=[[1.0, 2.0, 3.0]])  # still validated like chromadb
        con = sqlite3.connect(f"file:{db}/chroma.sqlite3?mode=ro", uri=True)
        try:
            rows = dict(con.execute("SELECT id, count(*) FROM embeddings_queue GROUP BY id"))
        finally:
            con.close()
        assert rows == {"x": 1, "y": 1, "z": 1}
