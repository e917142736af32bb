"""``SafeHttpClient``, ``AsyncSafeHttpClient`` and ``HttpStats`` at their former import path.

The code is in :mod:`safechroma.http` (:mod:`~safechroma.http.client` for the clients and their
transports, :mod:`~safechroma.http.guard` for the decisions about each request); the public
names are ``safechroma.SafeHttpClient`` and friends, which this module also serves.
"""

from __future__ import annotations

from ..http.client import AsyncSafeHttpClient, HttpStats, SafeHttpClient
from ..http.guard import classify

__all__ = ["AsyncSafeHttpClient", "HttpStats", "SafeHttpClient", "classify"]
