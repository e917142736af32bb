"""LangChain: langchain-tests' standard vector-store suite on ``Chroma(client=SafeClient(...))``.

The suite is the one langchain-chroma runs on its own store; here the store's client is a
``SafeClient``, so every call crosses into the worker. One client serves the module (opening is
not what is tested); each test gets a fresh collection, deleted afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_chroma import Chroma
from langchain_core.documents import Document
from langchain_tests.integration_tests import VectorStoreIntegrationTests

from safechroma import SafeClient


@pytest.fixture(scope="module")
def safe_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SafeClient]:
    with SafeClient(str(tmp_path_factory.mktemp("langchain") / "db")) as client:
        yield client


class TestSafeClientStandard(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self, safe_client: SafeClient) -> Iterator[Chroma]:  # type: ignore[override]
        store = Chroma(
            collection_name=f"lc-{uuid.uuid4().hex[:12]}",
            embedding_function=self.get_embeddings(),
            client=safe_client,
        )
        try:
            yield store
        finally:
            store.delete_collection()


def test_complex_metadata_hint_reaches_the_user(safe_client: SafeClient) -> None:
    """langchain-chroma recognises chromadb's ValueError by its text and adds its hint."""
    store = Chroma(
        "lc-metadata",
        embedding_function=TestSafeClientStandard.get_embeddings(),
        client=safe_client,
    )
    with pytest.raises(ValueError, match="filter_complex_metadata"):
        store.add_texts(["a"], metadatas=[{"tags": {"nested": 1}}])
    store.delete_collection()


def test_search_with_filter_and_mmr(safe_client: SafeClient) -> None:
    emb = TestSafeClientStandard.get_embeddings()
    store = Chroma("lc-search", embedding_function=emb, client=safe_client)
    docs = [
        Document(page_content=f"text {i}", metadata={"even": i % 2 == 0}, id=str(i))
        for i in range(10)
    ]
    store.add_documents(docs)
    hits = store.similarity_search("text 4", k=3, filter={"even": True})
    assert hits[0].id == "4" and all(d.metadata["even"] for d in hits)
    mmr = store.max_marginal_relevance_search("text 4", k=3, fetch_k=10)
    assert len(mmr) == 3 and mmr[0].id == "4"
    scored = store.similarity_search_with_score("text 7", k=1)
    assert scored[0][0].id == "7" and scored[0][1] == pytest.approx(0.0, abs=1e-6)
    store.delete_collection()


def test_store_reopens_on_the_same_directory(tmp_path: Path) -> None:
    """Data written through one SafeClient is there for the next one (the worker persisted it)."""
    path = str(tmp_path / "db")
    emb = TestSafeClientStandard.get_embeddings()
    with SafeClient(path) as client:
        Chroma("lc-persist", embedding_function=emb, client=client).add_texts(
            ["kept"], metadatas=[{"n": 1}], ids=["k"]
        )
    with SafeClient(path) as client:
        got = Chroma("lc-persist", embedding_function=emb, client=client).get_by_ids(["k"])
    assert [d.page_content for d in got] == ["kept"]
