"""mem0's Memory.from_config with a crash-isolated SafeClient. Runs offline.

    python examples/mem0_memory.py [DIRECTORY]

mem0 needs an embedding model; here a stand-in for the OpenAI embeddings endpoint on loopback
returns deterministic vectors, so the example needs no key and no network. In a real program,
drop the stub and configure your embedder and LLM as mem0 documents.
"""

import hashlib
import json
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("MEM0_TELEMETRY", "False")

from mem0 import Memory  # noqa: E402

from safechroma import SafeClient  # noqa: E402


class FakeEmbeddings(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vec = lambda t: [b / 255 for b in hashlib.sha256(t.encode()).digest()[:16]]  # noqa: E731
        data = [
            {"object": "embedding", "index": i, "embedding": vec(t)} for i, t in enumerate(texts)
        ]
        out = json.dumps(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEmbeddings)
threading.Thread(target=server.serve_forever, daemon=True).start()
base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"

path = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
with SafeClient(os.path.join(path, "chroma")) as client:
    memory = Memory.from_config(
        {
            "vector_store": {
                "provider": "chroma",
                "config": {"client": client, "collection_name": "memories"},
            },
            "embedder": {
                "provider": "openai",
                "config": {"api_key": "offline", "openai_base_url": base_url, "embedding_dims": 16},
            },
            "llm": {
                "provider": "openai",
                "config": {"api_key": "offline", "openai_base_url": base_url},
            },
            "history_db_path": os.path.join(path, "history.db"),
        }
    )
    for fact in ["likes green tea", "lives in Lisbon"]:
        memory.add(fact, user_id="ana", infer=False)
    hits = memory.search("lives in Lisbon", filters={"user_id": "ana"}, top_k=1)["results"]
    print([h["memory"] for h in hits])
    memory.close()
server.shutdown()
server.server_close()
