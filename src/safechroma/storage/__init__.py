"""On-disk knowledge of a Chroma persist directory: the HNSW format, checks and repairs.

Pure functions that return reports. Nothing here imports chromadb: the validator must work on
a directory whose files would crash Chroma, and from a process that never loads it. Writing
through Chroma (the salvage write-back) happens in a worker, by name.
"""
