"""Which label of a damaged HNSW index belongs to which Chroma id.

Chroma maps labels to ids in ``index_metadata.pickle``; when that file is lost or damaged,
:func:`rebuild_label_map` recovers the map from the WAL's vectors (an exact match of the stored
vector) and :func:`snapshot_label_maps` keeps a copy of every healthy map in
``<path>/.safechroma/`` so a later repair can use it.
"""

from __future__ import annotations

import bisect
import os
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from safechroma.storage.hnsw import (
    PICKLE_FILE,
    LiveElements,
    read_index_metadata,
    read_label_map,
)
from safechroma.storage.layout import (
    STATE_DIR,
    _seq,
    _write_atomic,
)
from safechroma.storage.validate import (
    CollectionReport,
    DirectoryReport,
    check_directory,
)


@dataclass
class LabelMapRebuild:
    """A label map rebuilt from the metadata segment, with what proves it.

    Attributes:
        label_to_id: Every proven ``label -> id`` of a live element (known maps included).
        proven: Every live label on disk is mapped.
        live_labels: Live, intact elements on disk.
        known: Labels taken from a map that survived (the pickle's readable part, the
            snapshot safechroma keeps).
        paired: Labels mapped by pairing the collection's ``embeddings`` rows (by rowid)
            with the live labels (ascending).
        checked_against_wal: Pairs whose vector the WAL confirmed exactly.
        unproven: Why the labels that stay unmapped could not be proven.
    """

    label_to_id: dict[int, str]
    proven: bool = False
    live_labels: int = 0
    known: int = 0
    paired: int = 0
    checked_against_wal: int = 0
    unproven: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (the map itself is left out: it can be large)."""
        d = asdict(self)
        del d["label_to_id"]
        d["mapped"] = len(self.label_to_id)
        return d


def _same_vector(stored: np.ndarray, wal: np.ndarray, space: str) -> bool:
    """Whether an index element holds exactly the vector a WAL row wrote."""
    if stored.shape != wal.shape:
        return False
    if space == "cosine":
        n = float(np.linalg.norm(wal))
        if not n > 0:
            return False
        wal = wal / n
    return bool(np.allclose(stored, wal, rtol=1e-5, atol=1e-6))


def _matches_wal(
    stored: np.ndarray,
    ops: list[tuple[int, int, np.ndarray | None]],
    cur_seq: int,
    v_seq: int,
    space: str,
) -> bool | None:
    """Whether an element holds the last vector a live id's WAL writes after V left it with.

    Whether the id existed at V is unknown, so both cases are replayed with Chroma's rules
    (an ``add`` of a present id is ignored, an ``update`` of an absent one too); a case counts
    only if the last write it applies is the one the metadata segment recorded
    (``embeddings.seq_id``). Returns ``None`` when some consistent case applies no vector after
    V (the element then holds an older vector nothing can check), else whether it matches.
    """
    verdicts: list[bool] = []
    for present in (True, False):
        last_seq: int | None = None
        last_vec: np.ndarray | None = None
        for seq, op, vec in ops:
            applied = op == 2 or (op == 0 and not present) or (op in (1, 3) and present)
            if not applied:
                continue
            last_seq = seq
            if op == 3:
                present, last_vec = False, None
            else:
                present = True
                if vec is not None:
                    last_vec = vec
        if not present:
            continue
        if (last_seq if last_seq is not None else -1) != cur_seq and not (
            last_seq is None and cur_seq <= v_seq
        ):
            continue
        if last_vec is None:
            return None
        verdicts.append(_same_vector(stored, last_vec, space))
    if not verdicts:
        return False
    return any(verdicts)


def rebuild_label_map(
    path: str | os.PathLike[str],
    con: sqlite3.Connection,
    c: CollectionReport,
    elements: LiveElements,
) -> LabelMapRebuild:
    """Rebuild ``label -> id`` of a damaged index from SQLite, and map only what is proven.

    The facts (chromadb 1.5.9, ``rust/segment/src/local_hnsw.rs`` ``apply_log_chunk``; FACTS
    §3 "Labels"): each newly created id takes the next label (``total_elements_added + 1``),
    in log order; update and upsert keep it; a delete flags the element and the label is never
    given again; a re-added id gets a new one. The metadata segment creates the collection's
    ``embeddings`` row in the same order, so the rowid order of the live rows is the label order
    of the ids they name. The flushed index is the state at some sequence id ``T`` at or past
    the vector segment's recorded ``max_seq_id`` ``V``; every write after ``V`` is still in the
    WAL (Chroma purges below ``V`` only).

    Proof, segment by segment between labels whose id is known for certain (from the readable
    part of the pickle, or the snapshot :func:`snapshot_label_maps` keeps: labels are never
    reassigned, so an older map is right for every live label it has):

    * between two known labels (and before the first), the live rows and the live labels must
      be equally many: every such row existed at ``T`` (it is older than a known element), so
      the only possible difference is an id the index still has and SQLite deleted after
      ``T``, which makes the counts differ;
    * after the last known label, rows created after ``T`` follow the rest. The labels pair
      with the first rows; the rows left over must each have been created by a WAL write after
      ``V``. If an id with an unknown label was deleted after ``V``, its label might still be
      live (deleted after ``T``) and shift the pairing, so then every pair whose id has a vector
      written after ``V`` must hold that vector (a shifted pair holds another record's);
    * everywhere, a pair whose current write is a WAL row at or below ``V`` must hold exactly
      that row's vector.

    A segment that fails stays unmapped (its records are named, never guessed).

    Args:
        path: The persist directory (for the label-map snapshot).
        con: A read-only connection to its ``chroma.sqlite3``.
        c: The collection's report (segment ids, space, ``index_max_seq_id``).
        elements: The live elements of the damaged index (:func:`read_live_elements`).

    Returns:
        A :class:`LabelMapRebuild`.
    """
    root = os.fspath(path)
    labels = [int(x) for x in elements.labels.tolist()]
    pos = {lab: i for i, lab in enumerate(labels)}
    out = LabelMapRebuild(label_to_id={}, live_labels=len(labels))
    if not labels:
        out.proven = True
        return out
    meta_seg = c.metadata_segment_id or ""
    v_seq = int(c.index_max_seq_id or 0)
    rows: list[tuple[int, str, int]] = [
        (int(r[0]), str(r[1]), _seq(r[2]))
        for r in con.execute(
            "SELECT id, embedding_id, seq_id FROM embeddings WHERE segment_id = ? ORDER BY id",
            (meta_seg,),
        )
    ]
    row_of = {ident: k for k, (_rid, ident, _s) in enumerate(rows)}
    # The WAL after V, per id: (seq, op, vector or None).
    wal: dict[str, list[tuple[int, int, np.ndarray | None]]] = {}
    current: dict[str, np.ndarray] = {}
    cur_seq = {ident: sq for _r, ident, sq in rows}
    for seq, ident, op, blob, enc in con.execute(
        "SELECT seq_id, id, operation, vector, encoding FROM embeddings_queue WHERE topic LIKE ? "
        "ORDER BY seq_id",
        ("%/" + c.id,),
    ):
        seq = _seq(seq)
        vec = None
        if blob is not None and (enc or "FLOAT32").upper() == "FLOAT32":
            vec = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        if cur_seq.get(ident) == seq and vec is not None and op in (0, 1, 2) and seq <= v_seq:
            current[ident] = vec
        if seq > v_seq:
            wal.setdefault(ident, []).append((seq, int(op), vec))
    deleted_after = {i for i, ops in wal.items() if any(op == 3 for _s, op, _v in ops)}

    # Known labels: the readable part of the pickle, then the snapshot.
    known: dict[int, str] = {}
    conflict: set[int] = set()
    for src in (
        os.path.join(c.segment_path or "", PICKLE_FILE),
        _label_map_path(root, c.segment_id or ""),
    ):
        m = read_label_map(src) if os.path.isfile(src) else None
        for lab, ident in (m or {}).items():
            if lab in known and known[lab] != ident:
                conflict.add(lab)
            known.setdefault(lab, ident)
    for lab in conflict:
        known.pop(lab, None)
    anchors: list[tuple[int, int]] = []  # (label, row index), ascending label
    dead: set[int] = set()  # live labels whose id SQLite deleted after T
    for lab in sorted(known):
        if lab not in pos:
            continue  # deleted on disk, or beyond what survived
        ident = known[lab]
        if ident in row_of and ident not in deleted_after:
            anchors.append((lab, row_of[ident]))
        elif ident in deleted_after:
            dead.add(lab)  # live at T, deleted after: its current row (if any) is newer
        else:
            out.unproven.append(
                f"label {lab} maps to {ident!r}, which SQLite lacks without a later delete"
            )
            return out
    if any(b[1] <= a[1] for a, b in zip(anchors, anchors[1:], strict=False)):
        out.unproven.append("known labels are not in the order of their rows")
        return out
    mapped: dict[int, str] = {lab: rows[k][1] for lab, k in anchors}
    out.known = len(mapped)
    known_ids = set(known.values())
    anchor_rows = {k for _lab, k in anchors}
    dead_rows = {row_of[known[lab]] for lab in dead if known[lab] in row_of}

    def checked(lab: int, ident: str) -> bool | None:
        """The pair's vector against its current WAL row at or below V (None: no row)."""
        vec = current.get(ident)
        if vec is None:
            return None
        return _same_vector(elements.stored_of(pos[lab]), vec, c.space)

    bounds = anchors + [(labels[-1] + 1, len(rows))]
    prev_lab, prev_row = 0, -1
    for gi, (lab_b, row_b) in enumerate(bounds):
        tail = gi == len(bounds) - 1
        # labels is ascending: slice the gap instead of scanning it (many known labels make
        # many small gaps).
        lo, hi = bisect.bisect_right(labels, prev_lab), bisect.bisect_left(labels, lab_b)
        g_labels = [x for x in labels[lo:hi] if x not in dead and x not in mapped]
        g_rows = [
            k for k in range(prev_row + 1, row_b) if k not in anchor_rows and k not in dead_rows
        ]
        if not tail:
            ok = len(g_labels) == len(g_rows)
            if not ok:
                out.unproven.append(
                    f"labels {prev_lab}..{lab_b}: {len(g_labels)} live labels, {len(g_rows)} rows"
                )
        else:
            g_rows_all = g_rows + sorted(dead_rows)
            ok = len(g_labels) <= len(g_rows_all)
            if not ok:
                out.unproven.append(
                    f"labels after {prev_lab}: {len(g_labels)} live labels, only "
                    f"{len(g_rows_all)} rows (records deleted after the last flush)"
                )
            else:
                extra = g_rows_all[len(g_labels) :]
                created = [
                    k
                    for k in extra
                    if any(op in (0, 2) and v is not None for _s, op, v in wal.get(rows[k][1], []))
                ]
                if len(created) != len(extra):
                    ok = False
                    out.unproven.append(
                        f"labels after {prev_lab}: {len(extra) - len(created)} rows left over "
                        "that no WAL write after the last flush created"
                    )
                g_rows = g_rows_all[: len(g_labels)]
            if ok and (deleted_after - known_ids):
                # An id with an unknown label was deleted after V: if after T, its label is
                # still live and shifts the pairs. A shifted pair holds another record's vector.
                for lab, k in zip(g_labels, g_rows, strict=True):
                    ident = rows[k][1]
                    verdict = _matches_wal(
                        elements.stored_of(pos[lab]),
                        wal.get(ident, []),
                        cur_seq[ident],
                        v_seq,
                        c.space,
                    )
                    if verdict is None:
                        continue
                    if verdict:
                        out.checked_against_wal += 1
                        continue
                    ok = False
                    out.unproven.append(
                        f"labels after {prev_lab}: ids deleted after the last flush and the "
                        f"vector at label {lab} is not {ident!r}'s last write"
                    )
                    break
        if ok:
            pairs = list(zip(g_labels, g_rows, strict=True))
            for lab, k in pairs:
                verdict = checked(lab, rows[k][1])
                if verdict is False:
                    out.unproven.append(
                        f"label {lab}: the vector is not {rows[k][1]!r}'s current WAL row"
                    )
                    ok = False
                    break
                if verdict:
                    out.checked_against_wal += 1
            if ok:
                for lab, k in pairs:
                    mapped[lab] = rows[k][1]
                out.paired += len(pairs)
        prev_lab, prev_row = lab_b, row_b
    out.label_to_id = mapped
    out.proven = all(x in mapped for x in labels if x not in dead)
    return out


def _label_map_path(root: str, segment_id: str) -> str:
    return os.path.join(root, STATE_DIR, "labelmaps", f"{segment_id}.pickle")


def snapshot_label_maps(
    path: str | os.PathLike[str], report: DirectoryReport | None = None
) -> list[str]:
    """Keep a copy of each healthy index's label map (``index_metadata.pickle``).

    chromadb 1.5.9 rewrites the pickle in place (truncate, write, no fsync): a kill in between
    leaves it empty, and with the WAL purged every flushed record then has a vector on disk that
    nothing maps to its id (issue 7 soak: one torn pickle, 664 of 1000 records lost). Repair
    falls back to this copy (:func:`safechroma.storage.hnsw.salvage_vectors`): labels are never
    reassigned, so an older map is right for every label it has. Call it after a healthy check
    with the directory owned (the supervisor does, before a worker starts). Writes only under
    ``<path>/.safechroma/labelmaps``; a copy is refreshed only when the pickle changed.

    Returns:
        The copies written.
    """
    root = os.fspath(path)
    if report is None:
        report = check_directory(root, deep=False)
    written: list[str] = []
    for c in report.collections:
        if c.status != "healthy" or not c.segment_path or not c.segment_id:
            continue
        src = os.path.join(c.segment_path, PICKLE_FILE)
        dest = _label_map_path(root, c.segment_id)
        if not os.path.exists(src) and os.path.exists(dest):
            # A healthy index without a pickle is a fresh one (nothing flushed: FACTS §1), or
            # Chroma is about to start one: its labels restart at 1, so an older copy belongs
            # to an index that is gone and would map them to the wrong ids.
            os.remove(dest)
            continue
        try:
            st = os.stat(src)
            old = os.stat(dest) if os.path.exists(dest) else None
            if old is not None and (old.st_size, old.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
                continue
            with open(src, "rb") as f:
                data = f.read()
            read_index_metadata(src)  # never keep a copy that does not parse
        except Exception:  # noqa: BLE001 - no pickle yet, or unreadable: keep the last good copy
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _write_atomic(dest, data)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
        written.append(dest)
    return written
