"""Shared pytest fixtures. Keep each one small and named after what it provides."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_gemini_server import FakeGeminiServer


@pytest.fixture
def fake_gemini_server() -> Iterator[FakeGeminiServer]:
    """A started fake Gemini REST server on 127.0.0.1 (see tests/fake_gemini_server.py); set `.faults`,
    `.generate` or `.embed` on it to shape its answers."""
    with FakeGeminiServer() as server:
        yield server
