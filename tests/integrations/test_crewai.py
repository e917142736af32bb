"""crewAI: its RAG client factory hands out ``ChromaDBClient(client=SafeClient(...))``.

crewAI's built-in factory opens ``chromadb.PersistentClient`` on its storage directory; the
documented override is ``register_rag_client_factory("chromadb", factory)``. crewAI checks
``isinstance(client, ClientAPI)`` before every call and attaches its embedding function to each
collection (here a deterministic one, which runs in the worker).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from pathlib import Path

import pytest
from chromadb.api import ClientAPI
from chromadb.config import Settings
from crewai.rag.chromadb.client import ChromaDBClient
from crewai.rag.chromadb.config import ChromaDBConfig
from crewai.rag.config.utils import get_rag_client, set_rag_config
from crewai.rag.factory import register_rag_client_factory, unregister_rag_client_factory

from safechroma import SafeClient

from ._support import HashEmbedding


@pytest.fixture
def safe_factory() -> Iterator[list[SafeClient]]:
    """Register the factory a crewAI application would register at start-up."""
    opened: list[SafeClient] = []

    def factory(config: ChromaDBConfig) -> ChromaDBClient:
        client = SafeClient(
            config.settings.persist_directory,
            settings=config.settings,
            tenant=config.tenant,
            database=config.database,
        )
        opened.append(client)
        return ChromaDBClient(
            client=client,
            embedding_function=config.embedding_function,
            default_limit=config.limit,
            default_score_threshold=config.score_threshold,
            default_batch_size=config.batch_size,
        )

    register_rag_client_factory("chromadb", factory)
    try:
        yield opened
    finally:
        unregister_rag_client_factory("chromadb")
        for client in opened:
            client.close()


def crew_config(path: Path) -> ChromaDBConfig:
    settings = Settings(
        persist_directory=str(path),
        allow_reset=True,
        is_persistent=True,
        anonymized_telemetry=False,
    )
    return ChromaDBConfig(settings=settings, embedding_function=HashEmbedding())


def test_factory_client_create_add_search_delete(
    safe_factory: list[SafeClient], tmp_path: Path
) -> None:
    def run() -> None:
        set_rag_config(crew_config(tmp_path / "crew"))
        rag = get_rag_client()
        assert isinstance(rag, ChromaDBClient) and rag.client is safe_factory[0]
        assert isinstance(rag.client, ClientAPI)

        rag.create_collection(collection_name="knowledge")
        docs = [
            {"content": f"fact number {i}", "doc_id": f"f{i}", "metadata": {"n": i}}
            for i in range(30)
        ]
        rag.add_documents(collection_name="knowledge", documents=docs, batch_size=7)
        hits = rag.search(
            collection_name="knowledge", query="fact number 12", limit=3, score_threshold=0.0
        )
        assert hits[0]["id"] == "f12" and hits[0]["content"] == "fact number 12"
        assert hits[0]["metadata"]["n"] == 12 and hits[0]["score"] > hits[-1]["score"]
        hits = rag.search(
            collection_name="knowledge",
            query="fact number 3",
            metadata_filter={"n": 4},
            score_threshold=0.0,
        )
        assert [h["id"] for h in hits] == ["f4"]

        col = rag.client.get_collection("knowledge")
        assert col.count() == 30
        assert col._embedding_function is not None  # crewAI's function is attached to it
        rag.delete_collection(collection_name="knowledge")
        assert [c.name for c in rag.client.list_collections()] == []

    contextvars.copy_context().run(run)  # crewAI keeps its RAG config in a ContextVar


def test_direct_chromadb_client_and_reset(tmp_path: Path) -> None:
    """``ChromaDBClient(client=SafeClient(...))`` without the factory, and crewAI's reset()."""
    settings = Settings(allow_reset=True, anonymized_telemetry=False)
    with SafeClient(str(tmp_path / "db"), settings=settings) as client:
        rag = ChromaDBClient(client=client, embedding_function=HashEmbedding())
        rag.add_documents(
            collection_name="notes", documents=[{"content": "a note", "doc_id": "n1"}]
        )
        assert client.get_collection("notes").count() == 1
        rag.reset()
        assert client.count_collections() == 0
