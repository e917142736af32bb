"""On-disk knowledge of a Chroma persist directory: the HNSW format, checks and repairs.

Pure functions that return reports. Nothing here imports chromadb: the validator must work on
a directory whose files would crash Chroma, and from a process that never loads it. Writing
through Chroma (the salvage write-back) happens in a worker, by name; the rebuild of a damaged
``chroma.sqlite3`` in a child started as ``python -m safechroma.jobs.build_sqlite``. Nothing
here imports the API, the runtime, the jobs or the command line (tests/test_layers.py).

The modules, each importing only those listed before it:

* ``layout`` (file names, stamps, atomic writes), ``replay``, ``schema``, ``sqlite_pages``,
  ``hnsw`` (``files``, ``check``, ``salvage``), ``limits``;
* checks: ``check_report``, ``sqlite_catalog``, ``validate_replay``, ``validate``;
* the write journal and WAL retention: ``journal``, ``wal``;
* repairs: ``reports``, ``label_map``, ``embedding``, ``salvage_apply``, ``journal_fill``, the
  ``chroma.sqlite3`` salvage (``sqlite_rows``, ``sqlite_assemble``, ``sqlite_salvage``), and
  ``recovery``, the entry point, which re-exports the repair functions for its callers.
"""
