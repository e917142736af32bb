"""Messages between the caller and its worker, and how they are encoded. No I/O here.

A frame on the wire::

    header   "<4sIQ"  magic b"SCW1", number of out-of-band buffers n, length of the pickle
    lengths  "<nQ"    the length of each buffer
    pickle            pickle protocol 5 stream
    buffers           the raw bytes of each buffer, in order

Large numpy arrays travel as out-of-band buffers: the sender hands their memory to
``socket.sendmsg`` without a copy, and the receiver reads them straight into fresh buffers that
the unpickled arrays then use (pickle protocol 5, PEP 574). That is what makes bulk transfer cost
a kernel copy instead of pickle's several (CHROMA_FACTS.md section 5: ~2.5 ms/MB for default
pickle, ~0.3 ms/MB out of band).

Trust is one-way. The worker trusts its parent, so requests may carry cloudpickle'd embedding
functions. The parent does not trust the worker (a worker runs Chroma's native code on files that
may be hostile): replies are decoded by :class:`ReplyUnpickler`, which resolves only an allow-list
of globals, so a malicious reply cannot run code in the caller, and frame sizes are bounded.
"""

from __future__ import annotations

import enum
import io
import pickle
import struct
from typing import Any, Final, NamedTuple

import cloudpickle

MAGIC: Final = b"SCW1"
HEADER: Final = struct.Struct("<4sIQ")
MAX_BUFFERS: Final = 65536


class Op(enum.IntEnum):
    """What a request asks the worker to do."""

    OPEN = 1  # open the persist directory: (path, settings, tenant, database)
    CALL = 2  # call a method: (handle, method, args, kwargs); handle 0 is the client
    OPEN_HANDLE = 3  # reopen a collection by id after a respawn: (id, ef_blob, dl_blob)
    RELEASE = 4  # forget collection handles: (handles,)
    RUN = 5  # run "module:function"(client, *args) inside the worker: recovery write-back
    EXIT = 6  # finish and exit cleanly
    PING = 7  # answer at once; used to measure the transport alone
    SHARE = 8  # start listening on the rendezvous socket: other processes may attach
    REGISTER = 9  # the program's registered embedding-function classes: [(kind, name, blob)]
    DEFINE = 10  # build an embedding function once for this worker: (token, alternatives)


class Status(enum.IntEnum):
    """How the worker answered."""

    OK = 0  # payload is the result
    ERROR = 1  # payload is an ErrorInfo tuple: the call raised
    PANIC = 2  # payload is an ErrorInfo tuple: Chroma's Rust core panicked
    RETIRED = 3  # not run: the worker is stopping (another process retired it); try the next


# (module, qualname, args, message, remote traceback text)
ErrorInfo = tuple[str, str, tuple[Any, ...], str, str]


class Request(NamedTuple):
    """One request to the worker: what to do, and its body (shapes listed on :class:`Op`).

    On the wire it is the plain pair ``(int(op), body)``: an enum member would be pickled by
    reference, which the worker would have to import.
    """

    op: Op
    body: Any

    def encode(self, by_value: bool = False) -> tuple[bytes, list[memoryview]]:
        """The request as :func:`encode` sends it."""
        # _value_: the plain int, without the enum property's two Python-level calls.
        return encode((self.op._value_, self.body), by_value=by_value)


def run_request(handle: int, fn: Any, args: tuple[Any, ...]) -> Request:
    """Run ``fn(client, *args)`` in the worker; ``fn`` is a function or "module:function"."""
    return Request(Op.RUN, (handle, fn, args))


class Reply(NamedTuple):
    """A decoded, checked reply (see :func:`read_reply`)."""

    status: Status
    payload: Any  # the result (OK), an ErrorInfo (ERROR, PANIC), None (RETIRED)
    spent: float  # seconds the worker spent serving the request


class CollectionRef(NamedTuple):
    """A collection the worker opened: what the caller needs to build its ``SafeCollection``.

    The worker answers ``("collection", handle, model)`` for every call that returns a
    collection; :func:`collection_refs` names that shape once, and tags it with the serial of
    the worker that holds the handle, so that a respawn in between cannot mix handles up.
    """

    handle: int  # the collection's handle in that worker
    model: Any  # chromadb's collection model (name, id, metadata, configuration)
    serial: int  # the worker the handle lives in


def _is_collection(value: Any) -> bool:
    return type(value) is tuple and len(value) == 3 and value[0] == "collection"


