"""The messages between caller and worker (runtime/protocol.py) and the rebuilding of remote
errors (runtime/replies.py): pure functions, no socket, no process.

Each named message type is encoded the way its sender encodes it and decoded the way its
receiver decodes it; the reply side is the untrusted one, so its allow-list and shape checks are
tested with replies a lying worker could send.
"""

from __future__ import annotations

import datetime
import pickle
import struct
import uuid

import chromadb.errors
import numpy as np
import pytest

from safechroma import RemoteError
from safechroma.runtime.protocol import (
    HEADER,
    MAGIC,
    CollectionRef,
    ForbiddenGlobalError,
    Op,
    Reply,
    Request,
    Status,
    collection_refs,
    decode_reply,
    decode_request,
    encode,
    error_info,
    frame_header,
    is_error_info,
    is_panic,
    read_reply,
    run_request,
)
from safechroma.runtime.replies import RemoteTraceback, means_damage, rebuild_error


def _reply_bytes(
    status: int, payload: object, spent: float = 0.25
) -> tuple[bytes, list[bytearray]]:
    """A reply as the worker encodes it (worker.py: ``encode((int(status), payload, elapsed))``),
    with its out-of-band buffers as the receiver holds them (fresh bytearrays)."""
    data, buffers = encode((status, payload, spent))
    return data, [bytearray(b) for b in buffers]


# -- requests: the trusted direction ----------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (Request(Op.OPEN, ("/data/db", {"anonymized_telemetry": False}, "t", "d")), None),
        (Request(Op.CALL, (0, "list_collections", (), {"limit": 5})), None),
        (Request(Op.OPEN_HANDLE, ("6f1c2e1a", b"ef", None)), None),
        (Request(Op.RELEASE, ([3, 4, 5],)), None),
        (
            run_request(7, "safechroma.storage.hnsw:rebuild", ("seg",)),
            (5, (7, "safechroma.storage.hnsw:rebuild", ("seg",))),
        ),
        (Request(Op.EXIT, None), None),
        (Request(Op.PING, None), None),
        (Request(Op.SHARE, None), None),
        (Request(Op.REGISTER, [("ef", "hash", b"blob")]), None),
        (Request(Op.DEFINE, ("token", [b"a", b"b"])), None),
    ],
    ids=lambda v: v.op.name if isinstance(v, Request) else "",
)
def test_each_request_type_round_trips_as_a_plain_pair(
    request_: Request, expected: tuple[int, object] | None
) -> None:
    """On the wire a request is ``(int(op), body)``: the worker gets a plain int, not an enum
    member it would have to import."""
    data, buffers = request_.encode()
    got = decode_request(data, [bytearray(b) for b in buffers])
    assert got == (expected if expected is not None else (int(request_.op), request_.body))
    assert type(got[0]) is int
    assert b"safechroma" not in data or request_.op is Op.RUN  # no enum class named in the pickle


def test_a_request_carries_a_lambda_only_by_value() -> None:
    """Embedding functions defined in a test module or as lambdas travel by value (cloudpickle);
    the plain pickler refuses them."""
    fn = lambda client, x: x * 3  # noqa: E731 - a lambda is the case under test
    with pytest.raises((pickle.PicklingError, AttributeError)):
        run_request(0, fn, (2,)).encode()
    data, buffers = run_request(0, fn, (2,)).encode(by_value=True)
    op, (handle, got, args) = decode_request(data, [bytearray(b) for b in buffers])
    assert (op, handle, args, got(None, 14)) == (Op.RUN, 0, (2,), 42)


def test_large_arrays_travel_out_of_band_and_arrive_intact() -> None:
    """A float32 array goes as one out-of-band buffer (PEP 574), not inside the pickle."""
    array = np.arange(50_000, dtype=np.float32).reshape(500, 100)
    data, buffers = Request(Op.CALL, (1, "add", (), {"embeddings": array})).encode()
    assert len(buffers) == 1 and buffers[0].nbytes == array.nbytes
    assert len(data) < 1000
    _op, (_h, _m, _a, kwargs) = decode_request(data, [bytearray(b) for b in buffers])
    np.testing.assert_array_equal(kwargs["embeddings"], array)


