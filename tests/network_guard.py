"""Tests never reach the network: a connection (or a name lookup) for anything but loopback fails the test.

`install()` wraps `socket.socket.connect`, `connect_ex` and `socket.getaddrinfo` in this process. A call for a
non-loopback address raises before any packet leaves, and is recorded; conftest.py fails the test that made it even
when the code under test swallows the error (as a client library retrying or falling back would). Child processes
(the CLI started by a test) are not covered: they inherit the test's environment, which points every client at a
fake server on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import socket

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
#: What was refused since the last `take_violations()`.
_violations: list[str] = []
_installed = False


def is_loopback(host: str | bytes | None) -> bool:
    if host is None:
        return True  # getaddrinfo(None, port): the local wildcard, what servers bind to
    if isinstance(host, bytes):
        host = host.decode()
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str) -> None:
    _violations.append(what)
    raise ConnectionRefusedError(f"tests may not reach the network: {what} (tests/network_guard.py)")


def take_violations() -> list[str]:
    taken = list(_violations)
    _violations.clear()
    return taken


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def checked(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address[0]):
            _refuse(f"connect to {address[0]}:{address[1]}")

    def guarded_connect(self, address):
        checked(self, address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        checked(self, address)
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not is_loopback(host):
            _refuse(f"look up {host!r}")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex
    socket.getaddrinfo = guarded_getaddrinfo
