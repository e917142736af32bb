"""What ``safechroma serve`` asks the operating system: is a port free, does a process listen
on it, what did the child write to its log. Pure reads, no process management (that stays in
:mod:`safechroma.http.serve`)."""

from __future__ import annotations

import errno
import os
import socket

__all__ = ["listens", "log_size", "log_tail", "port_free"]


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound (Chroma itself exits 0 when it cannot)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return True  # let Chroma report the bad address
    for family, kind, proto, _name, addr in infos:
        with socket.socket(family, kind, proto) as s:
            # Chroma (Rust's TcpListener) sets SO_REUSEADDR: a port in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
                raise
    return True


def listens(pid: int, port: int) -> bool:
    """Whether ``pid`` owns a listening socket on ``port`` (so the heartbeat that answered
    was this child's, not another server's). True when /proc cannot tell."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return not os.path.exists("/proc/net/tcp")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return True
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def log_tail(path: str, start: int, limit: int = 4000) -> str:
    """What the child wrote to its log after ``start`` (its banner excluded), at most
    ``limit`` bytes from the end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(start, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
