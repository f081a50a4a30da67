"""Gemini Batch API jobs through google-genai: JSONL requests uploaded with the Files API (resumable upload), a job
created from the file, polled with backoff, its results file downloaded and read back by key.

Protocol facts this module relies on (measured with google-genai 2.x and 3.x against tests/fakes/gemini_batch_server.py,
and from the Gemini API docs):
- Creating a job is not idempotent: the caller records the job's name as soon as it exists (pipelines/batch_calls.py
  does, before the first poll), so a killed run, run again, polls that job instead of paying for a new one.
- For Gemini API jobs the SDK fills neither the job-level `error` nor batch statistics: failures are counted from the
  result lines, each carrying `response` or `error`.
- A job pending or running for 48 h ends EXPIRED, with no results; CANCELLED and FAILED jobs have none either.
- The SDK talks to /v1 or /v1beta depending on its version; both serve these methods.
- The Batch API bills half the online list price (pipelines/pricing.py: BATCH_PRICE_FACTOR).

Request lines carry what an online request carries (system instruction, turns, generation config with the output's
JSON schema, thinking budget), so a batch answer and an online answer to one request are alike.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from google.genai import types
from pydantic import BaseModel

from pipelines.clients.base import ChatMessage, GenerationConfig, TaskType
from pipelines.clients.gemini import GeminiConnection, GeminiEndpoint, GeminiError
from pipelines.clients.gemini_thinking import gemini_output_token_limit
from pipelines.clients.retry import RequestCounter
from pipelines.clients.specs import BatchSettings

logger = logging.getLogger(__name__)

#: Job states after which a job changes no more (the SDK's names for BATCH_STATE_*).
FINAL_STATES = frozenset({"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"})
SUCCEEDED = "JOB_STATE_SUCCEEDED"
#: `mimetypes` does not know .jsonl on every system, and the service has refused a bare "jsonl".
JSONL_MIME_TYPE = "application/jsonl"


class BatchJobTimeout(GeminiError):
    """A job was still not done after the longest wait allowed."""


def poll_delays(settings: BatchSettings) -> Iterator[float]:
    """Seconds between looks at a job: from `poll_initial_s`, growing by half each time up to `poll_max_s`."""
    delay = settings.poll_initial_s
    while True:
        yield delay
        delay = min(settings.poll_max_s, delay * 1.5)


def generate_request_line(key: str, messages: Sequence[ChatMessage], output_model: type[BaseModel],
                          config: GenerationConfig, model: str, thinking_budget: int | None) -> dict[str, Any]:
    """One JSONL input line of a generate job: the request GeminiLLM would send online for these messages."""
    from pipelines.clients.gemini import to_gemini_contents

    system, contents = to_gemini_contents(messages)
    generation: dict[str, Any] = {
        "responseMimeType": "application/json",
        "responseJsonSchema": output_model.model_json_schema(),
        "temperature": config.temperature,
        # As online: thinking counts inside max_output_tokens, so the answer keeps its own budget on top.
        "maxOutputTokens": gemini_output_token_limit(model, config.max_output_tokens, thinking_budget),
    }
    if config.seed is not None:
        generation["seed"] = config.seed
    if thinking_budget is not None:
        generation["thinkingConfig"] = {"thinkingBudget": thinking_budget}
    request: dict[str, Any] = {"contents": [content.model_dump(mode="json", exclude_none=True) for content in contents],
                               "generationConfig": generation}
    if system is not None:
        request["systemInstruction"] = {"parts": [{"text": system}]}
    return {"key": key, "request": request}


def embed_request_line(key: str, text: str, task_type: str, dimension: int | None) -> dict[str, Any]:
    """One JSONL input line of an embeddings job; no dimension asks for the model's full one."""
    request: dict[str, Any] = {"content": {"parts": [{"text": text}]}, "taskType": TaskType(task_type).value}
    if dimension is not None:
        request["outputDimensionality"] = dimension
    return {"key": key, "request": request}


