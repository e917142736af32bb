"""LangChain's Chroma vector store on a crash-isolated SafeClient. Runs offline.

python examples/langchain_chroma_store.py [DIRECTORY]
"""

import sys
import tempfile

from langchain_chroma import Chroma
from langchain_core.embeddings import DeterministicFakeEmbedding  # use your real embeddings

from safechroma import SafeClient

path = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
with SafeClient(path) as client:
    store = Chroma("docs", embedding_function=DeterministicFakeEmbedding(size=64), client=client)
    store.add_texts(
        ["apple pie", "bicycle", "cherry tart"],
        metadatas=[{"kind": "food"}, {"kind": "thing"}, {"kind": "food"}],
        ids=["a", "b", "c"],
    )
    hits = store.similarity_search("cherry tart", k=2, filter={"kind": "food"})
    print([d.page_content for d in hits])
