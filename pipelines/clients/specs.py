"""What a run asks of its models: small frozen specs that pickle for Beam, and the default models.

A leaf module: the factory (pipelines/clients/factory.py) maps specs to backends, and backends never see a spec, so
configuration, stages and backends can all import from here without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DEFAULT_GEMINI_LLM = "gemini-2.5-flash"
DEFAULT_GEMINI_EMBEDDER = "gemini-embedding-001"
DEFAULT_LOCAL_LLM = "packaged:smollm2-135m-instruct"
DEFAULT_LOCAL_TEACHER = "packaged:all-mpnet-base-v2"
DEFAULT_LOCAL_STUDENT = "packaged:all-minilm-l6-v2"
#: Where the Gemini API key is read from, in this order: the SDK gives GOOGLE_API_KEY precedence too, so both paths
#: agree on which key is used.
API_KEY_VARIABLES = ("GOOGLE_API_KEY", "GEMINI_API_KEY")

#: How a model's cache misses are sent: "online" (requests answered as they go, `concurrency` in flight) or "batch"
#: (Gemini only: gathered into Batch API jobs, answered within 24 h at half the list price). Not part of any cache key:
#: the same model answers a request alike either way, so answers cached online serve a batch run and back.
CallMode = Literal["online", "batch"]
#: The OpenAI-compatible backend's key, when its server needs one (OpenAI does; a local vLLM, Ollama or llama.cpp
#: server does not).
OPENAI_API_KEY_VARIABLE = "OPENAI_API_KEY"
#: OpenAI's own endpoint: the openai backend's server when no base_url is given, and the one where a key is required.
OPENAI_BASE_URL = "https://api.openai.com/v1"
#: How the openai backend asks for JSON (pipelines/clients/openai_compatible.py): "auto" tries the server's JSON-schema
#: response format and falls back to the schema in the prompt if the server refuses it.
StructuredOutput = Literal["auto", "json_schema", "json_object", "prompt"]


@dataclass(frozen=True)
class BatchSettings:
    """Batch mode's jobs: requests per job (a job's JSONL must stay under the Files API's 2 GB), and how a job is
    polled: `poll_initial_s` apart at first, half as long again each time up to `poll_max_s`, for at most
    `max_wait_s` (past the 48 h after which the service expires a job itself)."""

    max_requests: int = 20_000
    poll_initial_s: float = 30.0
    poll_max_s: float = 600.0
    max_wait_s: float = 50 * 3600.0

    def __post_init__(self) -> None:
        if self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")
        if not 0 < self.poll_initial_s <= self.poll_max_s:
            raise ValueError(f"need 0 < poll_initial_s <= poll_max_s, got {self.poll_initial_s} and "
                             f"{self.poll_max_s}")


def check_mode(backend: str, mode: str) -> None:
    if mode == "batch" and backend != "gemini":
        raise ValueError(f"mode 'batch' is the Gemini Batch API: it needs backend 'gemini', got {backend!r}")


@dataclass(frozen=True)
class LLMSpec:
    #: "openai" is any server speaking OpenAI's chat-completions protocol (vLLM, Ollama, llama.cpp, OpenAI). "custom"
    #: builds the client by calling `model` ("package.module:callable"), for plug-in backends and test fakes.
    backend: Literal["local", "gemini", "openai", "custom"] = "local"
    #: Hub id, local path, `packaged:<name>`, Gemini model name, the model an OpenAI-compatible server serves, or custom
    #: factory; empty means the backend's default (openai has none: the server decides what it serves).
    model: str = ""
    #: Gemini: override the API endpoint (tests point it at the local fake server). openai: the server's URL up to
    #: /v1 (e.g. http://localhost:8000/v1); unset is OpenAI's own. Part of the openai backend's cache key.
    base_url: str | None = None
    api_version: str | None = None
    timeout_s: float = 60.0
    #: Attempts per call for transient failures (429, 5xx, timeouts), the first included.
    max_attempts: int = 6
    #: Backoff between transient retries: exponential from `backoff_initial_s` with jitter, capped at `backoff_max_s`;
    #: a server's Retry-After (or RetryInfo) hint replaces it, honoured up to the same cap.
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    #: Attempts per call when the answer does not parse or violates the output schema.
    max_parse_attempts: int = 3
    #: Gemini thinking budget in tokens; -1 is dynamic thinking. None picks the default (`gemini_thinking_budget`):
    #: 0, thinking off, where the model allows it (gemini-2.5-flash, gemini-2.5-flash-lite), else the model's minimum
    #: (gemini-2.5-pro: 128); models outside `GEMINI_THINKING` get no thinking config. Gemini 2.5 counts thinking
    #: tokens inside max_output_tokens, so each request asks for the answer's budget plus this one
    #: (`gemini_output_token_limit`): thinking can never cut a short JSON answer off. Part of the cache key.
    thinking_budget: int | None = None
    #: Requests in flight at once (API backends); answers the local backend decodes together, one forward pass per
    #: step for all of them (each holds its own KV cache, so this bounds memory: ~50 MB an answer for SmolLM2).
    concurrency: int = 8
    #: Local: torch device and the folder where converted weights are kept between runs.
    device: str = "cpu"
    cache_dir: str | None = None
    #: Local: torch intra-op threads (default: $EMBFORGE_TORCH_THREADS, else the CPUs available). With Beam's
    #: multi_processing runner keep workers x threads <= cores.
    torch_threads: int | None = None
    mode: CallMode = "online"
    #: List price in USD per million (input, output) tokens; None takes pipelines/pricing.py's table by model name.
    #: For a model the table does not know (a self-hosted server: 0, 0).
    usd_per_million_tokens: tuple[float, float] | None = None
    #: openai backend: how the output's JSON schema reaches the server (see `StructuredOutput`).
    structured_output: StructuredOutput = "auto"
    #: Batch mode's jobs: their size and how they are polled.
    batch: BatchSettings = field(default_factory=BatchSettings)

    def __post_init__(self) -> None:
        check_mode(self.backend, self.mode)
        if self.backend == "openai" and not self.model:
            raise ValueError("the openai backend needs model = the name the server serves the model under "
                             "(e.g. Qwen/Qwen2.5-7B-Instruct for vLLM, qwen2.5:7b for Ollama)")

    @property
    def model_name(self) -> str:
        if self.backend == "openai":
            return self.model
        return self.model or (DEFAULT_GEMINI_LLM if self.backend == "gemini" else DEFAULT_LOCAL_LLM)


@dataclass(frozen=True)
class EmbedderSpec:
    backend: Literal["local", "gemini", "custom"] = "local"
    model: str = ""
    base_url: str | None = None
    api_version: str | None = None
    timeout_s: float = 60.0
    max_attempts: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    concurrency: int = 8
    device: str = "cpu"
    cache_dir: str | None = None
    batch_size: int = 32
    #: Local: as `LLMSpec.torch_threads`.
    torch_threads: int | None = None
    #: Local: (task type, prompt prefix) pairs overriding the model's own prompts; a tuple so the spec stays hashable.
    #: They change the vectors, so they are part of the cache key.
    task_prompts: tuple[tuple[str, str], ...] = ()
    #: Local: tokens read per text (the model's window); None keeps the model's own. Evaluation sets one window for
    #: every model it compares, so none wins by reading more of a passage.
    max_seq_length: int | None = None
    mode: CallMode = "online"
    #: As `LLMSpec.usd_per_million_tokens` (embeddings bill input tokens only).
    usd_per_million_tokens: tuple[float, float] | None = None
    #: Batch mode's jobs: their size and how they are polled.
    batch: BatchSettings = field(default_factory=BatchSettings)

    def __post_init__(self) -> None:
        check_mode(self.backend, self.mode)

    @property
    def model_name(self) -> str:
        return self.model or (DEFAULT_GEMINI_EMBEDDER if self.backend == "gemini" else DEFAULT_LOCAL_TEACHER)
