"""The exact chromadb behaviours that LangChain, LlamaIndex, mem0 and crewAI rely on.

Each test pins one of them on SafeClient / SafeCollection, against chromadb's own behaviour
(measured on chromadb 1.5.9 with ``PersistentClient``): the frameworks take our objects where
they take chromadb's only as long as these hold.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import pickle
import subprocess
import sys
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.api import ClientAPI
from chromadb.api.client import Client

from safechroma import SafeClient, SafeCollection

from ._support import HashEmbedding, child_pids, vectors


@pytest.fixture
def client(tmp_path: Path) -> SafeClient:
    with SafeClient(str(tmp_path / "db")) as c:
        yield c  # type: ignore[misc]


_DIRECT_ADD = """
import json, sys
import chromadb
client = chromadb.PersistentClient(sys.argv[1])
col = client.get_or_create_collection("values", embedding_function=None)
try:
    col.add(ids=["a"], embeddings=[[0.0, 1.0]], metadatas=[json.loads(sys.argv[2])])
except Exception as exc:
    print(json.dumps([type(exc).__module__, type(exc).__qualname__, list(exc.args)]))
"""


def test_chroma_value_error_keeps_chromadb_message(client: SafeClient, tmp_path: Path) -> None:
    """LangChain's add_texts matches ``"Expected metadata value to be"`` in the text."""
    bad = {"nested": {"not": "allowed"}}
    # chromadb's own outcome, from a child process (this process never opens Chroma itself).
    direct = subprocess.run(
        [sys.executable, "-c", _DIRECT_ADD, str(tmp_path / "direct"), json.dumps(bad)],
        capture_output=True,
        text=True,
        check=True,
    )
    module, qualname, args = json.loads(direct.stdout)
    col = client.get_or_create_collection("values", embedding_function=None)
    with pytest.raises(ValueError) as ours:
        col.add(ids=["a"], embeddings=[[0.0, 1.0]], metadatas=[bad])  # type: ignore[list-item]
    assert (type(ours.value).__module__, type(ours.value).__qualname__) == (module, qualname)
    assert list(ours.value.args) == args
    assert "Expected metadata value to be" in str(ours.value)
    assert col.count() == 0  # the worker stayed alive and nothing was written


def test_collection_has_no_len_or_bool(client: SafeClient) -> None:
    """LlamaIndex checks ``if not self._collection``: an empty collection must stay truthy."""
    for name in ("__len__", "__bool__"):
        assert hasattr(chromadb.Collection, name) is False
        assert hasattr(SafeCollection, name) is False
    col = client.get_or_create_collection("empty", embedding_function=None)
    assert col.count() == 0
    assert bool(col) is True
    with pytest.raises(TypeError):
        len(col)  # type: ignore[arg-type]


def test_results_are_mutable_dicts_with_chromadb_types(client: SafeClient) -> None:
    col = client.get_or_create_collection("results", embedding_function=None)
    col.add(ids=["a", "b", "c"], embeddings=vectors(3, dim=4), documents=["x", "y", "z"])
    q = col.query(
        query_embeddings=vectors(2, dim=4, seed=1),
        n_results=2,
        include=["embeddings", "documents", "distances"],
    )
    assert type(q) is dict
    assert isinstance(q["embeddings"], list) and len(q["embeddings"]) == 2
    assert all(isinstance(e, np.ndarray) and e.shape == (2, 4) for e in q["embeddings"])
    q["ids"][0].append("extra")  # frameworks post-process results in place
    q["documents"][0][0] = "changed"
    q["custom"] = 1  # type: ignore[typeddict-unknown-key]
    g = col.get(include=["embeddings", "metadatas"])
    assert type(g) is dict and isinstance(g["embeddings"], np.ndarray)
    assert g["embeddings"].shape == (3, 4)
    g["ids"].append("extra")
    g["embeddings"][0, 0] = 42.0
    assert col.get(ids=["a"], include=["embeddings"])["embeddings"][0, 0] != 42.0


def test_isinstance_checks(client: SafeClient) -> None:
    """crewAI checks ClientAPI; mem0's pydantic config needs chromadb.api.client.Client."""
    col = client.get_or_create_collection("types", embedding_function=None)
    assert isinstance(client, ClientAPI) and isinstance(client, Client)
    assert isinstance(col, chromadb.Collection)
    # No chromadb System in the caller's process: SafeClient's __init__ is its own.
    assert "_server" not in vars(client) and "_identifier" not in vars(client)


def test_copy_of_client_is_another_handle_on_the_same_worker(client: SafeClient) -> None:
    col = client.get_or_create_collection("copies", embedding_function=None)
    col.add(ids=["a"], embeddings=[[1.0, 2.0]])
    pid = client.stats().worker_pid
    dup = copy.copy(client)
    assert dup is not client and type(dup) is SafeClient
    assert dup.get_collection("copies").count() == 1
    assert dup.stats().worker_pid == pid
    dup.close()  # closing the copy leaves the original open
    assert client.get_collection("copies").count() == 1
    assert client.stats().worker_pid == pid


def test_deepcopy_and_pickle_of_client_raise_type_error_and_start_nothing(
    client: SafeClient,
) -> None:
    """mem0 deep-copies its config and, on TypeError, reuses the one client, as with chromadb."""
    client.heartbeat()
    before = child_pids()
    with pytest.raises(TypeError):
        copy.deepcopy(client)
    with pytest.raises(TypeError):
        copy.deepcopy({"vector_store": {"client": client}})
    with pytest.raises(TypeError):
        pickle.dumps(client)
    assert child_pids() == before
    assert client.heartbeat() > 0


def test_copy_of_collection_outlives_the_original(client: SafeClient) -> None:
    col = client.get_or_create_collection("outlive", embedding_function=None)
    col.add(ids=["a", "b"], embeddings=[[1.0, 2.0], [3.0, 4.0]])
    dup = copy.copy(col)
    assert isinstance(dup, SafeCollection) and dup.name == "outlive" and dup.id == col.id
    del col
    gc.collect()
    assert dup.count() == 2  # the worker-side handle was not released under the copy
    dup.add(ids=["c"], embeddings=[[5.0, 6.0]])
    assert client.get_collection("outlive").count() == 3


def test_deepcopy_and_pickle_of_collection_raise_type_error(client: SafeClient) -> None:
    col = client.get_or_create_collection("deep", embedding_function=None)
    before = child_pids()
    with pytest.raises(TypeError):
        copy.deepcopy(col)
    with pytest.raises(TypeError):
        pickle.dumps(col)
    assert child_pids() == before
    assert col.count() == 0


def test_use_from_asyncio_to_thread(client: SafeClient) -> None:
    """LangChain's default async methods run the sync ones in executor threads."""
    col = client.get_or_create_collection("threads", embedding_function=HashEmbedding())

    async def main() -> list[int]:
        adds = [
            asyncio.to_thread(
                col.add,
                ids=[f"{i}-{j}" for j in range(20)],
                documents=[f"doc {i} {j}" for j in range(20)],
            )
            for i in range(8)
        ]
        await asyncio.gather(*adds)
        queries = [
            asyncio.to_thread(col.query, query_texts=[f"doc {i} 3"], n_results=1) for i in range(8)
        ]
        results = await asyncio.gather(*queries)
        assert [r["ids"][0][0] for r in results] == [f"{i}-3" for i in range(8)]
        return list(await asyncio.gather(*(asyncio.to_thread(col.count) for _ in range(4))))

    assert asyncio.run(main()) == [160] * 4
