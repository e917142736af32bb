"""Check one Chroma HNSW segment directory: :func:`check_segment` and its walks.

The header, the file sizes and the pickle always; with ``deep``, every element of
``data_level0.bin`` (link counts, neighbour ids, deleted flags, labels, read in chunks) and
every upper-level list of ``link_lists.bin``, and the labels compared with the pickle. Every
problem becomes a :class:`~safechroma.storage.hnsw.files.Finding`; nothing raises for bad bytes.
"""

from __future__ import annotations

import array
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from safechroma.storage.hnsw.files import (
    _SCAN_CHUNK_BYTES,
    DATA_FILE,
    HEADER_FILE,
    LENGTH_FILE,
    LINKS_FILE,
    PICKLE_FILE,
    Finding,
    HnswHeader,
    SegmentReport,
    UnsafePickleError,
    _header_findings,
    _level_bound_findings,
    _levels_over_header,
    _links_size_findings,
    _strided,
    plausible_link_lists_bytes,
    read_header,
    read_index_metadata,
)

__all__ = ["check_segment"]


def _check_neighbors(
    counts: npt.NDArray[Any],
    ids: npt.NDArray[Any],
    self_ids: npt.NDArray[Any],
    limit: int,
    cur: int,
) -> tuple[int, int, int, int]:
    """Vectorised bounds check of a batch of link lists.

    Returns:
        (lists whose count > limit, first such element or -1,
         neighbour ids >= cur, first element holding one or -1).
    """
    counts = counts.astype(np.int64)
    too_many = counts > limit
    n_too_many = int(too_many.sum())
    first_too_many = int(self_ids[np.argmax(too_many)]) if n_too_many else -1
    used = np.arange(ids.shape[1]) < np.minimum(counts, limit)[:, None]
    oob = (ids >= cur) & used
    oob_rows = oob.any(axis=1)
    n_oob = int(oob.sum())
    first_oob = int(self_ids[np.argmax(oob_rows)]) if n_oob else -1
    return n_too_many, first_too_many, n_oob, first_oob


def _count_self_links(
    ids: npt.NDArray[Any], counts: npt.NDArray[Any], self_ids: npt.NDArray[Any]
) -> int:
    used = np.arange(ids.shape[1]) < counts.astype(np.int64)[:, None]
    return int(((ids == self_ids[:, None].astype(ids.dtype)) & used).sum())


def check_segment(
    path: str | os.PathLike[str],
    *,
    deep: bool = True,
    expected_dim: int | None = None,
) -> SegmentReport:
    """Check one HNSW segment directory against the format of FACTS §1.

    Never raises for bad file contents: every problem becomes a :class:`Finding`.

    Args:
        path: The ``<vector-segment-uuid>`` directory.
        deep: Also walk ``data_level0.bin`` (link counts, neighbour ids, deleted flags, labels)
            and ``link_lists.bin`` (every upper-level list), and compare labels with the pickle.
            Without it only the header, the file sizes and the pickle are checked.
        expected_dim: The collection's dimension from SQLite, if known.

    Returns:
        A :class:`SegmentReport`.
    """
    return _check_segment(os.fspath(path), deep, expected_dim, [])


def _check_segment_keep_metadata(
    path: str, *, deep: bool, expected_dim: int | None
) -> tuple[SegmentReport, dict[str, Any] | None]:
    """:func:`check_segment`, also returning the parsed pickle (``None`` if it was not read).

    For callers that need the ids too: the pickle is the most expensive file to parse
    (~0.6 s per million ids, measured), so it is parsed once.
    """
    keep: list[dict[str, Any]] = []
    rep = _check_segment(path, deep, expected_dim, keep)
    return rep, (keep[0] if keep else None)


