"""LlamaIndex's ChromaVectorStore on a crash-isolated SafeCollection. Runs offline.

python examples/llamaindex_chroma_store.py [DIRECTORY]
"""

import sys
import tempfile

from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding  # use your real embed_model
from llama_index.vector_stores.chroma import ChromaVectorStore

from safechroma import SafeCollection

path = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
with SafeCollection(path, "docs", embedding_function=None) as col:
    store = ChromaVectorStore(chroma_collection=col)
    index = VectorStoreIndex.from_documents(
        [Document(text="apple pie", doc_id="a"), Document(text="bicycle", doc_id="b")],
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=MockEmbedding(embed_dim=64),
    )
    print([n.node.get_content() for n in index.as_retriever(similarity_top_k=2).retrieve("pie")])
    index.delete_ref_doc("b", delete_from_docstore=True)
    print(col.count(), "record left")
