"""The guard that keeps tests off the network (tests/network_guard.py) refuses what it must and nothing else."""

from __future__ import annotations

import socket

import pytest

from tests import network_guard


def test_a_connection_to_a_non_loopback_address_is_refused_and_recorded():
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never routed. The guard refuses before any packet is sent anyway.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("192.0.2.1", 443))
    with pytest.raises(ConnectionRefusedError):
        socket.getaddrinfo("huggingface.co", 443)
    assert network_guard.take_violations() == ["connect to 192.0.2.1:443", "look up 'huggingface.co'"]


def test_loopback_stays_open(fake_gemini_server):
    host, port = fake_gemini_server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5):
        pass
    assert socket.getaddrinfo("localhost", 80)
    assert network_guard.take_violations() == []