def _check_segment(
    seg: str, deep: bool, expected_dim: int | None, keep: list[dict[str, Any]]
) -> SegmentReport:
    rep = SegmentReport(path=seg)
    add = rep.findings.append
    hfile, dfile, lfile, kfile, pfile = (
        os.path.join(seg, n) for n in (HEADER_FILE, DATA_FILE, LENGTH_FILE, LINKS_FILE, PICKLE_FILE)
    )

    sizes: dict[str, int] = {}
    for name in (hfile, dfile, lfile, kfile):
        try:
            sizes[name] = os.stat(name).st_size
        except FileNotFoundError:
            add(Finding("file_missing", f"{os.path.basename(name)} is missing", name))
        except OSError as e:
            add(Finding("file_unreadable", f"cannot stat: {e}", name))
    rep.has_pickle = os.path.exists(pfile)
    if hfile not in sizes:
        return rep

    try:
        h = read_header(hfile)
    except (OSError, ValueError) as e:
        add(Finding("header_size", str(e), hfile))
        return rep
    rep.header = h
    rep.element_count = cur = h.cur_element_count
    hf = _header_findings(h, hfile, expected_dim) or _level_bound_findings(h, hfile)
    rep.findings.extend(hf)
    if hf:
        # Offsets are wrong, so every later computation would read garbage: stop here.
        return rep
    sdpe = h.size_data_per_element

    # File sizes against the header (FACTS §1 "The other files").
    if dfile in sizes:
        dsize = sizes[dfile]
        if dsize < cur * sdpe:
            add(
                Finding(
                    "data_truncated",
                    f"data_level0.bin is {dsize} bytes, {cur} elements need {cur * sdpe}",
                    dfile,
                )
            )
        elif dsize % sdpe:
            add(
                Finding(
                    "data_size", f"data_level0.bin size {dsize} is not a multiple of {sdpe}", dfile
                )
            )
        elif dsize > max(h.max_elements, cur) * sdpe:
            add(
                Finding(
                    "data_size",
                    f"data_level0.bin holds {dsize // sdpe} slots, more than "
                    f"max_elements={h.max_elements}",
                    dfile,
                )
            )
    if lfile in sizes and sizes[lfile] < 4 * cur:
        add(
            Finding(
                "length_truncated",
                f"length.bin is {sizes[lfile]} bytes, {cur} elements need {4 * cur}",
                lfile,
            )
        )
    if kfile in sizes:
        rep.findings.extend(_links_size_findings(h, sizes[kfile], kfile))
    if kfile in sizes and sizes[kfile] % 4:
        add(
            Finding(
                "links_size", f"link_lists.bin size {sizes[kfile]} is not a multiple of 4", kfile
            )
        )

    # The pickle (FACTS §1): required once anything was flushed; read with the allow-list.
    label_to_id: dict[Any, Any] | None = None
    if rep.has_pickle:
        try:
            meta = read_index_metadata(pfile)
            l2i = meta.get("label_to_id")
            i2l = meta.get("id_to_label")
            if not isinstance(l2i, dict) or not isinstance(i2l, dict):
                raise ValueError("label_to_id / id_to_label missing or not dicts")
            label_to_id = l2i
            keep.append(meta)
            rep.pickle_ids = len(i2l)
            if len(l2i) != len(i2l):
                add(
                    Finding(
                        "pickle_maps",
                        f"label_to_id has {len(l2i)} entries, id_to_label {len(i2l)}",
                        pfile,
                    )
                )
        except UnsafePickleError as e:
            add(
                Finding(
                    "pickle_unsafe",
                    f"index_metadata.pickle is not a Chroma pickle ({e}); it was not executed",
                    pfile,
                )
            )
        except Exception as e:  # noqa: BLE001 - any parse failure of untrusted bytes is damage
            add(
                Finding(
                    "pickle_unreadable",
                    f"index_metadata.pickle cannot be parsed: {type(e).__name__}: {e}",
                    pfile,
                )
            )
    elif cur > 0:
        add(
            Finding(
                "pickle_missing",
                f"{cur} elements on disk but index_metadata.pickle is missing",
                pfile,
            )
        )

    if not deep or not rep.healthy or cur == 0:
        if deep and cur == 0 and rep.healthy:
            rep.deleted_count = 0
            if sizes.get(kfile, 0) != 0:
                add(
                    Finding(
                        "links_trailing",
                        f"empty index but link_lists.bin has {sizes[kfile]} bytes",
                        kfile,
                    )
                )
        return rep

    # ---- deep: level 0 ---------------------------------------------------------------------
    try:
        with open(dfile, "rb", buffering=0) as f:
            scan = _scan_level0(f, h)
    except (OSError, EOFError) as e:
        add(Finding("data_unreadable", f"cannot read data_level0.bin: {e}", dfile))
        return rep
    deleted, too_many, first_bad, oob, first_oob, self_links, labels_all = scan
    rep.deleted_count = deleted
    rep._live_labels = labels_all
    if too_many:
        add(
            Finding(
                "level0_link_count",
                f"{too_many} level-0 link counts exceed maxM0={h.max_m0} (first at element "
                f"{first_bad})",
                dfile,
            )
        )
    if oob:
        add(
            Finding(
                "level0_neighbor_out_of_range",
                f"{oob} level-0 neighbour ids >= element count {cur} (first at element "
                f"{first_oob})",
                dfile,
            )
        )
    if self_links:
        # hnswlib never links an element to itself, but a self link cannot crash a search:
        # report it without calling the index damaged (no false positives, issue 4).
        add(
            Finding(
                "level0_self_link",
                f"{self_links} level-0 lists link an element to itself",
                dfile,
                "warning",
            )
        )

    # ---- deep: upper levels (link_lists.bin) -------------------------------------------------
    if kfile in sizes and sizes[kfile] % 4 == 0:
        _walk_link_lists(kfile, h, rep)

    # ---- deep: labels --------------------------------------------------------------------------
    pk: npt.NDArray[np.uint64] | None = None
    bad_keys = False
    if label_to_id is not None:
        try:
            pk = _label_keys(label_to_id)
        except (TypeError, ValueError, OverflowError):
            bad_keys = True
    dup, only_disk, only_pickle = _compare_labels(labels_all, pk)
    if dup:
        add(Finding("labels_duplicate", f"{dup} live elements share a label with another", dfile))
    if bad_keys:
        add(Finding("pickle_labels", "label_to_id has keys that are not labels", pfile))
    if only_disk or only_pickle:
        add(
            Finding(
                "pickle_labels",
                f"labels disagree: {only_disk} live labels on disk are not in the pickle, "
                f"{only_pickle} pickle labels are not live on disk",
                pfile,
            )
        )
    return rep


