"""What the implementations of the platform seam share: the exit sentinel's interface and the
RSS watchdog's loop."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Final

# How often the watchdog reads the worker's resident memory: a runaway allocation grows by
# at most what it writes in this time before the worker ends.
WATCH_EVERY: Final = 0.1


class ExitSentinel:
    """How the caller will see a worker it is about to spawn exit.

    ``child_fd`` is a descriptor to hand to the child (None: nothing to hand); after the spawn,
    :meth:`started` returns the caller's watch (a descriptor readable once the worker exited; on
    Windows a process handle signalled then), or None when the system gives none;
    :meth:`abandon` closes everything if the spawn failed. This base hands and watches nothing.
    """

    child_fd: int | None = None

    def started(self, pid: int) -> int | None:
        return None

    def abandon(self) -> None:
        return None


def start_rss_watchdog(
    limit: int, read_rss: Callable[[], int | None], end: Callable[[], None]
) -> None:
    """Watch this process's resident memory in a daemon thread; past ``limit``, write why to
    the log (stderr: the crash error carries its tail) and ``end()`` the process."""
    if read_rss() is None:
        return  # nothing to read here: no watchdog rather than a blind one

    def watch() -> None:
        while True:
            time.sleep(WATCH_EVERY)
            rss = read_rss()
            if rss is not None and rss > limit:
                sys.stderr.write(
                    f"safechroma: the worker's resident memory ({rss >> 20} MiB) passed "
                    f"memory_limit ({limit >> 20} MiB); the worker ends itself (RSS watchdog, "
                    "pid {pid}).\n".replace("{pid}", str(os.getpid()))
                )
                sys.stderr.flush()
                end()

    threading.Thread(target=watch, name="safechroma-rss-watchdog", daemon=True).start()
