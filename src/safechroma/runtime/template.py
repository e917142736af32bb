"""The process-wide warm worker template (placeholder until implemented)."""

from __future__ import annotations

from typing import Any


def fork_worker(info: dict[str, Any], fds: list[int]) -> Any:
    return None
