"""Shared pytest fixtures. Keep each one small and named after what it provides."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from tests.fake_gemini_server import FakeGeminiServer

# Beam 2.77's DirectRunner first tries to download the Prism runner from GitHub; tests must never reach the network,
# so every TestPipeline runs on the in-process FnApiRunner, which DirectRunner would fall back to anyway.
TestPipeline.pytest_test_pipeline_options = "--runner=FnApiRunner"


@pytest.fixture
def fake_gemini_server() -> Iterator[FakeGeminiServer]:
    """A started fake Gemini REST server on 127.0.0.1 (see tests/fake_gemini_server.py); set `.faults`,
    `.generate` or `.embed` on it to shape its answers."""
    with FakeGeminiServer() as server:
        yield server

