"""Embedding functions that work in every worker: sent once per worker, by config or by value.

chromadb runs a collection's embedding function inside ``Collection.add``/``query``, so the
worker needs it. Three problems, measured with real programs (issue 20):

- chromadb rebuilds a collection's function from its recorded name and config through a
  per-process registry (``@register_embedding_function``). A class registered in the program
  is unknown in a worker: after every respawn ``get_collection(name)`` failed with "Embedding
  function hash_ef not found".
- A function pickled into every call that carries it costs seconds with a real model (438 MB
  for a CodeBERT-sized one) and a second copy per call.
- Some functions cannot be pickled at all (a class defined inside a function, holding a lock
  and a live ONNX session): a ``TypeError`` from pickling ended every call.

What this module does, per caller process (:class:`Functions`) and per worker (the ``_table``):

- **Registry**: the program's own registered classes (those not defined in chromadb) go to each
  new worker before its first call that may build a collection (``Op.REGISTER``); a class that
  cannot travel is named in the error chromadb raises for it.
- **Once per worker**: a function passed to ``create_collection``/``get_collection``/... is
  replaced in the request by a :class:`FunctionRef`; each worker is sent its definition once
  (``Op.DEFINE``), and unpickling the ref in the worker returns the worker's object.
- **How it travels**, in this order: by *config* when the function's class is the one
  registered under its ``name()`` (the worker builds it with ``build_from_config``, as chromadb
  does when it reopens the collection; nothing is pickled, the model is loaded from the same
  files); else *by value* (cloudpickle, done once per process and cached); else, when it cannot
  be pickled, by the config of the class registered under its name; else it **runs in the
  caller**: the worker gets a stand-in that records the same name and config (so the collection
  is persisted exactly as chromadb would), and the caller's ``SafeCollection`` computes the
  vectors with chromadb's own ``_embed`` and sends only vectors. Its native code is then not
  isolated from the caller.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import threading
from typing import Any, Final

import cloudpickle

logger = logging.getLogger("safechroma")

CONFIG: Final = "config"
VALUE: Final = "value"
CALLER: Final = "caller"


class FunctionRef:
    """Stands for an embedding function in a request; the worker resolves it to its copy."""

    __slots__ = ("token", "name", "caller_side")

    def __init__(self, token: str, name: str) -> None:
        self.token = token
        self.name = name  # for error messages
        self.caller_side = False  # set once a worker could only use a stand-in

    def __reduce__(self) -> tuple[Any, ...]:
        return (lookup, (self.token,))

    def __repr__(self) -> str:
        return f"FunctionRef({self.name!r})"


# -- the caller's side --------------------------------------------------------------------------


def _registries() -> tuple[dict[str, Any], dict[str, Any]] | None:
    module = sys.modules.get("chromadb.utils.embedding_functions")
    if module is None:
        return None
    return module.known_embedding_functions, module.sparse_known_embedding_functions


def _is_programs(cls: Any) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return not (module == "chromadb" or module.startswith("chromadb."))


class Functions:
    """The caller's embedding functions and registry entries, and what each worker has."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[Any, tuple[FunctionRef, list[tuple[str, Any]]]] = {}
        self._keep: list[Any] = []  # functions whose id() is a key: kept alive
        self._class_payloads: dict[Any, bytes | str] = {}  # class -> pickle, or why not

    # Registry -------------------------------------------------------------------------------

    def registry_signature(self) -> int:
        """Changes when the program registers a class (the registries only grow)."""
        regs = _registries()
        return 0 if regs is None else len(regs[0]) + len(regs[1]) * 100003

    def registry_payload(self) -> list[tuple[str, str, Any]]:
        """``(kind, name, pickled class | reason)`` for the program's registered classes."""
        regs = _registries()
        if regs is None:
            return []
        out: list[tuple[str, str, Any]] = []
        for kind, registry in (("dense", regs[0]), ("sparse", regs[1])):
            for name, cls in list(registry.items()):
                if cls is None or not _is_programs(cls):
                    continue
                payload = self._class_payloads.get(cls)
                if payload is None:
                    try:
                        payload = cloudpickle.dumps(cls)
                    except Exception as exc:  # noqa: BLE001 - named in the error later
                        payload = f"{type(exc).__name__}: {exc}"
                    self._class_payloads[cls] = payload
                out.append((kind, name, payload))
        return out

    # Functions ------------------------------------------------------------------------------

    def ref(self, ef: Any) -> FunctionRef:
        """The ref that stands for ``ef`` in requests (the same for equal configs)."""
        with self._lock:
            known = self._refs.get(id(ef))  # a function kept alive here: pickled already
            if known is not None:
                return known[0]
        key, alternatives, name = self._describe(ef)
        with self._lock:
            known = self._refs.get(key)
            if known is not None:
                return known[0]
            ref = FunctionRef(secrets.token_hex(12), name)
            self._refs[key] = (ref, alternatives)
            if isinstance(key, int):
                self._keep.append(ef)
            return ref

    def definition(self, ref: FunctionRef) -> list[tuple[str, Any]]:
        """The ways ``ref`` can be built in a worker, best first."""
        with self._lock:
            for known, alternatives in self._refs.values():
                if known is ref:
                    return alternatives
        raise KeyError(ref.token)  # pragma: no cover - refs only come from ref()

    def explain(self, message: str) -> str | None:
        """A fuller message for chromadb's "Embedding function X not found", naming the fix."""
        marker = "Embedding function "
        if marker not in message or "not found" not in message:
            return None
        name = message.split(marker, 1)[1].split(" not found", 1)[0]
        why = None
        regs = _registries()
        cls = None if regs is None else (regs[0].get(name) or regs[1].get(name))
        if cls is not None:
            payload = self._class_payloads.get(cls)
            why = payload if isinstance(payload, str) else None
        if cls is None:
            reason = f"no class is registered as {name!r} in this program either"
        elif why:
            reason = f"the program's class for {name!r} could not be sent to the worker ({why})"
        else:
            reason = f"the program's class for {name!r} could not be rebuilt in the worker"
        return (
            f"{message} (safechroma: {reason}. Fix: register the class in an importable "
            "module, at top level, before the collection is opened, or pass "
            "embedding_function= when you open the collection.)"
        )

    def _describe(self, ef: Any) -> tuple[Any, list[tuple[str, Any]], str]:
        cls = type(ef)
        name, config, legacy = _identity(ef)
        regs = _registries()
        registered = None
        if regs is not None and name is not None:
            registered = regs[0].get(name) or regs[1].get(name)
        stand_in = (name, config, _spaces(ef))
        label = str(name or getattr(cls, "__qualname__", None) or repr(ef))
        if not legacy and config is not None and registered is cls:
            key = ("config", cls, name, _config_key(config))
            return key, [(CONFIG, (name, config)), (CALLER, stand_in)], label
        try:
            data: Any = cloudpickle.dumps(ef)
        except Exception as exc:  # noqa: BLE001 - any failure to pickle: the next way
            logger.info("embedding function %s cannot be pickled (%s)", label, exc)
            data = None
        alternatives: list[tuple[str, Any]] = []
        if data is not None:
            alternatives.append((VALUE, data))
        if not legacy and config is not None and registered is not None:
            alternatives.append((CONFIG, (name, config)))
        alternatives.append((CALLER, stand_in))
        return id(ef), alternatives, label


