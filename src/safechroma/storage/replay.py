"""What Chroma's next open will make of a collection: the WAL replay, simulated without Chroma.

Every chromadb 1.5.9 process starts with a backfill (rust/log/src/local_compaction_manager.rs):
it reads the WAL above the smaller of the two segments' ``max_seq_id`` and applies to each
segment the rows above its own. The vector index starts from ``index_metadata.pickle`` (its
``id_to_label`` map) when the pickle holds ids, otherwise from nothing and sequence 0
(rust/segment/src/local_hnsw.rs). Its ``apply_log_chunk``:

* ADD of an id not in the map takes the next label (``total_elements_added + 1``), ADD of a known
  id does nothing; UPSERT takes the id's label or the next one; UPDATE rewrites the vector of a
  known id and ignores an unknown one; DELETE of a known id drops it from the map and marks its
  element deleted, and ignores an unknown one. ADD and UPSERT without a vector fail.
* Writing a vector to a label (hnswlib ``addPoint``) clears the element's deleted mark;
  ``markDelete`` fails on an element that is already deleted ("The requested to delete element
  is already deleted") or on a label the index does not hold ("Label not found").

A failure fails the whole backfill, and with it the first call of every process, ``count()``
included ("Failed to apply logs to the hnsw segment writer", chroma-core/chroma#7678).
Reproduced on 1.5.9: a kill after the index files are written and before the pickle is (the
flush writes the pickle last, then ``max_seq_id``), with deletes among the rows of that flush.
A second call in the same process gets through only because the failed attempt had already
changed the in-memory id map: what that process then persists is whatever the half-applied
attempt left (#7678: "replaying the same logical records makes the segment worse").

The metadata segment applies the same rows with the same membership rules (ADD of a known id
and UPDATE or DELETE of an unknown one are ignored). After the replay both segments must hold
the same ids: an id only the metadata segment has makes ``get``/``query`` raise "Error finding
id" (chroma-core/chroma#7032); an id only the index has is returned by ``query`` although
``get`` does not know it.

Pure functions over plain data: the callers read SQLite and the index files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["ReplayOutcome", "WalRow", "replay_index", "replay_metadata"]

ADD, UPDATE, UPSERT, DELETE = 0, 1, 2, 3
_OP_NAMES = {ADD: "ADD", UPDATE: "UPDATE", UPSERT: "UPSERT", DELETE: "DELETE"}

# One WAL row: (seq_id, id, operation, has a vector).
WalRow = tuple[int, str, int, bool]


@dataclass
class ReplayOutcome:
    """The vector index after replaying the WAL, as chromadb 1.5.9 would.

    Attributes:
        ids: The ids the index maps after the replay (up to the failure, if any).
        applied: Rows replayed.
        failure: Why chromadb cannot apply the WAL, or ``None``.
        failure_row: The row it fails on.
    """

    ids: set[str] = field(default_factory=set)
    applied: int = 0
    failure: str | None = None
    failure_row: WalRow | None = None


def op_name(op: int) -> str:
    """``"ADD"``, ``"UPDATE"``, ``"UPSERT"``, ``"DELETE"`` (or the number)."""
    return _OP_NAMES.get(op, str(op))


def replay_index(
    id_to_label: Mapping[str, int] | None,
    total_elements_added: int,
    rows: Iterable[WalRow],
    *,
    element_count: int | None = None,
    deleted_labels: set[int] | None = None,
) -> ReplayOutcome:
    """Replay ``rows`` (ascending ``seq_id``, all above the index's own) onto a loaded index.

    Args:
        id_to_label: The pickle's map (``None`` or empty: a new, empty index).
        total_elements_added: The pickle's counter (labels above it are new).
        rows: WAL rows to apply.
        element_count: Elements in the index files (labels ``1..element_count`` exist), or
            ``None`` when unknown: then deletes are not checked against the files.
        deleted_labels: Labels whose element is marked deleted in the files.

    Returns:
        A :class:`ReplayOutcome`.
    """
    base: Mapping[str, int] = id_to_label or {}
    fresh = not base
    cur = 0 if fresh else element_count
    deleted = set() if fresh else (deleted_labels or set())
    added: dict[str, int] = {}
    removed: set[str] = set()
    marks: dict[int, bool] = {}  # label -> deleted, for labels the replay touched
    next_label = (0 if fresh else int(total_elements_added)) + 1
    out = ReplayOutcome()

    def label_of(ident: str) -> int | None:
        if ident in added:
            return added[ident]
        if ident in removed:
            return None
        return base.get(ident)

    def fail(why: str, row: WalRow) -> ReplayOutcome:
        out.failure = why
        out.failure_row = row
        return out

    for row in rows:
        _seq, ident, op, has_vec = row
        lab = label_of(ident)
        if op == ADD:
            if lab is None:
                if not has_vec:
                    return _finish(fail("an ADD without a vector", row), base, added, removed)
                added[ident] = next_label
                removed.discard(ident)
                marks[next_label] = False
                next_label += 1
        elif op == UPSERT:
            if not has_vec:
                return _finish(fail("an UPSERT without a vector", row), base, added, removed)
            if lab is None:
                lab = next_label
                next_label += 1
                added[ident] = lab
                removed.discard(ident)
            marks[lab] = False
        elif op == UPDATE:
            if lab is not None and has_vec:
                marks[lab] = False
        elif op == DELETE:
            if lab is not None:
                if cur is not None:
                    exists = lab <= cur or lab in marks
                    if not exists:
                        why = f"a DELETE of label {lab}, which the index files do not hold"
                        return _finish(fail(why, row), base, added, removed)
                    if marks.get(lab, lab in deleted):
                        why = f"a DELETE of label {lab}, whose element is already deleted"
                        return _finish(fail(why, row), base, added, removed)
                marks[lab] = True
                added.pop(ident, None)
                if ident in base:
                    removed.add(ident)
        out.applied += 1
    return _finish(out, base, added, removed)


def _finish(
    out: ReplayOutcome, base: Mapping[str, int], added: dict[str, int], removed: set[str]
) -> ReplayOutcome:
    out.ids = (set(base) - removed) | set(added)
    return out


def replay_metadata(ids: Iterable[str], rows: Iterable[WalRow]) -> set[str]:
    """The metadata segment's ids after replaying ``rows`` (above its own ``max_seq_id``)."""
    live = set(ids)
    for _seq, ident, op, _has_vec in rows:
        if op in (ADD, UPSERT):
            live.add(ident)
        elif op == DELETE:
            live.discard(ident)
    return live
