"""What wraps programs nobody rewrote: ``safechroma run`` and :func:`patch`.

- :mod:`.options`: every ``SafeClient`` option as a ``SAFECHROMA_*`` variable and a flag;
- :mod:`.hook`: the start-up hook (``safechroma-run.pth``) that patches chromadb;
- :mod:`.events`: the stderr line per worker death and repair;
- :mod:`.run`: the ``safechroma run`` command;
- :func:`patch` / :func:`unpatch`: the same from one line of code.
"""

from __future__ import annotations

import os
from typing import Any

from . import hook
from .events import with_stderr_events
from .options import BY_FIELD, RUN_VAR

__all__ = ["patch", "unpatch"]

_saved_env: dict[str, str | None] | None = None


def patch(**options: Any) -> None:
    """Make every ``chromadb.PersistentClient`` a :class:`safechroma.SafeClient`, from now on.

    In this process, and in the Python processes it starts afterwards (they inherit
    ``SAFECHROMA_RUN`` and the options that can be written as text: numbers, flags, and
    functions importable as ``module:function``; the others stay in this process). Call it
    before the program builds its clients; clients built before keep what they are.

    Args:
        **options: ``SafeClient`` options (:class:`safechroma.Options`), as for ``SafeClient``.

    Raises:
        TypeError: an option ``SafeClient`` does not have.
    """
    global _saved_env
    from .._policy import Options

    Options(**options)  # unknown names and wrong types fail here, not at the first client
    env: dict[str, str] = {RUN_VAR: "1"}
    for name, value in options.items():
        text = _as_text(value)
        if text is not None and name in BY_FIELD:
            env[BY_FIELD[name].env] = text
    if _saved_env is None:
        _saved_env = {key: os.environ.get(key) for key in env}
    else:
        for key in env:
            _saved_env.setdefault(key, os.environ.get(key))
    os.environ.update(env)
    hook.install(with_stderr_events(options))


def unpatch() -> None:
    """Undo :func:`patch`: chromadb's own constructors back, the environment as it was.

    Clients already built stay ``SafeClient``s until closed.
    """
    global _saved_env
    hook.uninstall()
    if _saved_env is not None:
        for key, value in _saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _saved_env = None


def _as_text(value: Any) -> str | None:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float, str)):
        return str(value)
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if callable(value) and module and qualname and module != "__main__" and "<" not in qualname:
        return f"{module}:{qualname}"
    return None