def read_result_lines(data: bytes) -> dict[str, dict[str, Any]]:
    """A results file as key -> its line ({"response": ...} or {"error": ...}); a line that is not JSON or has no key
    is an error naming its line number."""
    results = {}
    for number, raw in enumerate(data.decode("utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as error:
            raise GeminiError(f"batch results line {number}: not JSON ({error})") from None
        if not isinstance(line, dict) or "key" not in line:
            raise GeminiError(f"batch results line {number}: no key")
        results[str(line["key"])] = line
    return results


def response_of(line: dict[str, Any]) -> types.GenerateContentResponse:
    return types.GenerateContentResponse.model_validate(line["response"])


def line_error(line: dict[str, Any] | None) -> str | None:
    """Why a result line holds no answer (None: it holds one)."""
    if line is None:
        return "the job's results have no line for this request"
    if "response" in line:
        return None
    error = line.get("error") or {}
    return f"batch line failed: {error.get('code', '')} {error.get('message', error)}".strip()


class GeminiBatchClient:
    """Submits, polls and reads Batch API jobs for one model. Sync methods; requests retried by the shared policy."""

    def __init__(self, model: str, endpoint: GeminiEndpoint | None = None, settings: BatchSettings | None = None):
        self.model = model
        self.settings = settings or BatchSettings()
        self._connection = GeminiConnection(model, endpoint or GeminiEndpoint())

    def _send(self, send: Any) -> Any:
        async def sent() -> Any:
            return await self._connection.send(send, RequestCounter(), truncated_body_is_transient=True)

        return self._connection.loop.run(sent())

    def submit(self, lines: Sequence[dict[str, Any]], display_name: str, embeddings: bool = False) -> str:
        """Upload `lines` as one JSONL file and create a job from it; the job's name. Not idempotent: record it."""
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
        aio = self._connection.client.aio
        uploaded = self._send(functools.partial(
            aio.files.upload, file=io.BytesIO(data),
            config=types.UploadFileConfig(mime_type=JSONL_MIME_TYPE, display_name=display_name)))
        if embeddings:
            job = self._send(functools.partial(
                aio.batches.create_embeddings, model=self.model,
                src=types.EmbeddingsBatchJobSource(file_name=uploaded.name),
                config=types.CreateEmbeddingsBatchJobConfig(display_name=display_name)))
        else:
            job = self._send(functools.partial(
                aio.batches.create, model=self.model, src=uploaded.name,
                config=types.CreateBatchJobConfig(display_name=display_name)))
        logger.info("%s: batch job %s created (%d requests, %d bytes)", self.model, job.name, len(lines), len(data))
        return job.name

    def state(self, name: str) -> types.BatchJob:
        return self._send(functools.partial(self._connection.client.aio.batches.get, name=name))

    def wait(self, name: str, sleep: Any = time.sleep) -> types.BatchJob:
        """Poll job `name` until it is done; raises BatchJobTimeout past `settings.max_wait_s`."""
        waited = 0.0
        for delay in poll_delays(self.settings):
            job = self.state(name)
            state = state_name(job)
            if state in FINAL_STATES:
                return job
            if waited >= self.settings.max_wait_s:
                raise BatchJobTimeout(f"{self.model}: batch job {name} still {state} after {waited:.0f} s")
            logger.info("%s: batch job %s is %s; next look in %.0f s", self.model, name, state, delay)
            sleep(delay)
            waited += delay
        raise AssertionError("poll_delays() is endless")  # pragma: no cover

    def results(self, job: types.BatchJob) -> dict[str, dict[str, Any]]:
        """Key -> result line of a finished job (empty unless it succeeded)."""
        if state_name(job) != SUCCEEDED or job.dest is None or not job.dest.file_name:
            return {}
        data = self._send(functools.partial(self._connection.client.aio.files.download, file=job.dest.file_name))
        return read_result_lines(data)

    def close(self) -> None:
        self._connection.close()


def state_name(job: types.BatchJob) -> str:
    """A job's state by the SDK's name for it (JOB_STATE_SUCCEEDED, ...)."""
    state = job.state
    return str(getattr(state, "name", state))

