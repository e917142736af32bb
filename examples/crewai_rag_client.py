"""crewAI's RAG client on a crash-isolated SafeClient, through crewAI's client factory.
Runs offline.

    python examples/crewai_rag_client.py [DIRECTORY]
"""

import hashlib
import os
import sys
import tempfile

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings  # noqa: E402
from chromadb.config import Settings  # noqa: E402
from crewai.rag.chromadb.client import ChromaDBClient  # noqa: E402
from crewai.rag.chromadb.config import ChromaDBConfig  # noqa: E402
from crewai.rag.config.utils import get_rag_client, set_rag_config  # noqa: E402
from crewai.rag.factory import register_rag_client_factory  # noqa: E402

from safechroma import SafeClient  # noqa: E402


class HashEmbedding(EmbeddingFunction[Documents]):
    """Deterministic stand-in for a real embedding function (it runs in the worker)."""

    def __init__(self) -> None:
        pass

    def __call__(self, input: Documents) -> Embeddings:  # noqa: A002
        return [[b / 255 for b in hashlib.sha256(t.encode()).digest()[:16]] for t in input]

    @staticmethod
    def name() -> str:
        return "example-hash"

    def get_config(self) -> dict[str, object]:
        return {}

    @staticmethod
    def build_from_config(config: dict[str, object]) -> "HashEmbedding":
        return HashEmbedding()


def safe_chromadb(config: ChromaDBConfig) -> ChromaDBClient:
    client = SafeClient(config.settings.persist_directory, settings=config.settings)
    return ChromaDBClient(client=client, embedding_function=config.embedding_function)


register_rag_client_factory("chromadb", safe_chromadb)

path = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
settings = Settings(persist_directory=path, is_persistent=True, anonymized_telemetry=False)
set_rag_config(ChromaDBConfig(settings=settings, embedding_function=HashEmbedding()))
rag = get_rag_client()
rag.add_documents(
    collection_name="knowledge", documents=[{"content": "apple pie"}, {"content": "bicycle"}]
)
print([r["content"] for r in rag.search(collection_name="knowledge", query="apple pie", limit=1)])
rag.client.close()
