"""LlamaIndex: ``ChromaVectorStore`` over a ``SafeCollection``: add, filtered query, delete by
``ref_doc_id``, MMR, and a ``VectorStoreIndex`` built and queried through it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.embeddings import BaseEmbedding
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)
from llama_index.vector_stores.chroma import ChromaVectorStore

from safechroma import SafeClient, SafeCollection

from ._support import embed_text

DIM = 8


class HashEmbedding(BaseEmbedding):
    """Deterministic LlamaIndex embedding model: no download, no network."""

    def _get_text_embedding(self, text: str) -> list[float]:
        return embed_text(text, DIM)

    def _get_query_embedding(self, query: str) -> list[float]:
        return embed_text(query, DIM)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return embed_text(query, DIM)


def node(i: int, doc: str, **meta: Any) -> TextNode:
    text = f"{doc} chunk {i}"
    return TextNode(
        id_=f"{doc}-{i}",
        text=text,
        embedding=embed_text(text, DIM),
        metadata={"doc": doc, "i": i, **meta},
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=doc)},
    )


@pytest.fixture
def store(tmp_path: Any) -> Iterator[ChromaVectorStore]:
    with SafeClient(str(tmp_path / "db")) as client:
        col = client.get_or_create_collection("llama", embedding_function=None)
        yield ChromaVectorStore(chroma_collection=col)


def test_add_query_with_filters_and_delete_by_ref_doc_id(store: ChromaVectorStore) -> None:
    nodes = [node(i, doc, year=2020 + i) for doc in ("alpha", "beta") for i in range(5)]
    assert store.add(nodes) == [n.node_id for n in nodes]
    query = VectorStoreQuery(query_embedding=embed_text("beta chunk 3", DIM), similarity_top_k=3)
    res = store.query(query)
    assert res.ids is not None and res.ids[0] == "beta-3"
    assert res.nodes is not None and res.nodes[0].get_content() == "beta chunk 3"

    filters = MetadataFilters(
        filters=[
            MetadataFilter(key="doc", value="alpha"),
            MetadataFilter(key="year", value=2022, operator=FilterOperator.GTE),
        ]
    )
    res = store.query(
        VectorStoreQuery(
            query_embedding=embed_text("beta chunk 3", DIM), similarity_top_k=5, filters=filters
        )
    )
    assert res.ids is not None and sorted(res.ids) == ["alpha-2", "alpha-3", "alpha-4"]

    store.delete(ref_doc_id="alpha")
    left = store.get_nodes(None)
    assert sorted(n.node_id for n in left) == [f"beta-{i}" for i in range(5)]
    store.delete_nodes(node_ids=["beta-0"])
    assert store._collection.count() == 4
    store.clear()
    assert store._collection.count() == 0


def test_mmr_query(store: ChromaVectorStore) -> None:
    nodes = [node(i, "mmr") for i in range(12)]
    store.add(nodes)
    query = VectorStoreQuery(
        query_embedding=embed_text("mmr chunk 5", DIM),
        similarity_top_k=4,
        mode=VectorStoreQueryMode.MMR,
    )
    res = store.query(query, mmr_threshold=0.5)
    assert res.ids is not None and len(res.ids) == 4 and res.ids[0] == "mmr-5"
    assert len(set(res.ids)) == 4


def test_index_over_a_standalone_safe_collection(tmp_path: Any) -> None:
    """The README recipe: a SafeCollection straight into StorageContext and VectorStoreIndex."""
    with SafeCollection(str(tmp_path / "db"), "docs", embedding_function=None) as col:
        store = ChromaVectorStore.from_collection(
            col
        )  # checks isinstance(col, chromadb.Collection)
        ctx = StorageContext.from_defaults(vector_store=store)
        docs = [Document(text=f"note number {i}", doc_id=f"d{i}") for i in range(6)]
        index = VectorStoreIndex.from_documents(
            docs, storage_context=ctx, embed_model=HashEmbedding()
        )
        hits = index.as_retriever(similarity_top_k=2).retrieve("note number 4")
        assert hits[0].node.get_content() == "note number 4"
        index.delete_ref_doc("d4", delete_from_docstore=True)
        hits = index.as_retriever(similarity_top_k=6).retrieve("note number 4")
        assert "note number 4" not in [h.node.get_content() for h in hits] and len(hits) == 5
        assert col.count() == 5
