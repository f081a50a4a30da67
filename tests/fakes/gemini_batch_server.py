"""The Files and Batch APIs of the fake Gemini server (tests/fakes/gemini_server.py), as google-genai speaks them.

Files (any API version segment):
    POST /upload/{v}/files                      resumable start -> X-Goog-Upload-URL (absolute, to this server)
    POST /upload-session/{id}                   chunks; "upload, finalize" answers {"file": {...}}
    GET  /{v}/files/{id}                        the file's metadata
    GET  /{v}/files/{id}:download?alt=media     its bytes (also at /download/{v}/files/{id}:download, as the REST docs
                                                write it)
Batches:
    POST /{v}/models/{model}:batchGenerateContent    and :asyncBatchEmbedContent (JSONL file input) -> an Operation
    GET  /{v}/batches/{id}    GET /{v}/batches    POST /{v}/batches/{id}:cancel    DELETE /{v}/batches/{id}

A job answers every line as the online endpoint answers the same request (`generate_payload` / `embed_payload`), so a
batch run and an online run get the same answers. It goes PENDING -> RUNNING -> SUCCEEDED over `BatchPlan.polls`
GETs. `BatchPlan` injects what the real service does: per-line errors (a fraction of lines, drawn by key), and jobs
that end EXPIRED or CANCELLED with no results. Tests read `service.jobs` (every job created) and `service.files`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.gemini_server import FakeGeminiServer

_UPLOAD_START = re.compile(r"^/upload/[^/]+/files$")
_UPLOAD_SESSION = re.compile(r"^/upload-session/(?P<id>[a-z0-9]+)$")
_FILE = re.compile(r"^/(?:download/)?[^/]+/files/(?P<id>[^/:]+)(?P<download>:download)?$")
_CREATE = re.compile(r"^/[^/]+/models/(?P<model>[^/:]+):(?P<method>batchGenerateContent|asyncBatchEmbedContent)$")
_BATCH = re.compile(r"^/[^/]+/batches/(?P<id>[^/:]+)(?P<action>:cancel)?$")
_BATCHES = re.compile(r"^/[^/]+/batches$")


@dataclass
class BatchPlan:
    """How the fake Batch API behaves."""

    #: GETs of a job before it is done: PENDING for the first, RUNNING until the last, then its final state.
    polls: int = 2
    #: Fraction of lines answered with an `error` instead of a `response` (drawn by the line's key and `seed`).
    line_errors: float = 0.0
    seed: int = 0
    #: The final state of every job: BATCH_STATE_SUCCEEDED, or EXPIRED / CANCELLED / FAILED (no results then).
    final_state: str = "BATCH_STATE_SUCCEEDED"


@dataclass
class FakeJob:
    name: str
    model: str
    method: str
    display_name: str
    input_file: str
    created: float
    polls: int = 0
    state: str = "BATCH_STATE_PENDING"
    output_file: str | None = None
    line_count: int = 0
    failed_lines: int = 0


@dataclass
class BatchService:
    """Files and jobs of one fake server."""

    server: FakeGeminiServer
    plan: BatchPlan = field(default_factory=BatchPlan)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    _sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}{self._counter:04d}"

    # --- dispatch: (status, payload or bytes, headers), or None when the path is not ours ---

    def handle(self, verb: str, path: str, headers: Mapping[str, str], raw: bytes) -> tuple[int, Any, dict] | None:
        route = path.split("?", 1)[0]
        if verb == "POST" and _UPLOAD_START.match(route):
            return self._start_upload(headers, raw)
        if verb == "POST" and (match := _UPLOAD_SESSION.match(route)):
            return self._upload_chunk(match.group("id"), headers, raw)
        if verb == "GET" and (match := _FILE.match(route)):
            return self._get_file(match.group("id"), bool(match.group("download")))
        if verb == "POST" and (match := _CREATE.match(route)):
            return self._create(match.group("model"), match.group("method"), json.loads(raw or b"{}"))
        if verb == "GET" and _BATCHES.match(route):
            return 200, {"operations": [self._operation(job) for job in self.jobs.values()], "nextPageToken": ""}, {}
        if (match := _BATCH.match(route)) and verb in ("GET", "POST", "DELETE"):
            return self._job_action(verb, match.group("id"), match.group("action"))
        return None

    # --- files ---

    def _start_upload(self, headers: Mapping[str, str], raw: bytes) -> tuple[int, Any, dict]:
        if headers.get("X-Goog-Upload-Command", "").lower() != "start":
            return 400, {"error": {"code": 400, "message": "expected X-Goog-Upload-Command: start"}}, {}
        session = self._new_id("s")
        metadata = json.loads(raw or b"{}").get("file", {})
        self._sessions[session] = {"data": b"", "metadata": metadata,
                                   "mime_type": headers.get("X-Goog-Upload-Header-Content-Type", "")}
        return 200, {}, {"X-Goog-Upload-URL": f"{self.server.base_url}/upload-session/{session}",
                         "X-Goog-Upload-Status": "active"}

    def _upload_chunk(self, session_id: str, headers: Mapping[str, str], raw: bytes) -> tuple[int, Any, dict]:
        session = self._sessions.get(session_id)
        if session is None:
            return 404, {"error": {"code": 404, "message": "no such upload session"}}, {}
        if int(headers.get("X-Goog-Upload-Offset", "0")) != len(session["data"]):
            return 400, {"error": {"code": 400, "message": "upload offset does not match"}}, {}
        session["data"] += raw
        if "finalize" not in headers.get("X-Goog-Upload-Command", ""):
            return 200, {}, {"X-Goog-Upload-Status": "active"}
        del self._sessions[session_id]
        name = self._store_file(session["data"], session["mime_type"],
                                session["metadata"].get("displayName") or session["metadata"].get("display_name"))
        return 200, {"file": self.files[name]["metadata"]}, {"X-Goog-Upload-Status": "final"}

    def _store_file(self, data: bytes, mime_type: str, display_name: str | None) -> str:
        name = f"files/{self._new_id('f')}"
        metadata = {"name": name, "mimeType": mime_type, "sizeBytes": str(len(data)), "state": "ACTIVE",
                    "uri": f"{self.server.base_url}/v1beta/{name}"}
        if display_name:
            metadata["displayName"] = display_name
        self.files[name] = {"metadata": metadata, "data": data}
        return name

    def _get_file(self, file_id: str, download: bool) -> tuple[int, Any, dict]:
        stored = self.files.get(f"files/{file_id}")
        if stored is None:
            return 404, {"error": {"code": 404, "message": f"no such file: files/{file_id}"}}, {}
        return (200, stored["data"], {}) if download else (200, stored["metadata"], {})

    # --- jobs ---

    def _create(self, model: str, method: str, body: Mapping[str, Any]) -> tuple[int, Any, dict]:
        batch = body.get("batch", {})
        config = batch.get("inputConfig", batch.get("input_config", {}))
        input_file = config.get("fileName", config.get("file_name"))
        if input_file not in self.files:
            return 400, {"error": {"code": 400, "message": f"input file {input_file!r} not found"}}, {}
        job = FakeJob(self._new_id("batches/b"), model, method, batch.get("displayName", ""), input_file,
                      time.time())
        self.jobs[job.name] = job
        return 200, self._operation(job), {}

    def _job_action(self, verb: str, job_id: str, action: str | None) -> tuple[int, Any, dict]:
        job = self.jobs.get(f"batches/{job_id}")
        if job is None:
            return 404, {"error": {"code": 404, "message": f"no such batch: batches/{job_id}"}}, {}
        if verb == "DELETE":
            del self.jobs[job.name]
            return 200, {}, {}
        if action == ":cancel":
            job.state = "BATCH_STATE_CANCELLED"
            return 200, {}, {}
        self._advance(job)
        return 200, self._operation(job), {}

    def _advance(self, job: FakeJob) -> None:
        if job.state not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
            return
        job.polls += 1
        if job.polls < self.plan.polls:
            job.state = "BATCH_STATE_PENDING" if job.polls == 1 else "BATCH_STATE_RUNNING"
            return
        job.state = self.plan.final_state
        if job.state == "BATCH_STATE_SUCCEEDED":
            job.output_file = self._run(job)

    def _run(self, job: FakeJob) -> str:
        """Every input line answered as the online endpoint would; some lines failed as the plan says."""
        from tests.fakes.gemini_server import embed_payload, generate_payload

        lines = []
        for raw in self.files[job.input_file]["data"].decode().splitlines():
            if not raw.strip():
                continue
            line = json.loads(raw)
            key, request = line["key"], line["request"]
            job.line_count += 1
            draw = int.from_bytes(hashlib.sha256(f"{self.plan.seed}\x00{key}".encode()).digest()[:8], "big") / 2**64
            if draw < self.plan.line_errors:
                job.failed_lines += 1
                lines.append({"key": key, "error": {"code": 500, "message": "Internal error encountered.",
                                                    "status": "INTERNAL"}})
            elif job.method == "batchGenerateContent":
                lines.append({"key": key, "response": generate_payload(self.server, request, None, job.model)[0]})
            else:
                embedded = embed_payload(self.server, request, "embedContent")
                lines.append({"key": key, "response": {**embedded, "tokenCount": "3"}})
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        return self._store_file(data, "application/jsonl", f"batch-{job.name.rsplit('/', 1)[-1]}")

    def _operation(self, job: FakeJob) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": f"models/{job.model}", "displayName": job.display_name, "state": job.state,
            "createTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.created)),
            "inputConfig": {"fileName": job.input_file},
        }
        if job.output_file:
            metadata["output"] = {"responsesFile": job.output_file}
        done = job.state not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING")
        return {"name": job.name, "metadata": metadata, "done": done}
