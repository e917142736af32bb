"""safechroma: Chroma's local persistent client, made safe to embed in long-running programs.

Every Chroma call runs in a long-lived worker process that owns the persist directory. When the
worker dies (SIGSEGV, SIGBUS, SIGABRT from Chroma's native core on a corrupt index), the caller
gets a precise exception instead of dying, the directory is checked and repaired, and a fresh
worker takes over::

    from safechroma import SafeClient

    client = SafeClient("./db")                  # instead of chromadb.PersistentClient("./db")
    col = client.get_or_create_collection("docs", embedding_function=my_ef)
    col.add(ids=["a"], documents=["hello"])

Names are loaded on first use, so ``import safechroma`` is cheap: the worker starts its
parent-death watchdog before it imports chromadb, and ``safechroma check`` never imports it.
"""

from __future__ import annotations as _annotations

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "AsyncSafeClient": ".api.aio",
    "AsyncSafeCollection": ".api.aio",
    "AsyncSafeHttpClient": ".api.http",
    "BreakerPolicy": "._policy",
    "ChromaPanicError": "._errors",
    "ClientClosedError": "._errors",
    "CollectionReport": ".storage.validate",
    "CrashLoopError": "._errors",
    "DirectoryLockedError": "._errors",
    "DirectoryReport": ".storage.validate",
    "Event": "._policy",
    "Finding": ".storage.hnsw",
    "HookContext": "._policy",
    "HttpStats": ".api.http",
    "IncompatibleDirectoryError": "._errors",
    "IncompatibleWorkerError": "._errors",
    "Options": "._policy",
    "PoisonRequestError": "._errors",
    "ProtocolError": "._errors",
    "RecoveryError": "._errors",
    "RemoteError": "._errors",
    "UnsupportedPlatformError": "._errors",
    "RepairReport": ".storage.recovery",
    "SafeChromaError": "._errors",
    "SafeClient": ".api.client",
    "SafeCollection": ".api.collection",
    "SafeHttpClient": ".api.http",
    "ServeError": "._errors",
    "ServerError": "._errors",
    "ServerTimeoutError": "._errors",
    "ServerUnavailableError": "._errors",
    "Stats": "._policy",
    "WorkerCrashedError": "._errors",
    "WorkerError": "._errors",
    "WorkerStartError": "._errors",
    "WorkerTimeoutError": "._errors",
    "apply_salvage": ".storage.recovery",
    "call_timeout": "._policy",
    "check_directory": ".storage.validate",
    "keep_full_wal": ".storage.recovery",
    "patch": ".launch",
    "reembed": ".jobs.reembed",
    "repair_directory": ".storage.recovery",
    "set_wal_retention": ".storage.wal",
    "unpatch": ".launch",
}

__all__ = [
    "AsyncSafeClient",
    "AsyncSafeCollection",
    "AsyncSafeHttpClient",
    "BreakerPolicy",
    "ChromaPanicError",
    "ClientClosedError",
    "CollectionReport",
    "CrashLoopError",
    "DirectoryLockedError",
    "DirectoryReport",
    "Event",
    "Finding",
    "HookContext",
    "HttpStats",
    "IncompatibleDirectoryError",
    "IncompatibleWorkerError",
    "Options",
    "PoisonRequestError",
    "ProtocolError",
    "RecoveryError",
    "RemoteError",
    "RepairReport",
    "SafeChromaError",
    "SafeClient",
    "SafeCollection",
    "SafeHttpClient",
    "ServeError",
    "ServerError",
    "ServerTimeoutError",
    "ServerUnavailableError",
    "Stats",
    "UnsupportedPlatformError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerStartError",
    "WorkerTimeoutError",
    "__version__",
    "apply_salvage",
    "call_timeout",
    "check_directory",
    "keep_full_wal",
    "patch",
    "reembed",
    "repair_directory",
    "set_wal_retention",
    "unpatch",
]


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'safechroma' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({n for n in globals() if n.startswith("_")} | set(__all__))


if _typing.TYPE_CHECKING:
    from ._errors import (
        ChromaPanicError,
        ClientClosedError,
        CrashLoopError,
        DirectoryLockedError,
        IncompatibleDirectoryError,
        IncompatibleWorkerError,
        PoisonRequestError,
        ProtocolError,
        RecoveryError,
        RemoteError,
        SafeChromaError,
        ServeError,
        ServerError,
        ServerTimeoutError,
        ServerUnavailableError,
        UnsupportedPlatformError,
        WorkerCrashedError,
        WorkerError,
        WorkerStartError,
        WorkerTimeoutError,
    )
    from ._policy import BreakerPolicy, Event, HookContext, Options, Stats, call_timeout
    from .api.aio import AsyncSafeClient, AsyncSafeCollection
    from .api.client import SafeClient
    from .api.collection import SafeCollection
    from .api.http import AsyncSafeHttpClient, HttpStats, SafeHttpClient
    from .jobs.reembed import reembed
    from .launch import patch, unpatch
    from .storage.hnsw import Finding
    from .storage.recovery import (
        RepairReport,
        apply_salvage,
        keep_full_wal,
        repair_directory,
    )
    from .storage.validate import CollectionReport, DirectoryReport, check_directory
    from .storage.wal import set_wal_retention
