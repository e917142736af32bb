"""What runs beside a live Chroma client: work that opens a directory with Chroma.

Above :mod:`safechroma.storage` (pure: files only) and beside :mod:`safechroma.api`. Two kinds:

- :mod:`.reembed`: opens a :class:`safechroma.SafeClient` and hands a storage function to its
  worker (``safechroma.reembed``, in the caller's process);
- jobs run as their own process, ``python -m safechroma.jobs.<name>``, by the command line and
  ``safechroma serve`` through :mod:`.runner` (which also defines the lines they print):
  :mod:`.apply_salvage` (a repair's write-back), :mod:`.restore_saved` (``safechroma reembed``),
  and :mod:`.build_sqlite` (the rebuild step of the ``chroma.sqlite3`` salvage).
"""
