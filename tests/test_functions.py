"""Embedding functions in the worker: registered, sent once, or run in the caller (issue 20).

Real workers, real SIGKILLs. The program-like cases (a class registered in ``__main__``, a
local class holding a lock and a native handle) run as real programs in child processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ef_module
import pytest
from conftest import run_plain_chromadb

from safechroma import SafeClient


def _kill_worker(client: SafeClient) -> None:
    pid = client.stats().worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)


def _program(tmp_path: Path, code: str, *args: str) -> dict:  # type: ignore[type-arg]
    script = tmp_path / f"prog{len(list(tmp_path.glob('prog*.py')))}.py"
    script.write_text(textwrap.dedent(code))
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# A program whose embedding function exists only in its own code (its __main__), registered
# with chromadb's decorator, as chroma-mcp offers its models.
PROGRAM = """
import hashlib, json, os, signal, sys, time
import numpy as np
from chromadb.api.types import EmbeddingFunction
from chromadb.utils.embedding_functions import register_embedding_function
from safechroma import SafeClient

@register_embedding_function
class HashEF(EmbeddingFunction):
    def __init__(self, dim=8):
        self.dim = dim
    def __call__(self, input):
        return [np.asarray([b / 255.0 for b in hashlib.sha256(t.encode()).digest()[:self.dim]],
                           dtype=np.float32) for t in input]
    @staticmethod
    def name():
        return "hash_ef"
    def get_config(self):
        return {"dim": self.dim}
    @staticmethod
    def build_from_config(config):
        return HashEF(config["dim"])
    def is_legacy(self):
        return False

db, step = sys.argv[1], sys.argv[2]
out = {}
with SafeClient(db) as client:
    if step == "write":
        col = client.get_or_create_collection("registered", embedding_function=HashEF())
        col.add(ids=["apple", "bike"], documents=["apple pie", "bicycle"])
        out["before"] = col.query(query_texts=["bicycle"], n_results=1)["ids"]
        os.kill(client.stats().worker_pid, signal.SIGKILL)
        time.sleep(0.2)
        # chroma-mcp's way: no function passed; chromadb rebuilds it from the record.
        col = client.get_collection("registered")
        out["after_kill"] = col.query(query_texts=["apple pie"], n_results=1)["ids"]
        col.add(ids=["car"], documents=["car"])
    else:
        col = client.get_collection("registered")
        out["restart"] = col.query(query_texts=["car"], n_results=1)["ids"]
        out["count"] = col.count()
print(json.dumps(out))
"""


def test_a_function_registered_in_the_program_survives_respawn_and_restart(
    tmp_path: Path, db: str
) -> None:
    """Pins issue 20: 'Embedding function hash_ef not found' after a respawn and a restart."""
    first = _program(tmp_path, PROGRAM, db, "write")
    assert first == {"before": [["bike"]], "after_kill": [["apple"]]}
    again = _program(tmp_path, PROGRAM, db, "read")
    assert again == {"restart": [["car"]], "count": 3}
    # What the worker stored is what the function computes, as plain chromadb would store it.
    stored = json.loads(
        run_plain_chromadb(
            """
            import json
            got = chromadb.PersistentClient(path).get_collection(
                "registered", embedding_function=None).get(ids=["car"], include=["embeddings"])
            print(json.dumps(got["embeddings"].tolist()))
            """,
            db,
        )
    )
    assert stored == [pytest.approx(ef_module.hash_vector("car"), abs=1e-6)]


LOCAL = """
import ctypes, json, os, signal, sys, threading, time
import numpy as np
from chromadb.api.types import EmbeddingFunction
from safechroma import SafeClient

def make_function():
    class Session:  # a live native handle, as an ONNX session holds
        def __init__(self):
            self.buffer = ctypes.create_string_buffer(64)

    class LocalEF(EmbeddingFunction):
        def __init__(self):
            self.lock = threading.RLock()
            self.session = Session()
        def __call__(self, input):
            with self.lock:
                return [np.asarray([len(t), t.count("a"), 1.0], dtype=np.float32) for t in input]
    return LocalEF()