def collection_refs(result: Any, serial: int) -> Any:
    """``result`` with the worker's collections (alone or in a list) as :class:`CollectionRef`.

    Only a tuple or a list can hold one: callers may skip the call for anything else.
    """
    if _is_collection(result):
        return CollectionRef(int(result[1]), result[2], serial)
    if type(result) is list and result and _is_collection(result[0]):
        return [CollectionRef(int(r[1]), r[2], serial) for r in result]
    return result


# Replies may name only these globals. Everything here is data: numpy's own array and scalar
# rebuilders, UUID, and Chroma's plain result/model classes. Unpickling an instance of them sets
# attributes; it runs no code of the sender's choosing. Nothing here can turn a few bytes into a
# big allocation (``bytearray(n)`` could: protocol 5 has opcodes for bytearray, set and
# frozenset, so none of those builtins is needed).
ALLOWED_GLOBALS: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("uuid", "UUID"),
        ("chromadb.types", "Collection"),
        ("chromadb.base_types", "SparseVector"),
        ("chromadb.api.types", "IndexingStatus"),
        ("chromadb.api.types", "SearchResult"),
        ("chromadb.auth", "UserIdentity"),
        ("datetime", "datetime"),
        ("datetime", "date"),
        ("datetime", "timedelta"),
        ("datetime", "timezone"),
    }
)


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A reply named a global outside :data:`ALLOWED_GLOBALS`."""


class ReplyUnpickler(pickle.Unpickler):
    """Unpickler for replies from the worker: resolves allow-listed globals only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise ForbiddenGlobalError(f"reply names a forbidden global {module}.{name}")


def encode(obj: Any, *, by_value: bool = False) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` (protocol 5) and return the stream and its out-of-band buffers.

    Args:
        obj: the message.
        by_value: use cloudpickle, which carries functions and classes defined in
            ``__main__``, in a test module or as lambdas by value. Only requests that carry
            an embedding function or data loader need it; plain data uses the faster C pickler.
    """
    kept: list[pickle.PickleBuffer] = []
    if by_value:
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=kept.append)
    else:
        data = pickle.dumps(obj, protocol=5, buffer_callback=kept.append)
    return data, [buf.raw() for buf in kept] if kept else []


def frame_header(data: bytes, buffers: list[memoryview]) -> bytes:
    """The header and buffer lengths that precede ``data`` on the wire."""
    n = len(buffers)
    head = HEADER.pack(MAGIC, n, len(data))
    if n:
        head += struct.pack(f"<{n}Q", *(b.nbytes for b in buffers))
    return head


def decode_request(data: bytes | bytearray | memoryview, buffers: list[bytearray]) -> Any:
    """Decode a request in the worker (the parent is trusted)."""
    return pickle.loads(data, buffers=buffers)


def decode_reply(data: bytes | bytearray | memoryview, buffers: list[bytearray]) -> Any:
    """Decode a reply in the parent with the allow-list unpickler."""
    return ReplyUnpickler(io.BytesIO(data), buffers=buffers).load()


_STATUSES: Final = {int(s): s for s in Status}


def read_reply(data: bytes | bytearray | memoryview, buffers: list[bytearray]) -> Reply:
    """Decode a reply frame and check its shape (a worker could lie).

    Raises:
        Exception: the frame does not decode, or is not ``(status, payload, seconds)`` with a
            known status and, for ERROR and PANIC, an :data:`ErrorInfo` payload.
    """
    status, payload, spent = ReplyUnpickler(io.BytesIO(data), buffers=buffers).load()
    named = _STATUSES.get(status)
    if named is None:
        raise ValueError(f"unknown status {status!r:.100}")
    if named in (Status.ERROR, Status.PANIC) and not is_error_info(payload):
        raise ValueError(f"malformed error report {payload!r:.100}")
    return Reply(named, payload, float(spent))


def is_error_info(payload: Any) -> bool:
    """True when ``payload`` has the shape of an :data:`ErrorInfo` (a worker could lie)."""
    return (
        type(payload) is tuple
        and len(payload) == 5
        and all(type(payload[i]) is str for i in (0, 1, 3, 4))
        and type(payload[2]) is tuple
    )


def error_info(exc: BaseException, tb_text: str) -> ErrorInfo:
    """Describe an exception raised in the worker so the parent can rebuild it."""
    cls = type(exc)
    args = exc.args if all(_is_plain(a) for a in exc.args) else (str(exc),)
    return (cls.__module__, cls.__qualname__, args, str(exc), tb_text)


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, bytes))


def is_panic(exc: BaseException) -> bool:
    """True for ``pyo3_runtime.PanicException``, which derives from BaseException."""
    cls = type(exc)
    return cls.__name__ == "PanicException" and cls.__module__.startswith("pyo3")
