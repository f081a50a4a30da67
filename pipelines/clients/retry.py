"""The retry policy of the API clients (Gemini, OpenAI-compatible): which failures are transient, and how long to wait
before trying again.

Transient: 429 and 5xx from the service, timeouts and dropped connections of whichever HTTP stack the SDK uses.
The wait is the server's hint (a Retry-After header or google.rpc.RetryInfo in the body), else exponential backoff
with jitter, capped. Kept apart from the backends (pipelines/clients/gemini.py, openai_compatible.py), which only
send requests through `RetryPolicy.retrying`, so the policy reads and is tested without a server.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import importlib
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import tenacity
from google.genai import errors as genai_errors

#: Status codes worth another attempt: rate limits and server-side failures. Other 4xx mean the request is wrong.
TRANSIENT_STATUS_CODES = frozenset({429, 500, 502, 503, 504})


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Timeouts and dropped connections of whichever HTTP stack the installed SDK uses (httpx, httpx2 or aiohttp)."""
    found: list[type[BaseException]] = [TimeoutError, asyncio.TimeoutError]
    for module_name in ("httpx", "httpx2"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        # NetworkError: connect, read, write or close failed (ReadError is a connection reset mid-answer, e.g. when a
        # server's accept queue overflows under many concurrent new connections). RemoteProtocolError: the server
        # closed the connection without a (complete) answer.
        found += [module.TimeoutException, module.NetworkError, module.RemoteProtocolError]
    try:
        aiohttp = importlib.import_module("aiohttp")
    except ImportError:
        pass
    else:
        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    try:
        openai = importlib.import_module("openai")
    except ImportError:
        pass
    else:
        # The openai client wraps its transport's timeouts and dropped connections (APITimeoutError is one).
        found.append(openai.APIConnectionError)
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


def _parse_duration(value: str) -> float | None:
    """google.protobuf.Duration in JSON ("17s", "0.250s") -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)s\s*", value)
    return float(match.group(1)) if match else None


def retry_delay_from_error(error: BaseException | None) -> float | None:
    """Seconds the server asked us to wait: the Retry-After header (seconds or HTTP date) or google.rpc.RetryInfo."""
    headers = getattr(getattr(error, "response", None), "headers", None)
    value = headers.get("retry-after") if headers is not None and hasattr(headers, "get") else None
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                moment = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                moment = None
            if moment is not None and moment.tzinfo is not None:
                return max(0.0, moment.timestamp() - time.time())
    # Gemini's own 429s carry the hint in the body: {"error": {"details": [{"@type": ".../google.rpc.RetryInfo",
    # "retryDelay": "17s"}]}}.
    body = getattr(error, "details", None)
    if isinstance(body, dict):
        details = body.get("error", body).get("details") if isinstance(body.get("error", body), dict) else None
        for detail in details if isinstance(details, list) else []:
            if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
                delay = _parse_duration(str(detail.get("retryDelay", "")))
                if delay is not None:
                    return delay
    return None


def status_code(error: BaseException) -> int | None:
    """The HTTP status of a service's error answer: google-genai's `code`, the openai client's `status_code`."""
    if isinstance(error, genai_errors.APIError):
        return error.code
    code = getattr(error, "status_code", None)
    return code if isinstance(code, int) else None


def is_transient(error: BaseException, *, truncated_body_is_transient: bool = False) -> bool:
    """Worth another attempt: 429 / 5xx from the service, a timeout or a dropped connection."""
    code = status_code(error)
    if code is not None:
        return code in TRANSIENT_STATUS_CODES
    if truncated_body_is_transient and isinstance(error, json.JSONDecodeError):
        return True
    return isinstance(error, TRANSPORT_ERRORS)


@dataclass
class RequestCounter:
    """HTTP requests made for one logical call, retries included."""

    requests: int = 0


def retry_logger(logger: logging.Logger, who: Callable[[], str], describe: Callable[[BaseException], str],
                 max_attempts: int) -> Callable[[tenacity.RetryCallState], None]:
    """A `before_sleep` callback logging each retry: who retries (`who()`, e.g. the model), the failure as `describe`
    words it (key-free), the attempt and the wait."""

    def log(retry_state: tenacity.RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        sleep = retry_state.next_action.sleep if retry_state.next_action is not None else 0.0
        logger.info("%s: %s; retry %d/%d in %.2f s", who(), describe(error) if error is not None else "failed",
                    retry_state.attempt_number, max_attempts - 1, sleep)

    return log


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried. Attempts count the first request."""

    max_attempts: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    #: Jitter only; nothing depends on its sequence, so it is not seeded.
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 0 <= self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError(
                f"need 0 <= backoff_initial_s <= backoff_max_s, got {self.backoff_initial_s} and {self.backoff_max_s}"
            )

    def delay(self, attempt_number: int, error: BaseException | None) -> float:
        """Seconds to wait after failed attempt `attempt_number` (1-based)."""
        hinted = retry_delay_from_error(error)
        if hinted is not None:
            # The server knows when capacity returns: wait at least that long (up to the cap, so a bad header cannot
            # park a worker for hours), plus up to 10% so clients told the same delay do not come back in lockstep.
            base = min(hinted, self.backoff_max_s)
            return base + self.rng.uniform(0.0, 0.1 * base)
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt_number - 1))
        # Equal jitter: at least half the exponential step (so retries still back off), the rest random (so
        # concurrent callers spread out).
        return ceiling / 2 + self.rng.uniform(0.0, ceiling / 2)

    def wait(self, retry_state: tenacity.RetryCallState) -> float:
        """tenacity `wait=` callback."""
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        return self.delay(retry_state.attempt_number, error)

    def retrying(
        self,
        *,
        truncated_body_is_transient: bool,
        before_sleep: Callable[[tenacity.RetryCallState], None],
    ) -> tenacity.AsyncRetrying:
        """The attempts of one request: transient failures retried with this policy's waits, the last error re-raised.

        `before_sleep` is called before each wait (the caller logs the retry there).
        """
        return tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=self.wait,
            retry=tenacity.retry_if_exception(
                functools.partial(is_transient, truncated_body_is_transient=truncated_body_is_transient)
            ),
            before_sleep=before_sleep,
            reraise=True,
        )