def _identity(ef: Any) -> tuple[str | None, dict[str, Any] | None, bool]:
    try:
        legacy = bool(ef.is_legacy())
    except Exception:  # noqa: BLE001 - functions without the method are legacy ones
        legacy = True
    try:
        name = str(ef.name())
    except Exception:  # noqa: BLE001
        name = None
    try:
        config = ef.get_config()
        json.dumps(config)  # only a config that chromadb could record
    except Exception:  # noqa: BLE001
        config = None
    return name, config if isinstance(config, dict) else None, legacy


def _spaces(ef: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in ("default_space", "supported_spaces"):
        try:
            out[attr] = getattr(ef, attr)()
        except Exception:  # noqa: BLE001 - optional in chromadb's protocol
            continue
    return out


def _config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=repr)


# -- the worker's side --------------------------------------------------------------------------

_table: dict[str, Any] = {}


def lookup(token: str) -> Any:
    """Unpickling a :class:`FunctionRef` in the worker: the function defined for it."""
    try:
        return _table[token]
    except KeyError:
        raise ValueError(
            "safechroma: an embedding function was used before it was sent to this worker"
        ) from None


def register(entries: list[tuple[str, str, Any]]) -> None:
    """Register the program's classes in this worker's chromadb registries (``Op.REGISTER``)."""
    from chromadb.utils import embedding_functions as efs

    for kind, name, payload in entries:
        registry: dict[str, Any] = efs.known_embedding_functions
        if kind != "dense":
            registry = efs.sparse_known_embedding_functions
        if isinstance(payload, str):
            continue  # it could not be pickled: the caller names it if chromadb asks for it
        try:
            cls = cloudpickle.loads(payload)
        except Exception:  # noqa: BLE001 - chromadb's "not found" names it, with the fix
            logger.warning("the embedding function class %r cannot be rebuilt here", name)
            continue
        registry.setdefault(name, cls)