def _readinto_exact(f: Any, mv: memoryview) -> None:
    got = 0
    while got < len(mv):
        n = f.readinto(mv[got:])
        if not n:
            raise EOFError(f"short read: {got} of {len(mv)} bytes")
        got += n


def _scan_level0(
    f: Any, h: HnswHeader
) -> tuple[int, int, int, int, int, int, npt.NDArray[np.uint64]]:
    """Check every level-0 element of ``data_level0.bin`` (``f`` positioned at offset 0).

    Each chunk is read into one reused buffer and checked through strided views. The common,
    healthy case costs one ``max`` per field: only when a chunk's largest link count exceeds
    ``maxM0``, its largest neighbour id (unused slots included) reaches ``cur``, or some slot
    holds the element's own id does the exact, per-slot count of :func:`_check_neighbors` and
    :func:`_count_self_links` run on that chunk. The results are those of the exact count.

    Returns:
        (deleted elements, link counts > maxM0, first such element or -1, neighbour ids >= cur,
        first element holding one or -1, self links, labels of the live elements in file order).

    Raises:
        EOFError: The file ends before ``cur`` elements.
        OSError: It cannot be read.
    """
    cur, sdpe, max_m0 = h.cur_element_count, h.size_data_per_element, h.max_m0
    per = max(1, _SCAN_CHUNK_BYTES // sdpe)
    buf = bytearray(min(per, cur) * sdpe)
    mv = memoryview(buf)
    live = np.empty(cur, dtype=np.uint64)
    n_live = deleted = too_many = oob = self_links = 0
    first_bad = first_oob = -1
    for start in range(0, cur, per):
        k = min(per, cur - start)
        _readinto_exact(f, mv[: k * sdpe])
        counts = _strided(buf, k, sdpe, 0, "<u2")
        flags = _strided(buf, k, sdpe, 2, "u1")
        nbr = _strided(buf, k, sdpe, 4, "<u4", max_m0)
        labels = _strided(buf, k, sdpe, h.label_offset, "<u8")
        selves = np.arange(start, start + k, dtype=np.int64)
        if int(counts.max()) > max_m0 or int(nbr.max()) >= cur:
            t, ft, o, fo = _check_neighbors(counts, nbr, selves, max_m0, cur)
            too_many += t
            oob += o
            if ft >= 0 and first_bad < 0:
                first_bad = ft
            if fo >= 0 and first_oob < 0:
                first_oob = fo
        if (nbr == selves.astype(nbr.dtype)[:, None]).any():
            self_links += _count_self_links(nbr, np.minimum(counts, max_m0), selves)
        is_del = (flags & 1).astype(bool)
        nd = int(np.count_nonzero(is_del))
        if nd:
            deleted += nd
            live[n_live : n_live + k - nd] = labels[~is_del]
        else:
            live[n_live : n_live + k] = labels
        n_live += k - nd
    return deleted, too_many, first_bad, oob, first_oob, self_links, live[:n_live]


def _label_keys(label_to_id: dict[Any, Any]) -> npt.NDArray[np.uint64]:
    """The pickle's labels as uint64, converted as ``int(key)`` would.

    Raises:
        TypeError, ValueError, OverflowError: A key is not a label.
    """
    try:
        # A C loop over the keys, ints only (~3x faster than a generator of int() calls).
        return np.frombuffer(array.array("Q", label_to_id), dtype=np.uint64)
    except TypeError:
        # Not all ints (real pickles never get here): the lenient int() conversion as before.
        return np.fromiter((int(x) for x in label_to_id), dtype=np.uint64, count=len(label_to_id))


def _compare_labels(
    disk: npt.NDArray[np.uint64], pk: npt.NDArray[np.uint64] | None
) -> tuple[int, int, int]:
    """Compare the live labels on disk with the pickle's labels.

    Returns:
        (live elements sharing a label with another, distinct live labels not in the pickle,
        pickle labels not live on disk); the last two are 0 when ``pk`` is None.
    """
    top = max(
        int(disk.max()) if disk.size else 0, int(pk.max()) if pk is not None and pk.size else 0
    )
    if top <= 4 * (disk.size + (pk.size if pk is not None else 0)) + 4096:
        # Labels are small dense integers (hnswlib numbers elements from 1): mark them in a
        # table instead of sorting (two 1M uint64 sorts took ~0.1 s here, this ~0.01 s).
        on_disk = np.zeros(top + 1, dtype=bool)
        on_disk[disk] = True
        dup = int(disk.size - np.count_nonzero(on_disk))
        if pk is None:
            return dup, 0, 0
        in_pk = np.zeros(top + 1, dtype=bool)
        in_pk[pk] = True
        return dup, int(np.count_nonzero(on_disk & ~in_pk)), int(np.count_nonzero(~on_disk[pk]))
    # Sparse or huge labels: sort-based set logic (np.unique's hash path took ~1.4 s per
    # million uint64 here).
    srt = np.sort(disk)
    dup = int((srt[1:] == srt[:-1]).sum()) if srt.size > 1 else 0
    if pk is None:
        return dup, 0, 0
    pks = np.sort(pk)
    if pks.size == srt.size and np.array_equal(pks, srt):
        return dup, 0, 0
    uniq = srt[np.concatenate(([True], srt[1:] != srt[:-1]))] if srt.size else srt
    return dup, int((~_isin_sorted(uniq, pks)).sum()), int((~_isin_sorted(pks, uniq)).sum())


def _isin_sorted(a: npt.NDArray[Any], sorted_b: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Membership of ``a`` in the sorted array ``sorted_b`` by binary search."""
    if sorted_b.size == 0:
        return np.zeros(a.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_b, a), sorted_b.size - 1)
    return np.asarray(sorted_b[pos] == a)


def _walk_link_lists(kfile: str, h: HnswHeader, rep: SegmentReport) -> None:
    """Walk ``link_lists.bin`` end to end and bounds-check every upper-level list.

    Layout (FACTS §1): per element ``u32 nbytes`` then ``nbytes`` bytes, ``nbytes = level *
    (maxM*4+4)``; each level block is a count word (low 16 bits) and ``maxM`` u32 ids. The walk
    is sequential by nature, but most elements have level 0 (a zero word). So the next record
    after each non-zero word is computed for all of them at once, the Python loop only follows
    that chain (one list step per element above level 0, ~1/M of them), and the element index of
    each record and the list contents are then derived in vectorised passes.
    """
    add = rep.findings.append
    cur = h.cur_element_count
    limit = plausible_link_lists_bytes(cur, h.max_m)
    try:
        with open(kfile, "rb") as f:
            # Never more than a healthy index of this size can hold (issue 13, chroma#7510): the
            # size was checked against the same bound, this also covers a file grown meanwhile.
            raw = f.read(limit + 1)
    except OSError as e:
        add(Finding("links_unreadable", f"cannot read link_lists.bin: {e}", kfile))
        return
    if len(raw) > limit or len(raw) % 4:
        add(
            Finding(
                "links_size_implausible",
                f"link_lists.bin grew past {limit} bytes while it was read",
                kfile,
            )
        )
        return
    words = np.frombuffer(raw, dtype="<u4")
    n = words.size
    slpe = h.size_links_per_element
    slpe_words = slpe // 4
    # rank[p]: number of non-zero words before position p, i.e. the index in nz of the first
    # non-zero word at or after p. The walk at p skips nz[rank[p]] - p level-0 elements, then
    # reads a record header there. int32 where it fits: these arrays have one entry per word.
    idx_t = np.int32 if n < 2**31 - 1 else np.int64
    nz = np.flatnonzero(words)
    rank = np.zeros(n + 1, dtype=idx_t)
    np.cumsum(words != 0, dtype=idx_t, out=rank[1:])
    nbytes = words[nz].astype(np.int64)
    ends = nz + 1 + nbytes // 4
    whole = (nbytes % slpe == 0) & (ends <= n)
    # nxt[i]: index in nz of the next record header after the record at nz[i] (nz.size: none);
    # -1 stops the walk there (a bad record).
    nxt = np.full(nz.size, -1, dtype=idx_t)
    nxt[whole] = rank[ends[whole]]
    del rank, ends, whole
    step = nxt.data  # a memoryview: indexing it yields Python ints, fast in the loop below
    chain: list[int] = []
    i = 0
    # At most cur records belong to elements; one more shows the file runs on past them.
    while 0 <= i < nz.size and len(chain) <= cur:
        chain.append(i)
        i = step[i]
    bad_last = bool(chain) and step[chain[-1]] < 0
    heads = nz[np.asarray(chain, dtype=np.int64)]
    head_bytes = words[heads].astype(np.int64)
    head_ends = heads + 1 + head_bytes // 4
    prev_ends = np.concatenate(([0], head_ends))[:-1]
    # Element index of each record: the zero words skipped so far, plus the records before it.
    elem = np.cumsum(heads - prev_ends) + np.arange(heads.size)
    k = int(np.searchsorted(elem, cur))  # records that belong to the cur elements
    if k < heads.size:
        p = int(heads[k] - elem[k]) + cur  # just after element cur-1, a level-0 element
        add(
            Finding(
                "links_trailing", f"{(n - p) * 4} bytes after the last element's link list", kfile
            )
        )
        return
    if bad_last:
        j = int(elem[-1])
        nb = int(head_bytes[-1])
        if nb % slpe:
            add(
                Finding(
                    "links_nbytes",
                    f"element {j}: link list of {nb} bytes is not a whole number of levels",
                    kfile,
                )
            )
        else:
            add(
                Finding(
                    "links_truncated",
                    f"element {j}: level-{nb // slpe} link list runs past the end of "
                    "link_lists.bin",
                    kfile,
                )
            )
        return
    p = int(head_ends[-1]) if heads.size else 0
    j = int(elem[-1]) + 1 if heads.size else 0
    if n - p < cur - j:
        add(
            Finding(
                "links_truncated",
                f"link_lists.bin ends after {n * 4} bytes, before all {cur} elements",
                kfile,
            )
        )
        return
    p += cur - j
    if p < n:
        add(
            Finding(
                "links_trailing", f"{(n - p) * 4} bytes after the last element's link list", kfile
            )
        )
        return
    elem_ids = elem
    starts = heads + 1
    levels = head_bytes // slpe
    over = _levels_over_header(levels, elem_ids, h)
    if over is not None:
        add(Finding("links_level", over, kfile))
        return

    lv = np.asarray(levels, dtype=np.int64)
    max_level = int(lv.max()) if lv.size else 0
    rep.max_level = max_level
    if max_level != h.maxlevel:
        add(
            Finding(
                "header_maxlevel",
                f"header maxlevel={h.maxlevel} but the highest element level is {max_level}",
                kfile,
            )
        )
    ep_level = 0
    if lv.size:
        hit = np.flatnonzero(elem_ids == h.enterpoint_node)
        ep_level = int(lv[hit[0]]) if hit.size else 0
    if ep_level != h.maxlevel:
        # Search starts at the entry point's top level: a lower entry reads links it lacks.
        add(
            Finding(
                "header_entry_point",
                f"entry point {h.enterpoint_node} has level {ep_level}, header maxlevel is "
                f"{h.maxlevel}",
                kfile,
            )
        )
    if not lv.size:
        return
    owners = np.repeat(elem_ids, lv)
    first = np.repeat(starts, lv)
    within = np.arange(owners.size) - np.repeat(np.cumsum(lv) - lv, lv)
    block = first + within * slpe_words
    counts = words[block] & 0xFFFF
    ids = words[block[:, None] + 1 + np.arange(h.max_m)]
    t, ft, o, fo = _check_neighbors(counts, ids, owners, h.max_m, cur)
    if t:
        add(
            Finding(
                "upper_link_count",
                f"{t} upper-level link counts exceed maxM={h.max_m} (first at element {ft})",
                kfile,
            )
        )
    if o:
        add(
            Finding(
                "upper_neighbor_out_of_range",
                f"{o} upper-level neighbour ids >= element count {cur} (first at element {fo})",
                kfile,
            )
        )
