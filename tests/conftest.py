"""Shared pytest fixtures. Keep each one small and named after what it provides."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from tests import network_guard
from tests.fakes.gemini_server import FakeGeminiServer
from tests.fakes.memory_filesystem import memory_filesystem

network_guard.install()

# Beam 2.77's DirectRunner first tries to download the Prism runner from GitHub; tests must never reach the network,
# so every TestPipeline runs on the in-process FnApiRunner, which DirectRunner would fall back to anyway.
TestPipeline.pytest_test_pipeline_options = "--runner=FnApiRunner"


@pytest.fixture(autouse=True)
def no_network() -> Iterator[None]:
    """Fails any test that tried to reach a non-loopback address (tests/network_guard.py), even if the code under test
    caught the refusal."""
    network_guard.take_violations()
    yield
    violations = network_guard.take_violations()
    if violations:
        pytest.fail(f"the test tried to reach the network: {'; '.join(violations[:5])}", pytrace=False)


@pytest.fixture
def fake_gemini_server() -> Iterator[FakeGeminiServer]:
    """A started fake Gemini REST server on 127.0.0.1 (see tests/fakes/gemini_server.py); set `.faults`,
    `.generate` or `.embed` on it to shape its answers."""
    with FakeGeminiServer() as server:
        yield server


@pytest.fixture
def memfs() -> Iterator[str]:
    """An empty in-memory Beam filesystem (tests/fakes/memory_filesystem.py); yields its root, `memfs://test`."""
    with memory_filesystem() as root:
        yield root
