"""``safechroma.server``: where ``safechroma serve`` is documented to live.

The code is in :mod:`safechroma.http.serve` (Chroma over HTTP: the client and the server in
one package); this module keeps the documented import path,
``safechroma.server.Server(path, ServeOptions(...)).run()``.
"""

from __future__ import annotations

from .http.serve import ServeOptions, Server, State, describe, logger

__all__ = ["ServeOptions", "Server", "State", "describe", "logger"]
