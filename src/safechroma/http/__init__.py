"""Chroma over HTTP, made safe: the client and the server.

- :mod:`.client`: ``SafeHttpClient`` and ``AsyncSafeHttpClient``, chromadb's HTTP clients with
  guarded transports (deadlines, retries across restarts, backoff, a breaker);
- :mod:`.guard`: the decisions about each request, with no I/O;
- :mod:`.serve`: ``safechroma serve``, Chroma's own server on one directory, supervised.

Importing this package imports neither chromadb nor httpx; the modules do, when imported.
"""