db = sys.argv[1]
with SafeClient(db) as client:
    col = client.get_or_create_collection("local", embedding_function=make_function())
    col.add(ids=["x", "y"], documents=["a", "banana"])
    q1 = col.query(query_texts=["banana"], n_results=1)["ids"]
    os.kill(client.stats().worker_pid, signal.SIGKILL)
    time.sleep(0.2)
    col.upsert(ids=["z"], documents=["aaaaaaa"])
    q2 = col.query(query_texts=["aaaaaaa"], n_results=1)["ids"]
    emb = col.get(ids=["y"], include=["embeddings"])["embeddings"].tolist()
print(json.dumps({"q1": q1, "q2": q2, "emb": emb}))
"""


def test_a_function_that_cannot_travel_runs_in_the_caller(tmp_path: Path, db: str) -> None:
    """A class defined inside a function, holding a lock and a native handle: never a
    pickling TypeError; its vectors are computed in the caller, before and after a death."""
    got = _program(tmp_path, LOCAL, db)
    assert got == {"q1": [["y"]], "q2": [["z"]], "emb": [[6.0, 3.0, 1.0]]}


def test_a_function_travels_once_per_worker_not_once_per_call(db: str) -> None:
    ef = ef_module.CountingEF()
    before = ef_module.PICKLED
    with SafeClient(db, validator=None) as client:
        col = client.get_or_create_collection("once", embedding_function=ef)
        for _ in range(4):
            client.get_or_create_collection("once", embedding_function=ef)
            client.get_collection("once", embedding_function=ef)
        col.add(ids=["a"], documents=["alpha"])
        assert ef_module.PICKLED - before == 1  # pickled once in this process
        assert client.run_in_worker(ef_module.counters)[1] == 1  # built once in the worker
        _kill_worker(client)
        assert col.query(query_texts=["alpha"], n_results=1)["ids"] == [["a"]]
        assert client.run_in_worker(ef_module.counters)[1] == 1  # once in the new worker
        assert ef_module.PICKLED - before == 1  # and not pickled again


def test_a_registered_function_travels_by_its_config(db: str) -> None:
    """Its lock cannot be pickled; the worker builds it from the config, once per worker,
    even when the program makes a new object for every call (chroma-mcp does)."""
    with SafeClient(db, validator=None) as client:
        for _ in range(3):
            col = client.get_or_create_collection(
                "by-config", embedding_function=ef_module.RegisteredEF(8)
            )
        col.add(ids=["a", "b"], documents=["alpha", "beta"])
        assert col.query(query_texts=["beta"], n_results=1)["ids"] == [["b"]]
        # One definition in the worker for the three objects (chromadb itself may also build
        # from the recorded config when it checks it: that is its own business).
        assert client.run_in_worker(ef_module.counters)[3] == 1
        assert not col._open_kwargs["embedding_function"].caller_side


def test_a_function_the_worker_cannot_find_names_itself_and_the_fix(db: str) -> None:
    """A collection recorded with a function no process here has registered: chromadb's
    ValueError, as plain chromadb raises it, with what to do."""
    run_plain_chromadb(
        """
        from chromadb.api.types import EmbeddingFunction
        from chromadb.utils.embedding_functions import register_embedding_function

        @register_embedding_function
        class ElsewhereEF(EmbeddingFunction):
            def __init__(self): pass
            def __call__(self, input): return [[1.0, 2.0] for _ in input]
            @staticmethod
            def name(): return "only-elsewhere"
            def get_config(self): return {}
            @staticmethod
            def build_from_config(config): return ElsewhereEF()
            def is_legacy(self): return False

        chromadb.PersistentClient(path).create_collection("elsewhere",
                                                          embedding_function=ElsewhereEF())
        """,
        db,
    )
    with SafeClient(db, validator=None) as client:
        with pytest.raises(ValueError, match="only-elsewhere not found") as info:
            client.get_collection("elsewhere").query(query_texts=["x"])
        assert "Fix: register the class" in str(info.value)
        assert client.heartbeat() > 0
