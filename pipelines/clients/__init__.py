"""Model clients behind the `LLM` and `Embedder` interfaces."""

from pipelines.clients.base import (
    LLM,
    CallStats,
    ChatMessage,
    Embedder,
    GenerationConfig,
    GenerationResult,
    TaskType,
    Usage,
    truncate_and_normalize,
)

__all__ = [
    "LLM", "CallStats", "ChatMessage", "Embedder", "GenerationConfig", "GenerationResult", "TaskType", "Usage",
    "truncate_and_normalize",
]
