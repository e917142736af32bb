"""What runs beside a live Chroma client: work that needs a worker (re-embedding saved records).

Above :mod:`safechroma.storage` (pure: files only) and beside :mod:`safechroma.api`: a job opens
a :class:`safechroma.SafeClient` and hands a storage function to its worker.
"""
