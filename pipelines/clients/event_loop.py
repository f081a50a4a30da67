"""Running coroutines for synchronous callers: `LoopThread`, one private event loop on a daemon thread, and
`gather_in_order`, concurrent coroutines whose results keep their input order.

Kept apart from the Gemini backend (pipelines/clients/gemini.py), whose sync methods run its async ones here, so that
module holds only what talks to the service.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class LoopThread:
    """A private event loop on a daemon thread; the sync API submits coroutines to it.

    Why not `asyncio.run` per call: it fails inside a running loop (notebooks, async callers), and an httpx async
    connection pool cannot move between event loops (google-genai before 3.x keeps one pool per client), so every
    async request of one client runs on this one loop.
    """

    def __init__(self, name: str):
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name=self._name, daemon=True)
                self._thread.start()
            return self._loop

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Start `coroutine` on the loop and return at once: callers keep many in flight and collect them as they
        finish (pipelines/cached_calls.py). Cancelling the future cancels the coroutine."""
        loop = self._ensure_started()
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("sync API call from the client's own event loop: await the async method instead")
        return asyncio.run_coroutine_threadsafe(coroutine, loop)

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        future = self.submit(coroutine)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: stop the requests still in flight
            raise

    def close(self, final: Callable[[], Awaitable[None]] | None = None) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if final is not None:

            async def _final() -> None:
                await final()

            try:
                asyncio.run_coroutine_threadsafe(_final(), loop).result(timeout=10)
            except Exception as error:  # closing must not fail the caller
                logger.debug("closing the Gemini async client failed: %s", type(error).__name__)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def gather_in_order(coroutines: Sequence[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Results in input order; if one raises, the rest are cancelled (not left running) and the error propagates."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
