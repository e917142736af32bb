"""Framework tests: the real LangChain, LlamaIndex, mem0 and crewAI packages on SafeClient.

They come with the ``integrations`` extra (``pip install -e '.[test,integrations]'``, what CI
runs). Everything stays offline: embeddings are deterministic functions defined in the tests, and
the frameworks' telemetry is switched off before they are imported.
"""

from __future__ import annotations

import atexit
import inspect
import os
import shutil
import tempfile

import pytest

# Set before any framework is imported: mem0 and crewAI read these at import time.
os.environ.setdefault("MEM0_TELEMETRY", "False")
os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_DISABLE_TRACKING", "true")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
# mem0 writes its history database and settings under MEM0_DIR (default ~/.mem0).
if "MEM0_DIR" not in os.environ:
    os.environ["MEM0_DIR"] = tempfile.mkdtemp(prefix="safechroma-mem0-")
    atexit.register(shutil.rmtree, os.environ["MEM0_DIR"], True)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Run the coroutine tests of langchain-tests' standard suite under pytest-asyncio.

    The suite leaves them unmarked (langchain-chroma runs it in ``asyncio_mode = "auto"``); the
    mark goes on before pytest-asyncio looks, and only on tests collected in this folder.
    """
    if str(collector.path).startswith(os.path.dirname(__file__)) and inspect.iscoroutinefunction(
        obj
    ):
        pytest.mark.asyncio(obj)
