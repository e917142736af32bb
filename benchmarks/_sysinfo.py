"""Facts about this machine and its processes, read from /proc (Linux; standard library only)."""

from __future__ import annotations

import importlib.metadata
import ipaddress
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    mem = _meminfo_kib("MemTotal")
    status = _git("status", "--porcelain", "--", "src")
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem / 2**20, 1) if mem else None,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "chromadb": _version("chromadb"),
        "numpy": _version("numpy"),
        "safechroma": _version("safechroma"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "src_dirty": bool(status) if status is not None else None,
        "loadavg_start": os.getloadavg(),
        "executable": sys.executable,
    }


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes ({} when it is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def _ppids() -> dict[int, int]:
    """pid -> parent pid for every process (from /proc/<pid>/stat; this kernel has no
    /proc/<pid>/task/<tid>/children)."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        out[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return out


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    return sorted(p for p, pp in _ppids().items() if pp == pid)


def descendants(pid: int) -> list[int]:
    """Children, grandchildren... of ``pid`` (one /proc scan)."""
    ppids = _ppids()
    kids: dict[int, list[int]] = {}
    for p, pp in ppids.items():
        kids.setdefault(pp, []).append(p)
    out: list[int] = []
    stack = [pid]
    for _ in range(100_000):  # bounded walk
        if not stack:
            break
        for kid in kids.get(stack.pop(), []):
            out.append(kid)
            stack.append(kid)
    return sorted(out)


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# --- network: which TCP/UDP endpoints a process holds -------------------------------------------


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _decode_addr(hexaddr: str, v6: bool) -> str:
    host, _, port = hexaddr.partition(":")
    raw = bytes.fromhex(host)
    if v6:
        # /proc/net/tcp6 prints four little-endian 32-bit words
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        ip = str(ipaddress.IPv6Address(raw))
    else:
        ip = str(ipaddress.IPv4Address(raw[::-1]))
    return f"{ip}:{int(port, 16)}"


def _is_local(endpoint: str) -> bool:
    ip = endpoint.rsplit(":", 1)[0]
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback or addr.is_unspecified


def inet_endpoints(pid: int) -> list[dict[str, str]]:
    """TCP/UDP sockets held by ``pid``: local and remote address, protocol."""
    inodes = _socket_inodes(pid)
    found: list[dict[str, str]] = []
    if not inodes:
        return found
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or int(parts[9]) not in inodes:
                continue
            v6 = proto.endswith("6")
            found.append(
                {
                    "proto": proto,
                    "local": _decode_addr(parts[1], v6),
                    "remote": _decode_addr(parts[2], v6),
                }
            )
    return found


def non_loopback(endpoints: list[dict[str, str]]) -> list[dict[str, str]]:
    return [e for e in endpoints if not (_is_local(e["local"]) and _is_local(e["remote"]))]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class NetAudit:
    """Records every attempt of this process to reach a non-loopback address.

    A ``sys.addaudithook`` hook sees ``socket.connect``, ``socket.sendto`` and
    ``socket.getaddrinfo`` before they happen. Installed only where the network is the question
    (the HttpClient driver and the process-per-call children): a hook runs on every audit event,
    and the timed paths of the other modes should not pay for it.
    """

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def install(self) -> None:
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event in ("socket.connect", "socket.sendto"):
            address = args[1]
            if isinstance(address, tuple) and address:
                self._check(str(address[0]), event)
        elif event == "socket.getaddrinfo":
            self._check(str(args[0]), event)

    def _check(self, host: str, event: str) -> None:
        if host in ("localhost", ""):
            return
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
        self.attempts.append(f"{event} {host}")
