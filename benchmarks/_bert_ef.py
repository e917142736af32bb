"""A real transformer as a chromadb embedding function, built on this machine (no download).

``BertEF`` runs a BERT encoder (``transformers.BertModel``, MiniLM-sized by default: 6 layers,
hidden 384, 6 heads, intermediate 1536, vocabulary 30522; 22.6 M parameters) with random
weights from a fixed seed, and mean-pools its last hidden state over the attention mask, as
sentence-transformers' MiniLM does. The weights are random, so the vectors mean nothing; the
arithmetic (and so the time and memory) is a real model's. Text becomes token ids through a
deterministic hash tokenizer (``hash_tokenize``): words and punctuation, each mapped by BLAKE2b
into the vocabulary, with ``[CLS]``/``[SEP]``, truncated and padded to the longest in the batch.
Nothing touches the Hugging Face hub (``HF_HUB_OFFLINE=1`` is set on import).

Registered with ``@register_embedding_function`` under ``safechroma_bench_bert`` with
``get_config``/``build_from_config``, in an importable module: safechroma sends it to its worker
by config, and the worker builds its own copy (``benchmarks/bench_embedding.py``).

The model is built on the first call, not in ``__init__``: chromadb's ``is_legacy()`` calls
``build_from_config(get_config())`` on every check, and a model per check would cost seconds.
Instances with one config share one model per process (``_MODELS``).

Needs torch and transformers (see ``bench_embedding.py`` for the install line).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings  # noqa: E402
from chromadb.utils.embedding_functions import register_embedding_function  # noqa: E402

NAME = "safechroma_bench_bert"
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "vocab_size": 30522,
    "max_length": 128,
}
CLS, SEP, PAD = 101, 102, 0
_FIRST_WORD_ID = 1000  # ids below are BERT's special and unused tokens
_WORD = re.compile(r"\w+|[^\w\s]")

_MODELS: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()
# Every instance built in this process, newest last: lets a benchmark find the copy that a
# worker built from the config (``time_embedding`` below) without safechroma's internals.
INSTANCES: list[BertEF] = []
CALLS = [0]  # calls of any BertEF in this process: shows in which process the embedding ran


def hash_tokenize(texts: list[str], vocab_size: int, max_length: int) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` as int64 arrays of shape (len(texts), longest)."""
    span = vocab_size - _FIRST_WORD_ID
    rows: list[list[int]] = []
    for text in texts:
        ids = [CLS]
        for word in _WORD.findall(text.lower())[: max_length - 2]:
            digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
            ids.append(_FIRST_WORD_ID + int.from_bytes(digest, "little") % span)
        ids.append(SEP)
        rows.append(ids)
    longest = max((len(r) for r in rows), default=2)
    input_ids = np.full((len(rows), longest), PAD, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return input_ids, mask


def _model(config: dict[str, Any]) -> Any:
    key = tuple(sorted(config.items()))
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            import torch
            from transformers import BertConfig, BertModel

            torch.manual_seed(int(config["seed"]))
            bert_config = BertConfig(
                hidden_size=config["hidden_size"],
                num_hidden_layers=config["num_hidden_layers"],
                num_attention_heads=config["num_attention_heads"],
                intermediate_size=config["intermediate_size"],
                vocab_size=config["vocab_size"],
                max_position_embeddings=max(512, int(config["max_length"])),
            )
            model = BertModel(bert_config, add_pooling_layer=False).eval()
            _MODELS[key] = model
        return model


@register_embedding_function
class BertEF(EmbeddingFunction[Documents]):
    """A seeded random-weight BERT encoder, mean-pooled (see the module docstring)."""

    def __init__(self, **config: Any) -> None:
        unknown = set(config) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown BertEF settings: {sorted(unknown)}")
        self._config = {**DEFAULTS, **config}
        INSTANCES.append(self)

    def __call__(self, input: Documents) -> Embeddings:
        import torch

        CALLS[0] += 1
        model = _model(self._config)
        ids, mask = hash_tokenize(
            list(input), int(self._config["vocab_size"]), int(self._config["max_length"])
        )
        with torch.inference_mode():
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
            hidden = model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            weights = mask_t.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        out = pooled.numpy().astype(np.float32)
        return [row for row in out]

    @staticmethod
    def name() -> str:
        return NAME

    def get_config(self) -> dict[str, Any]:
        return dict(self._config)

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> BertEF:
        return BertEF(**config)

    def default_space(self) -> Any:
        return "cosine"

    def supported_spaces(self) -> list[Any]:
        return ["cosine", "l2", "ip"]


def time_embedding(docs: list[str]) -> float:
    """Seconds for the newest ``BertEF`` of this process to embed ``docs`` (run in a worker
    through ``SafeClient.run_in_worker``: the worker's own copy, built from the config)."""
    ef = INSTANCES[-1]
    t0 = time.perf_counter()
    ef(docs)
    return time.perf_counter() - t0


def threads() -> dict[str, Any]:
    """torch's thread counts and the thread variables of this process."""
    import torch

    return {
        "calls": CALLS[0],
        "models": len(_MODELS),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "pid": os.getpid(),
        "cpus": sorted(os.sched_getaffinity(0)),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        **{
            var: os.environ.get(var)
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        },
    }
