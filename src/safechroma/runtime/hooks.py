"""The hook runner: validate a directory, and recover it when the validator reports damage.

One supervision for every face (issue 22): ``SafeClient``'s supervisor, ``safechroma serve`` and
the command line all run the user's hooks through :func:`check_and_recover`, so the verdicts, the
errors and the events are the same whoever starts Chroma on the directory. It runs in the
caller's process with no worker on the directory; it starts nothing and writes nothing itself
but one record in the write journal (the write a dead worker left undecided: voided or marked
settled, :func:`safechroma.storage.journal.settle`, after playing back a hot SQLite journal as
Chroma's next open would); the hooks write, and the salvage they
leave is written back by :mod:`safechroma.jobs.apply_salvage` or the supervisor's worker. It
never prints: what happened goes to ``emit`` as events.

The steps, in order::

    settle the journal        (no validator needed; never raises)
    validator(ctx)            -> report    (no validator: healthy, nothing else runs)
    report "incompatible"     -> IncompatibleDirectoryError (no repair, nothing written)
    emit("validated")
    healthy                   -> HookResult(healthy=True)
    no recovery hook          -> RecoveryError
    recovery(ctx + report)    -> result    (raises: "recovery_failed" + RecoveryError)
    result "not_repairable"   -> "recovery_failed" + RecoveryError
    emit("recovered")         -> HookResult(healthy=False, result=..., salvage_files=...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._errors import RecoveryError
from .._policy import HookContext, Recovery, Validator

__all__ = ["HookResult", "check_and_recover", "describe_report", "is_damaged"]


@dataclass
class HookResult:
    """What :func:`check_and_recover` found and did.

    Attributes:
        healthy: False when the validator reported damage (and the recovery hook then ran).
        report: the validator's report (None without a validator).
        result: the recovery hook's result, None if healthy.
        salvage_files: files of salvaged records the recovery left to be written back through
            Chroma before anyone uses the directory.
        incomplete_records: records the recovery could not bring back whole (issue 21).
        losses_file: the file naming those records, if any.
    """

    healthy: bool
    report: Any
    result: Any = None
    salvage_files: list[str] = field(default_factory=list)
    incomplete_records: int = 0
    losses_file: str | None = None


def is_damaged(report: Any) -> bool:
    """Whether a validator's report means damage.

    Only when it says so: "cannot check" (a fresh directory, a busy SQLite) is never a reason
    to touch the files. A report with a ``status`` is damaged when it is ``"damaged"``; one with
    only ``healthy`` when that is false; anything else is healthy.
    """
    status = getattr(report, "status", None)
    if status is not None:
        return bool(status == "damaged")
    return not bool(getattr(report, "healthy", True))


def describe_report(report: Any) -> str:
    """One line about a report: the built-in one's status, collections and finding codes; a
    user report's own ``summary()`` or ``describe()``; else its text (at most 500 chars)."""
    status = getattr(report, "status", None)
    collections = getattr(report, "collections", None)
    if status is None or collections is None:
        for name in ("summary", "describe"):
            fn = getattr(report, name, None)
            if callable(fn):
                return str(fn())
        return str(report)[:500]
    damaged = [c for c in collections if getattr(c, "status", "") == "damaged"]
    findings = [f.code for f in getattr(report, "findings", [])]
    findings += [f"{c.name}: {f.code}" for c in damaged for f in c.findings]
    text = f"{status}, {len(collections)} collection(s)"
    return text + (f"; {', '.join(findings[:8])}" if findings else "")


def _settle_journal(path: str) -> None:
    """Decide the write the last worker died in, if it journaled one: voided when Chroma never
    committed it (:func:`safechroma.storage.journal.settle`), before a repair could write it
    back to some of its ids and before the next worker writes. Never raises: the journal is a
    second copy, and the record then stays as it is. A hot SQLite journal (the worker died
    inside Chroma's transaction) is played back first, as the next worker's open would."""
    try:
        from ..storage.journal import settle

        settle(path, roll_back=True)
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def check_and_recover(
    path: str,
    *,
    reason: str,
    crash: BaseException | None,
    attempt: int,
    validator: Validator | None,
    recovery: Recovery | None,
    emit: Callable[..., None],
) -> HookResult:
    """Run the validator on ``path`` and, on damage, the recovery hook.

    Args:
        path: the persist directory (absolute); no process may have Chroma open on it.
        reason: why the hooks run (``HookContext.reason``: "start", "crash", "damage", ...).
        crash: the error that led here, if any.
        attempt: 1 for the first check after a healthy period, then 2, 3, ...
        validator: the validator hook; None: the directory counts as healthy.
        recovery: the recovery hook; None: damage raises :class:`safechroma.RecoveryError`.
        emit: called as ``emit(kind, pid, **detail)`` for ``validated``, ``recovered`` and
            ``recovery_failed`` (pid is always None: no worker is involved).

    Returns:
        A :class:`HookResult`.

    Raises:
        IncompatibleDirectoryError: the validator says a newer chromadb wrote the directory.
        RecoveryError: damage and no recovery hook, the recovery raised, or it reported
            ``status == "not_repairable"``.
        Exception: whatever the validator itself raises, unchanged.
    """
    _settle_journal(path)
    if validator is None:
        return HookResult(healthy=True, report=None)
    ctx = HookContext(path, reason, crash, attempt)  # type: ignore[arg-type]
    report = validator(ctx)
    if getattr(report, "status", None) == "incompatible":
        # A newer chromadb wrote it (chroma#5909): no worker, no repair, nothing written.
        from ..storage.validate import incompatible_error

        raise incompatible_error(report)
    healthy = not is_damaged(report)
    emit("validated", None, healthy=healthy, report=report, reason=reason)
    if healthy:
        return HookResult(healthy=True, report=report)
    summary = describe_report(report)
    if recovery is None:
        raise RecoveryError(
            f"{path} is damaged and no recovery hook is set: {summary}. "
            f"Run `safechroma repair {path}`.",
            path=path,
            report=report,
        )
    try:
        result = recovery(HookContext(path, ctx.reason, crash, attempt, report))
    except Exception as exc:
        emit("recovery_failed", None, error=repr(exc))
        raise RecoveryError(
            f"{path} is damaged ({summary}) and recovery failed: {exc}",
            path=path,
            report=report,
        ) from exc
    if getattr(result, "status", None) == "not_repairable":
        emit("recovery_failed", None, report=result)
        raise RecoveryError(
            f"{path} is damaged ({summary}) and could not be repaired: "
            f"{getattr(result, 'message', result)}",
            path=path,
            report=report,
        )
    salvage = [str(f) for f in getattr(result, "salvage_files", None) or []]
    incomplete = int(getattr(result, "incomplete_records", 0) or 0)
    losses = getattr(result, "losses_file", None)
    # Issue 21: a repair that could not bring every record back whole says so, with the count
    # and the file that names them.
    emit(
        "recovered",
        None,
        report=result,
        incomplete_records=incomplete,
        losses_file=losses,
        summary=getattr(result, "message", None) or str(result)[:300],
    )
    return HookResult(
        healthy=False,
        report=report,
        result=result,
        salvage_files=salvage,
        incomplete_records=incomplete,
        losses_file=None if losses is None else str(losses),
    )
