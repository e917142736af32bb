"""Who holds a directory, and what a client opened meanwhile is told (issue 22)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import vectors

from safechroma import DirectoryLockedError, SafeClient

HOLD = """
import sys, time
from safechroma.cli import _lock
fd = _lock(sys.argv[1])
print("held" if fd is not None else "refused", flush=True)
time.sleep(120)
"""


def test_a_client_opened_during_a_repair_is_refused_at_once(db: str) -> None:
    """Regression: `safechroma repair` took the lock and left the lock file naming the last
    shared worker, so a SafeClient opened meanwhile waited for that worker's replacement:
    37.8 s and then opened, or WorkerStartError after 3 x start_timeout. It must get
    DirectoryLockedError at once, naming the repair."""
    with SafeClient(db, validator=None) as client:
        client.create_collection("held", embedding_function=None).add(
            ids=["a", "b"], embeddings=vectors(2)
        )
    # The repair's own lock-taking, in another process, for as long as a big repair takes.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, db], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        start = time.monotonic()
        with pytest.raises(DirectoryLockedError, match="safechroma repair"):
            SafeClient(db, validator=None)
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    with SafeClient(db, validator=None) as client:  # free again once the repair is gone
        assert client.get_collection("held").count() == 2
