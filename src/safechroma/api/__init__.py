"""The API users touch: chromadb's client and collection interfaces, sync and async.

Owns argument shapes and return types only. Every call is handed to the runtime's supervisor
(:mod:`safechroma.runtime`); nothing here knows about processes, sockets or the disk.
"""
