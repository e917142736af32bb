"""Will a collection's index and metadata agree after Chroma's next open? Part of
:func:`~safechroma.storage.validate.check_directory`.

The WAL (``embeddings_queue``) rows after what the segments hold are replayed as Chroma will
(:mod:`~safechroma.storage.replay`): an index that cannot catch up, and ids the two segments
will disagree on afterwards, are findings (issue 13). With nothing to replay the index's ids
and the metadata segment's rows are compared as they are.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import numpy as np

from safechroma.storage.check_report import CollectionReport
from safechroma.storage.hnsw import (
    Finding,
)
from safechroma.storage.replay import op_name, replay_index, replay_metadata


def _check_replay(
    c: CollectionReport, con: sqlite3.Connection, topic: str, meta: dict[str, Any] | None
) -> None:
    """Replay the WAL as Chroma's next open will (:mod:`safechroma.storage.replay`).

    Two findings (issue 13): the index cannot catch up with the WAL (the first call of every
    process fails, chroma#7678), and ids the two segments will disagree on afterwards
    (chroma#7032). Runs when the index files were walked in full (the deep check) and the
    pickle parsed; it needs the live labels of that walk, which it then drops from the report.
    """
    seg = c.hnsw
    assert seg is not None and c.metadata_segment_id is not None
    live = seg._live_labels
    seg._live_labels = None
    if live is None or seg.header is None:
        return
    cur = seg.header.cur_element_count
    i2l: Any = None
    total = 0
    start = c.index_max_seq_id
    if seg.has_pickle:
        if meta is None or not isinstance(meta.get("id_to_label"), dict):
            return
        i2l = meta["id_to_label"]
        total = meta.get("total_elements_added") or 0
        if not isinstance(total, int):
            return
        legacy = meta.get("max_seq_id")
        if start == 0 and isinstance(legacy, int):
            start = legacy  # 1.5.9 moves a legacy pickle's max_seq_id into SQLite on open
    elif cur > 0:
        return  # pickle_missing: Chroma starts the index over; reported already
    if not i2l:
        i2l, total, start = None, 0, 0  # Chroma takes the segment for new (local_hnsw.rs)
    mt_start = c.metadata_max_seq_id or 0
    rows = [
        (int(r[0]), str(r[1]), int(r[2]), bool(r[3]))
        for r in con.execute(
            "SELECT seq_id, id, operation, vector IS NOT NULL FROM embeddings_queue "
            "WHERE topic = ? AND seq_id > ? ORDER BY seq_id",
            (topic, min(start, mt_start)),
        )
    ]
    if not rows:
        # Nothing to replay (the common case): the index holds the pickle's ids, the metadata
        # segment its rows; compare them without building either set.
        _compare_without_replay(c, con, i2l or {})
        return
    # The files' labels are 1..cur (FACTS §1): the deleted ones are the rest. If the live
    # labels say otherwise (reported by check_segment), deletes are not checked.
    deleted: set[int] | None = None
    n_live = int(live.size)
    if n_live <= cur and (n_live == 0 or (int(live.min()) >= 1 and int(live.max()) <= cur)):
        on = np.zeros(cur + 1, dtype=bool)
        on[live.astype(np.int64)] = True
        if int(on.sum()) == n_live:
            deleted = {int(x) for x in np.flatnonzero(~on[1:]) + 1}
    index = replay_index(
        i2l,
        total,
        [r for r in rows if r[0] > start],
        element_count=cur if deleted is not None else None,
        deleted_labels=deleted,
    )
    add = c.findings.append
    if index.failure is not None and index.failure_row is not None:
        seq, ident, op, _v = index.failure_row
        waiting = sum(1 for r in rows if r[0] > start)
        add(
            Finding(
                "wal_replay_fails",
                "the index cannot catch up with the WAL: the first call of every process fails "
                f'("Failed to apply logs to the hnsw segment writer") on {index.failure} (WAL '
                f"seq {seq}, "
                f"{op_name(op)} of {ident!r}); {waiting} WAL rows wait above the index's seq "
                f"{start}",
                c.segment_path,
            )
        )
        return
    meta_ids = replay_metadata(
        (
            str(r[0])
            for r in con.execute(
                "SELECT embedding_id FROM embeddings WHERE segment_id = ?",
                (c.metadata_segment_id,),
            )
        ),
        (r for r in rows if r[0] > mt_start),
    )
    _report_disagreement(c, meta_ids - index.ids, index.ids - meta_ids)


def _compare_without_replay(c: CollectionReport, con: sqlite3.Connection, i2l: Any) -> None:
    """:func:`_check_replay` when the WAL holds nothing to replay: one pass over the rows."""
    n = 0
    only_meta: set[str] = set()
    for (ident,) in con.execute(
        "SELECT embedding_id FROM embeddings WHERE segment_id = ?", (c.metadata_segment_id,)
    ):
        n += 1
        if ident not in i2l:
            only_meta.add(str(ident))
    only_index: set[str] = set()
    if len(i2l) != n - len(only_meta):
        meta_ids = {
            str(r[0])
            for r in con.execute(
                "SELECT embedding_id FROM embeddings WHERE segment_id = ?",
                (c.metadata_segment_id,),
            )
        }
        only_index = set(i2l) - meta_ids
    _report_disagreement(c, only_meta, only_index)


def _report_disagreement(c: CollectionReport, only_meta: set[str], only_index: set[str]) -> None:
    add = c.findings.append
    if only_meta or only_index:
        parts = []
        if only_meta:
            parts.append(
                f"{len(only_meta)} ids only in the metadata segment (e.g. {min(only_meta)!r}): "
                'get and filtered queries raise "Error finding id"'
            )
        if only_index:
            parts.append(
                f"{len(only_index)} ids only in the vector index (e.g. {min(only_index)!r}): "
                "query returns ids that get does not know"
            )
        add(
            Finding(
                "segments_disagree",
                "after Chroma replays the WAL, the metadata segment and the vector index "
                "disagree: " + "; ".join(parts),
                c.segment_path,
            )
        )


def _wal_uncovered(con: sqlite3.Connection, metadata_segment: str, topic: str) -> int:
    """Live records the WAL cannot rebuild (the WAL is a suffix: FACTS §2).

    A record is covered only when the write that made its current version (the row whose
    sequence id the metadata segment stored, ``embeddings.seq_id``) is an ADD (0) or UPSERT (2)
    with a vector still in the WAL. Replaying an UPDATE (1) onto an index that lacks the id is a
    no-op (measured: updated ids whose ADD was purged were not rebuilt), and an ADD row of an id
    that already existed was ignored by the metadata segment but is applied by a rebuild: the
    record would come back with that ignored write's vector (issue 7).
    """
    return int(
        con.execute(
            "SELECT count(*) FROM embeddings e WHERE e.segment_id = ? AND NOT EXISTS "
            "(SELECT 1 FROM embeddings_queue q WHERE q.seq_id = e.seq_id AND q.topic = ? "
            "AND q.id = e.embedding_id AND q.operation IN (0, 2) AND q.vector IS NOT NULL)",
            (metadata_segment, topic),
        ).fetchone()[0]
    )