def test_the_frame_header_names_the_pickle_and_each_buffer() -> None:
    data, buffers = encode(np.ones(64, dtype=np.float64))
    head = frame_header(data, buffers)
    assert HEADER.unpack_from(head) == (MAGIC, 1, len(data))
    assert struct.unpack_from("<Q", head, HEADER.size) == (512,)
    assert len(head) == HEADER.size + 8
    assert frame_header(b"abc", []) == HEADER.pack(MAGIC, 0, 3)


# -- replies: the untrusted direction --------------------------------------------------------


def test_each_reply_status_round_trips() -> None:
    ok = read_reply(*_reply_bytes(int(Status.OK), {"ids": [["a"]]}, 0.5))
    assert ok == Reply(Status.OK, {"ids": [["a"]]}, 0.5) and ok.status is Status.OK
    info = ("chromadb.errors", "NotFoundError", ("no such collection",), "no such", "Traceback")
    err = read_reply(*_reply_bytes(int(Status.ERROR), info))
    assert err == Reply(Status.ERROR, info, 0.25)
    panic = read_reply(*_reply_bytes(int(Status.PANIC), info))
    assert panic.status is Status.PANIC
    retired = read_reply(*_reply_bytes(int(Status.RETIRED), None))
    assert retired == Reply(Status.RETIRED, None, 0.25)


def test_a_reply_of_allowed_data_types_decodes() -> None:
    """numpy arrays and scalars, UUIDs and datetimes are what Chroma returns: all allowed."""
    array = np.linspace(0, 1, 4096, dtype=np.float32)
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    value = {
        "embeddings": array,
        "scalar": np.float32(1.5),
        "id": uuid.UUID(int=7),
        "when": when,
        "age": datetime.timedelta(seconds=3),
        "day": datetime.date(2026, 1, 2),
    }
    reply = read_reply(*_reply_bytes(int(Status.OK), value))
    got = reply.payload
    np.testing.assert_array_equal(got["embeddings"], array)
    assert got["scalar"] == np.float32(1.5) and got["scalar"].dtype == np.float32
    assert (got["id"], got["when"], got["age"], got["day"]) == (
        uuid.UUID(int=7),
        when,
        datetime.timedelta(seconds=3),
        datetime.date(2026, 1, 2),
    )


class _Evil:
    def __reduce__(self) -> tuple[object, ...]:
        import os

        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "payload",
    [_Evil(), pickle.PickleError("x"), ValueError("v"), np.random.default_rng(0)],
    ids=["os.system", "pickle-class", "exception", "numpy-generator"],
)
def test_a_reply_naming_a_forbidden_global_is_refused(payload: object) -> None:
    """A worker runs native code on hostile files: a reply must not make the caller resolve a
    global outside the allow-list (``os.system`` would run code in the caller)."""
    data = pickle.dumps((0, payload, 0.0), protocol=5)
    with pytest.raises(ForbiddenGlobalError, match="forbidden global"):
        decode_reply(data, [])
    with pytest.raises(ForbiddenGlobalError):
        read_reply(data, [])


def test_bytearray_set_and_frozenset_need_no_global() -> None:
    """Protocol 5 has opcodes of its own for these, so the allow-list needs no builtin that
    could turn a few bytes into a big allocation (``bytearray(n)``)."""
    payload = [bytearray(b"ab"), {1, 2}, frozenset({3})]
    assert decode_reply(pickle.dumps(payload, protocol=5), []) == payload
    forged = b"\x80\x05\x8c\x08builtins\x94\x8c\tbytearray\x94\x93\x94."
    with pytest.raises(ForbiddenGlobalError, match="builtins.bytearray"):
        decode_reply(forged, [])


@pytest.mark.parametrize(
    "bad",
    [
        (9, None, 0.0),  # unknown status
        (int(Status.ERROR), "just a string", 0.0),  # an error without an ErrorInfo
        (int(Status.PANIC), ("m", "Q", (), "msg"), 0.0),  # four fields, not five
        (int(Status.ERROR), ("m", "Q", [], "msg", "tb"), 0.0),  # args not a tuple
    ],
)
def test_a_reply_of_the_wrong_shape_is_refused(bad: tuple[object, ...]) -> None:
    data = pickle.dumps(bad, protocol=5)
    with pytest.raises(ValueError, match="unknown status|malformed error report"):
        read_reply(data, [])


