"""The worker process and its supervision: spawn, framed I/O, death detection, respawn.

Owns the worker's lifecycle (start, call, crash, validate/recover, respawn), the wire protocol
and the directory lock. It may call the storage hooks (:mod:`safechroma.storage`) but never
opens the directory with Chroma in the caller's process; only :mod:`.worker` imports chromadb,
and only inside the worker. Importing this package must stay cheap (no chromadb import).
"""
