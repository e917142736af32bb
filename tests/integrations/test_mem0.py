"""mem0: the documented ``Memory.from_config`` path with ``{"provider": "chroma", "config":
{"client": SafeClient(...)}}``.

A ``Memory`` is built for real, offline: mem0's OpenAI embedder and LLM point at a stub
OpenAI-compatible server on loopback that returns deterministic embeddings (mem0 accepts any
``openai_base_url``). Memories are added with ``infer=False``, so no LLM answer is needed.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from mem0 import Memory
from mem0.configs.base import MemoryConfig
from mem0.memory.main import _safe_deepcopy_config

from safechroma import SafeClient

from ._support import child_pids, embed_text

DIM = 16


class _FakeOpenAI(BaseHTTPRequestHandler):
    """``POST /v1/embeddings`` with deterministic vectors; nothing else is needed."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.path.endswith("/embeddings"):
            self.send_error(404)
            return
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": embed_text(t, DIM)}
            for i, t in enumerate(texts)
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

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def openai_stub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def config(client: SafeClient, base_url: str, tmp_path: Path) -> dict[str, Any]:
    return {
        "vector_store": {
            "provider": "chroma",
            "config": {"client": client, "collection_name": "memories"},
        },
        "embedder": {
            "provider": "openai",
            "config": {"api_key": "offline", "openai_base_url": base_url, "embedding_dims": DIM},
        },
        "llm": {
            "provider": "openai",
            "config": {"api_key": "offline", "openai_base_url": base_url},
        },
        "history_db_path": str(tmp_path / "history.db"),
    }


def test_config_accepts_safe_client_and_deepcopy_shares_it(tmp_path: Path) -> None:
    """mem0's pydantic config types ``client`` as ``chromadb.api.client.Client``."""
    with SafeClient(str(tmp_path / "db")) as client:
        cfg = MemoryConfig(**config(client, "http://127.0.0.1:9/v1", tmp_path))
        assert cfg.vector_store.config.client is client
        before = child_pids()
        with pytest.raises(TypeError):
            copy.deepcopy(cfg.vector_store.config)
        clone = _safe_deepcopy_config(cfg.vector_store.config)  # what Memory does internally
        assert clone is not cfg.vector_store.config and clone.client is client
        assert child_pids() == before  # no second worker, no second lock holder
        assert client.heartbeat() > 0


def test_memory_from_config_add_search_update_delete(tmp_path: Path, openai_stub: str) -> None:
    with SafeClient(str(tmp_path / "db")) as client:
        mem = Memory.from_config(config(client, openai_stub, tmp_path))
        try:
            facts = ["likes green tea", "lives in Lisbon", "plays the cello", "works on databases"]
            ids = []
            for fact in facts:
                out = mem.add(fact, user_id="ana", infer=False)
                ids.extend(r["id"] for r in out["results"])
            mem.add("prefers coffee", user_id="bob", infer=False)
            assert len(ids) == 4

            hits = mem.search("plays the cello", filters={"user_id": "ana"}, top_k=2)["results"]
            assert hits[0]["memory"] == "plays the cello"
            assert all(h["user_id"] == "ana" for h in hits)
            assert {m["memory"] for m in mem.get_all(filters={"user_id": "ana"})["results"]} == set(
                facts
            )

            mem.update(ids[0], "likes jasmine tea")
            assert mem.get(ids[0])["memory"] == "likes jasmine tea"
            mem.delete(ids[1])
            left = {m["memory"] for m in mem.get_all(filters={"user_id": "ana"})["results"]}
            assert left == {"likes jasmine tea", "plays the cello", "works on databases"}
            # The vectors live in the SafeClient's directory, written by its worker.
            assert client.get_collection("memories").count() == 4
        finally:
            mem.close()
