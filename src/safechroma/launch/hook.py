"""The start-up hook: makes ``chromadb.PersistentClient`` a ``SafeClient`` in this process.

Installed in every interpreter by the ``safechroma-run.pth`` file that the package puts in
site-packages; it acts only when ``SAFECHROMA_RUN`` is set (by ``safechroma run`` or
:func:`safechroma.patch`), so a child that strips ``PYTHONPATH`` or the whole Python path is
still reached, and an interpreter without the variable pays one ``dict`` lookup. In the manner
of ``opentelemetry-instrument``: the patch is applied when chromadb is imported, before the
program's first line that uses it (gevent's rule: patch before the target is imported).

What it patches, once chromadb has been imported (an import hook on ``sys.meta_path``, so
chromadb is never imported by the hook itself):

- ``chromadb.PersistentClient(path, settings, tenant, database)`` -> ``SafeClient`` on the same
  path and settings, with the options of the ``SAFECHROMA_*`` variables
  (:mod:`safechroma.launch.options`);
- ``chromadb.Client(settings)`` and ``chromadb.RustClient(path)`` when they are persistent;
- and it guards what it cannot turn into a ``SafeClient``: Chroma's native bindings opening a
  persist directory in this process (a program that builds them directly) raise a clear
  ``RuntimeError`` instead of opening a second Chroma beside the worker, and Chroma's own server
  (``chroma run``) exits with a message that names ``safechroma serve``.

safechroma's own processes (the warm template, workers, repair jobs) are started without
``SAFECHROMA_RUN`` (:func:`safechroma._env.private_env`), and a worker marks itself
(:func:`markown_process()`) before it imports chromadb, so it is never patched even if the
variable reaches it another way.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from .._env import RUN_VAR, own_process

_lock = threading.RLock()
_finder: _ChromadbFinder | None = None
_originals: dict[tuple[str, str], Any] = {}  # (module, attribute) -> what we replaced
_options: dict[str, Any] | None = None  # options given to patch() in this process


def install_from_environment() -> None:
    """The ``.pth`` entry point: install the hook if ``SAFECHROMA_RUN`` asks for it.

    Never raises: a start-up hook that breaks an interpreter would break every Python program
    the user runs; a failure is reported on stderr once and the program runs unpatched.
    """
    if RUN_VAR not in os.environ or own_process():
        return
    try:
        install()
    except Exception as exc:  # noqa: BLE001 - see the docstring
        print(
            f"safechroma: the start-up hook failed, Chroma is NOT protected: {exc!r}",
            file=sys.stderr,
        )


def install(options: dict[str, Any] | None = None) -> None:
    """Patch chromadb in this process now if it is imported, else as soon as it is.

    Args:
        options: ``SafeClient`` options for this process (``patch()``); None reads them from
            the ``SAFECHROMA_*`` variables when the first client is built.
    """
    global _finder, _options
    with _lock:
        _options = options
        if _finder is None:
            _finder = _ChromadbFinder()
            sys.meta_path.insert(0, _finder)
        for name in _WATCHED:
            module = sys.modules.get(name)
            if module is not None:
                _patch_module(name, module)


def uninstall() -> None:
    """Undo :func:`install`: chromadb's own objects back, the import hook gone."""
    global _finder, _options
    with _lock:
        if _finder is not None:
            try:
                sys.meta_path.remove(_finder)
            except ValueError:
                pass
            _finder = None
        for (module_name, attr), original in _originals.items():
            module = sys.modules.get(module_name)
            if module is not None:
                setattr(module, attr, original)
        _originals.clear()
        _options = None


def installed() -> bool:
    """Whether chromadb is patched (or will be when imported) in this process."""
    return _finder is not None


# -- the patched constructors ---------------------------------------------------------------


def _client_options() -> dict[str, Any]:
    if _options is not None:
        return dict(_options)
    from . import events
    from .options import from_env

    opts = from_env()
    return events.with_stderr_events(opts)


def _safe_client(path: Any, settings: Any, tenant: Any, database: Any) -> Any:
    from ..api.client import SafeClient

    return SafeClient(path, settings, str(tenant), str(database), **_client_options())