def test_a_reply_that_is_not_a_triple_is_refused() -> None:
    with pytest.raises((ValueError, TypeError)):
        read_reply(pickle.dumps((0, None), protocol=5), [])


def test_collections_in_a_result_become_refs_tagged_with_their_worker() -> None:
    one = ("collection", 4, {"name": "a"})
    assert collection_refs(one, 12) == CollectionRef(4, {"name": "a"}, 12)
    listed = collection_refs([one, ("collection", 5, {"name": "b"})], 13)
    assert listed == [CollectionRef(4, {"name": "a"}, 13), CollectionRef(5, {"name": "b"}, 13)]
    # Look-alikes are left alone: only the exact shape is a collection.
    assert collection_refs(["collection", 4, {}], 1) == ["collection", 4, {}]
    assert collection_refs(("collection", 4), 1) == ("collection", 4)
    assert collection_refs([], 1) == []


# -- errors: described in the worker, rebuilt in the caller ----------------------------------


def test_a_chromadb_error_is_rebuilt_as_its_type_with_the_remote_traceback() -> None:
    try:
        raise chromadb.errors.NotFoundError("Collection [x] does not exist")
    except chromadb.errors.NotFoundError as exc:
        import traceback

        info = error_info(exc, traceback.format_exc())
    assert info[:4] == (
        "chromadb.errors",
        "NotFoundError",
        ("Collection [x] does not exist",),
        "Collection [x] does not exist",
    )
    # Through the wire as the worker sends it.
    reply = read_reply(*_reply_bytes(int(Status.ERROR), info))
    error = rebuild_error(reply.payload)
    assert type(error) is chromadb.errors.NotFoundError
    assert str(error) == "Collection [x] does not exist"
    cause = error.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise chromadb.errors.NotFoundError" in cause.tb
    assert str(cause).startswith("\n\nTraceback (most recent call last):")


def test_a_builtin_error_is_rebuilt_and_unplain_args_become_the_message() -> None:
    exc = KeyError(("a", object()))  # an argument that is not plain data
    info = error_info(exc, "tb")
    assert info[2] == (str(exc),)
    error = rebuild_error(info)
    assert type(error) is KeyError and error.args == (str(exc),)
    assert rebuild_error(("builtins", "ValueError", (1, "two"), "m", "tb")).args == (1, "two")


@pytest.mark.parametrize(
    ("module", "qualname"),
    [
        ("some.module.never.imported", "Boom"),  # not imported in the caller: never imported
        ("os", "system"),  # not an exception class
        ("builtins", "SystemExit"),  # not an Exception: would end the caller
        ("safechroma._errors", "WorkerCrashedError"),  # the worker cannot claim our own errors
        ("builtins", "int.__class__"),  # dotted names are not looked up
    ],
)
def test_other_types_arrive_as_remote_error_naming_them(module: str, qualname: str) -> None:
    error = rebuild_error((module, qualname, ("m",), "the message", "remote tb"))
    assert type(error) is RemoteError
    assert error.type_name == f"{module}.{qualname}"
    assert str(error) == f"{module}.{qualname}: the message"
    assert isinstance(error.__cause__, RemoteTraceback) and error.__cause__.tb == "remote tb"


def test_is_error_info_and_is_panic_check_shapes_exactly() -> None:
    assert is_error_info(("m", "Q", (), "msg", "tb"))
    assert not is_error_info(["m", "Q", (), "msg", "tb"])
    assert not is_error_info(("m", "Q", (), 3, "tb"))
    panic = type("PanicException", (BaseException,), {"__module__": "pyo3_runtime"})
    assert is_panic(panic("x"))
    assert not is_panic(type("PanicException", (BaseException,), {"__module__": "mine"})("x"))


def test_damage_is_recognised_only_from_chroma_and_sqlite_errors() -> None:
    msg = "Error loading hnsw index"
    assert means_damage(("chromadb.errors", "InternalError", (), msg, ""))
    assert means_damage(("sqlite3", "DatabaseError", (), "database disk image is malformed", ""))
    assert not means_damage(("builtins", "RuntimeError", (), msg, ""))
    assert not means_damage(("chromadb.errors", "InternalError", (), "other", ""))
