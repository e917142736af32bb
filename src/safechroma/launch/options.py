"""Every ``SafeClient`` option as an environment variable and a ``safechroma run`` flag.

One table, :data:`OPTIONS`, drives all three faces: ``SAFECHROMA_<NAME>`` variables read by
the start-up hook in every Python process of a program run under ``safechroma run``, the
flags of ``safechroma run`` (which only turn into those variables), and the README's table
(a test keeps them equal). Values are text; each option says how it is read:

- ``seconds``: a number, or ``none`` for no deadline;
- ``int`` / ``bytes``: an integer; ``bytes`` also takes ``K``, ``M``, ``G`` suffixes and
  ``none``;
- ``bool``: ``1``/``0``, ``true``/``false``, ``yes``/``no``, ``on``/``off``;
- ``callable``: ``module:function`` (imported in each process), or ``none``/``default``;
- ``breaker``: ``max_deaths=5,window=60,...`` (fields of :class:`safechroma.BreakerPolicy`).

No I/O here but reading ``os.environ``; nothing imports chromadb.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any, Final

from .._env import RUN_VAR as RUN_VAR

PREFIX: Final = "SAFECHROMA_"

# Not options of SafeClient but of the launcher itself.
EVENTS_VAR: Final = "SAFECHROMA_EVENTS"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One option: its ``Options`` field, how its text is read, and a line of help."""

    field: str
    kind: str
    help: str

    @property
    def env(self) -> str:
        return PREFIX + self.field.upper()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


OPTIONS: Final[tuple[Spec, ...]] = (
    Spec("timeout", "seconds", "deadline of one call (default 600)"),
    Spec("start_timeout", "seconds", "deadline for a worker to open the directory (default 120)"),
    Spec("read_retries", "int", "retries of a read after a worker death (default 2)"),
    Spec("replay_writes", "bool", "resend add/upsert/update/delete after a death (default off)"),
    Spec("exclusive", "bool", "one process only; others get DirectoryLockedError (default off)"),
    Spec("lock_timeout", "seconds", "wait this long for a directory held exclusively (default 0)"),
    Spec("validator", "callable", "check before each start (default: the built-in check)"),
    Spec("recovery", "callable", "repair when the check fails (default: the built-in repair)"),
    Spec("recover_on_damage_errors", "bool", "validate after Chroma reports damage (default on)"),
    Spec("breaker", "breaker", "crash-loop breaker fields, e.g. max_deaths=5,window=60"),
    Spec("memory_limit", "bytes", "worker address-space ceiling (default: half the RAM, >= 4G)"),
    Spec("max_reply_bytes", "bytes", "largest reply accepted (default 16G)"),
    Spec("standby", "bool", "keep a warm spare worker (default on)"),
    Spec("reembed", "callable", "documents -> embeddings, for records whose vectors are lost"),
    Spec("worker_init", "callable", "run in each new worker before it opens the directory"),
    Spec("max_requests", "int", "replace the worker after this many calls (default never)"),
    Spec("max_worker_rss", "bytes", "replace the worker above this resident size (default never)"),
    Spec("max_file_bytes", "bytes", "largest file the worker may write (default auto)"),
    Spec("keep_warm", "seconds", "keep a shared worker this long after its last process ends"),
    Spec("on_event", "callable", "called with each Event (after the launcher's stderr line)"),
    Spec("journal", "bool", "copy each write to .safechroma/journal before acking (default on)"),
)
BY_FIELD: Final = {spec.field: spec for spec in OPTIONS}

_TRUE: Final = {"1", "true", "yes", "on"}
_FALSE: Final = {"0", "false", "no", "off", ""}
_SUFFIX: Final = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class OptionError(ValueError):
    """An option's text cannot be read; the message names the variable and what it takes."""


def parse(spec: Spec, text: str) -> Any:
    """The ``Options`` value of ``text`` for ``spec``.

    Raises:
        OptionError: ``text`` is not a value of this option's kind.
    """
    raw = text.strip()
    low = raw.lower()
    try:
        if spec.kind == "seconds":
            return None if low == "none" else float(raw)
        if spec.kind == "int":
            return None if low == "none" else int(raw)
        if spec.kind == "bytes":
            if low in ("none", "auto"):
                return None if low == "none" else "auto"
            if low and low[-1] in _SUFFIX:
                return int(float(low[:-1]) * _SUFFIX[low[-1]])
            return int(raw)
        if spec.kind == "bool":
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if spec.kind == "callable":
            if low == "none":
                return None
            if low == "default":
                return _DEFAULT
            return _import(raw)
        if spec.kind == "breaker":
            from .._policy import BreakerPolicy

            fields = {f.name: f.type for f in dataclasses.fields(BreakerPolicy)}
            values: dict[str, Any] = {}
            for part in filter(None, (p.strip() for p in raw.split(","))):
                key, _, value = part.partition("=")
                if key not in fields:
                    raise ValueError(f"unknown field {key!r}")
                values[key] = float(value) if fields[key] == "float" else int(value)
            return BreakerPolicy(**values)
    except (ValueError, ImportError, AttributeError) as exc:
        raise OptionError(
            f"{spec.env}={text!r} is not a valid {spec.kind} ({spec.help}): {exc}"
        ) from None
    raise AssertionError(spec.kind)  # pragma: no cover - every kind is handled above


_DEFAULT: Final = object()  # "default": leave the option at its Options default


def _import(ref: str) -> Callable[..., Any]:
    module, sep, name = ref.partition(":")
    if not sep or not module or not name:
        raise ValueError("expected module:function")
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{ref} is not callable")
    return target  # type: ignore[no-any-return]


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``SafeClient`` keyword arguments that ``SAFECHROMA_*`` variables set.

    Raises:
        OptionError: a variable holds a value its option does not take.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for spec in OPTIONS:
        text = env.get(spec.env)
        if text is None:
            continue
        value = parse(spec, text)
        if value is not _DEFAULT:
            out[spec.field] = value
    return out


def check(spec: Spec, text: str) -> None:
    """Raise :class:`OptionError` if ``text`` is not a value of ``spec``. A callable is only
    checked for its ``module:function`` form: importing it is the program's business."""
    if spec.kind == "callable":
        low = text.strip().lower()
        module, sep, name = text.strip().partition(":")
        if low not in ("none", "default") and not (sep and module and name):
            raise OptionError(f"{spec.env}={text!r} is not module:function, none or default")
        return
    parse(spec, text)


def to_env(values: Mapping[str, str]) -> dict[str, str]:
    """``SAFECHROMA_*`` variables for option texts given by field name (checked first)."""
    out = {}
    for field, text in values.items():
        spec = BY_FIELD[field]
        check(spec, text)  # fail here, in the launcher, not in every child
        out[spec.env] = text
    return out


def events_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the launcher prints a line to stderr per worker death and repair (default)."""
    env = os.environ if environ is None else environ
    return env.get(EVENTS_VAR, "1").strip().lower() not in _FALSE