def define(token: str, alternatives: list[tuple[str, Any]]) -> tuple[str, list[str]]:
    """Build the function for ``token`` the first way that works (``Op.DEFINE``).

    Returns:
        The way that worked, and why each earlier way failed.
    """
    failures: list[str] = []
    for mode, data in alternatives:
        try:
            if mode == CONFIG:
                name, config = data
                _table[token] = _build(name, config)
            elif mode == VALUE:
                _table[token] = cloudpickle.loads(data)
            else:
                _table[token] = _stand_in(*data)
            return mode, failures
        except Exception as exc:  # noqa: BLE001 - reported to the caller, next way tried
            failures.append(f"{mode}: {type(exc).__name__}: {exc}")
    raise ValueError("; ".join(failures))  # pragma: no cover - the stand-in always builds


def _build(name: str, config: dict[str, Any]) -> Any:
    from chromadb.utils import embedding_functions as efs

    cls = efs.known_embedding_functions.get(name) or efs.sparse_known_embedding_functions.get(name)
    if cls is None:
        raise ValueError(f"no embedding function is registered as {name!r} in the worker")
    return cls.build_from_config(config)


def _stand_in(name: str | None, config: dict[str, Any] | None, spaces: dict[str, Any]) -> Any:
    from chromadb.api.types import EmbeddingFunction

    class CallerSideEmbeddingFunction(EmbeddingFunction):  # type: ignore[type-arg]
        """Records the caller's function's name and config; the caller computes vectors."""

        def __init__(self) -> None:
            pass

        def __call__(self, input: Any) -> Any:  # noqa: A002 - chromadb's name
            raise ValueError(
                f"safechroma: the embedding function {name!r} runs in the caller (it cannot be "
                "sent to the worker); pass embeddings, or use this collection through the "
                "SafeCollection that opened it"
            )

        @staticmethod
        def name() -> str:
            return name or "legacy"

        def get_config(self) -> dict[str, Any]:
            return dict(config or {})

        def is_legacy(self) -> bool:
            return config is None

        def default_space(self) -> Any:
            return spaces.get("default_space", "l2")

        def supported_spaces(self) -> Any:
            return spaces.get("supported_spaces", ["cosine", "l2", "ip"])

    return CallerSideEmbeddingFunction()


# The caller's one set: refs are per process, shared by every directory's supervisor.
FUNCTIONS: Final = Functions()