def _make_persistent_client(original: Any) -> Any:
    import chromadb
    from chromadb.config import DEFAULT_DATABASE, DEFAULT_TENANT

    def PersistentClient(  # noqa: N802 - chromadb's name
        path: Any = "./chroma",
        settings: Any = None,
        tenant: str = DEFAULT_TENANT,
        database: str = DEFAULT_DATABASE,
    ) -> Any:
        if own_process():
            return original(path, settings, tenant, database)
        return _safe_client(path, settings, tenant, database)

    PersistentClient.__doc__ = original.__doc__
    PersistentClient.__wrapped__ = original  # type: ignore[attr-defined]
    PersistentClient.__module__ = chromadb.__name__
    return PersistentClient


def _make_client(original: Any) -> Any:
    import inspect

    from chromadb.config import DEFAULT_DATABASE, DEFAULT_TENANT

    default_settings = inspect.signature(original).parameters["settings"].default

    def Client(  # noqa: N802 - chromadb's name
        settings: Any = default_settings,
        tenant: str = DEFAULT_TENANT,
        database: str = DEFAULT_DATABASE,
    ) -> Any:
        if not own_process() and _persistent(settings):
            return _safe_client(settings.persist_directory, settings, tenant, database)
        return original(settings, tenant, database)

    Client.__doc__ = original.__doc__
    Client.__wrapped__ = original  # type: ignore[attr-defined]
    return Client


def _make_rust_client(original: Any) -> Any:
    from chromadb.config import DEFAULT_DATABASE, DEFAULT_TENANT, Settings

    def RustClient(  # noqa: N802 - chromadb's name
        path: str | None = None,
        settings: Any = None,
        tenant: str = DEFAULT_TENANT,
        database: str = DEFAULT_DATABASE,
    ) -> Any:
        if own_process() or path is None:
            return original(path, settings, tenant, database)
        settings = Settings() if settings is None else settings
        settings.persist_directory = str(path)
        settings.is_persistent = True
        return _safe_client(path, settings, tenant, database)

    RustClient.__wrapped__ = original  # type: ignore[attr-defined]
    return RustClient


def _persistent(settings: Any) -> bool:
    return bool(getattr(settings, "is_persistent", False)) and bool(
        getattr(settings, "persist_directory", None)
    )


def _make_bindings(original: Any) -> Any:
    def Bindings(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - the bindings' name
        persist = kwargs.get("persist_path")
        if persist and not own_process():
            raise RuntimeError(
                f"safechroma run: this process ({sys.argv[0] or 'python'}, pid {os.getpid()}) "
                f"opened the Chroma directory {persist} with Chroma's native bindings directly, "
                "not through chromadb.PersistentClient, so safechroma cannot move it into a "
                "supervised worker. It was not opened (a second Chroma beside the worker would "
                "corrupt it). Use chromadb.PersistentClient or safechroma.SafeClient, or run "
                "the program without safechroma."
            )
        return original(*args, **kwargs)

    return Bindings


def _make_cli(original: Any) -> Any:
    def cli(args: Sequence[str]) -> Any:
        if not own_process() and len(args) > 1 and args[1] == "run":
            print(
                "safechroma run: `chroma run` serves the directory with Chroma inside this "
                "process, where safechroma cannot supervise it. Use `safechroma serve --path "
                "DIR` instead (Chroma's own server, supervised: the same HTTP API and port).",
                file=sys.stderr,
            )
            raise SystemExit(2)
        return original(args)

    return cli


# (module, attribute) -> wrapper factory; applied once the module has executed.
_PATCHES: dict[str, dict[str, Any]] = {
    "chromadb": {
        "PersistentClient": _make_persistent_client,
        "Client": _make_client,
        "RustClient": _make_rust_client,
    },
    "chromadb_rust_bindings": {"Bindings": _make_bindings, "cli": _make_cli},
}
_WATCHED = tuple(_PATCHES)


def _patch_module(name: str, module: ModuleType) -> None:
    with _lock:
        for attr, factory in _PATCHES[name].items():
            key = (name, attr)
            if key in _originals or not hasattr(module, attr):
                continue
            original = getattr(module, attr)
            _originals[key] = original
            setattr(module, attr, factory(original))


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the module before the importer sees it."""

    def __init__(self, inner: Any, name: str) -> None:
        self.inner = inner
        self.name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self.inner, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        if _finder is not None:
            _patch_module(self.name, module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self.inner, name)


class _ChromadbFinder(importlib.abc.MetaPathFinder):
    """Finds chromadb (and its native bindings) with the other finders, wraps the loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None
