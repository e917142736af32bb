"""safechroma: Chroma's local persistent client, made safe to embed in long-running programs.

Every Chroma call runs in a long-lived worker process that owns the persist directory. When the
worker dies (SIGSEGV, SIGBUS, SIGABRT from Chroma's native core on a corrupt index), the caller
gets a precise exception instead of dying, the directory is checked and repaired, and a fresh
worker takes over::

    from safechroma import SafeClient

    client = SafeClient("./db")                  # instead of chromadb.PersistentClient("./db")
    col = client.get_or_create_collection("docs", embedding_function=my_ef)
    col.add(ids=["a"], documents=["hello"])
"""

from ._aio import AsyncSafeClient, AsyncSafeCollection
from ._client import SafeClient
from ._collection import SafeCollection
from ._errors import (
    ChromaPanicError,
    ClientClosedError,
    CrashLoopError,
    DirectoryLockedError,
    ProtocolError,
    RecoveryError,
    RemoteError,
    SafeChromaError,
    WorkerCrashedError,
    WorkerError,
    WorkerStartError,
    WorkerTimeoutError,
)
from ._policy import BreakerPolicy, Event, HookContext, Options, Stats, call_timeout

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncSafeClient",
    "AsyncSafeCollection",
    "BreakerPolicy",
    "ChromaPanicError",
    "ClientClosedError",
    "CrashLoopError",
    "DirectoryLockedError",
    "Event",
    "HookContext",
    "Options",
    "ProtocolError",
    "RecoveryError",
    "RemoteError",
    "SafeChromaError",
    "SafeClient",
    "SafeCollection",
    "Stats",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerStartError",
    "WorkerTimeoutError",
    "__version__",
    "call_timeout",
]
