"""The environment of safechroma's own processes, kept apart from the programs it protects.

``safechroma run`` and :func:`safechroma.patch` set ``SAFECHROMA_RUN``, which makes the start-up
hook patch chromadb in every Python process that has it (:mod:`safechroma.launch.hook`). The
processes safechroma starts for itself (the warm template, workers, repair and write-back jobs)
open the directory with chromadb itself, so they must never be patched: they are started with
:func:`private_env`, and a worker also marks itself with :func:`mark_own_process` before it
imports chromadb. Without that, a worker would build a ``SafeClient`` for its own directory and
wait for itself (measured with a ``sitecustomize`` launcher: a 120 s hang at start).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

RUN_VAR: Final = "SAFECHROMA_RUN"

_own_process = False


def private_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a process of safechroma's own: the caller's, minus the trigger."""
    env = dict(os.environ if base is None else base)
    env.pop(RUN_VAR, None)
    return env


def mark_own_process() -> None:
    """Called first thing in safechroma's own processes: chromadb is never patched there."""
    global _own_process
    _own_process = True
    os.environ.pop(RUN_VAR, None)


def own_process() -> bool:
    """Whether this is one of safechroma's own processes."""
    return _own_process
