"""`LocalEmbedder`: any sentence-transformers model (packaged offline default, Hub id or local path) as an `Embedder`.

Vectors are float32, L2-normalized, and Matryoshka-truncated with `truncate_and_normalize` (truncate first, then
normalize, as MRL-trained models expect). MiniLM and mpnet were not trained with MRL, so truncating them works
mechanically but loses more quality than it would for an MRL model; the trainer's student is where MRL is learnt.

Task types become prompt prefixes only for models trained with prompts, read from the model's sentence-transformers
config by the one table of prompt names (`pipelines.clients.task_prompts`): a student embforge trained keeps them under
TaskType names (`CLASSIFICATION`, ...), exactly as the trainer used them; EmbeddingGemma ships `task: search result |
query: `, `title: none | text: `, ... under its own names ("Retrieval-query", "Classification", "STS", ...), which
are read too (see `select_task_prompts`). MiniLM and mpnet were trained without prompts, so every task type embeds the
bare text.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from pipelines.clients.base import Embedder, TaskType, truncate_and_normalize
from pipelines.clients.packaged_models import cap_torch_threads, resolve_model, unavailable_error
from pipelines.clients.specs import DEFAULT_LOCAL_TEACHER
from pipelines.clients.task_prompts import prompts_by_task_type


def select_task_prompts(
    model_prompts: Mapping[str, str], overrides: Mapping[TaskType | str, str] | None = None
) -> dict[TaskType, str]:
    """Prompt prefix per task type: `overrides` first, then the model's own prompts (`prompts_by_task_type`).

    Task types left out embed the bare text. An override of "" switches a model's own prompt off.
    """
    prompts = prompts_by_task_type(model_prompts)
    for task_type, prefix in (overrides or {}).items():
        prompts[TaskType(task_type)] = prefix
    return {task_type: prefix for task_type, prefix in prompts.items() if prefix}


class LocalEmbedder(Embedder):
    """sentence-transformers on this machine. `stats.calls` counts batches (forward passes), like API requests."""

    def __init__(
        self,
        model: str = DEFAULT_LOCAL_TEACHER,
        *,
        device: str = "cpu",
        cache_dir: str | None = None,
        batch_size: int = 32,
        torch_threads: int | None = None,
        task_prompts: Mapping[TaskType | str, str] | None = None,
        max_seq_length: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.torch_threads = cap_torch_threads(torch_threads)
        resolved = resolve_model(model, cache_dir)
        from sentence_transformers import SentenceTransformer

        try:
            # local_files_only for folders: never ask the Hub about a path.
            self._model = SentenceTransformer(resolved.location, device=device, local_files_only=resolved.is_local)
        except OSError as error:
            raise unavailable_error(resolved, error) from error
        self.model_id = model
        # A Hub id was resolved to its snapshot (commit) before loading: the version cache keys were computed with.
        self.model_version = resolved.model_version
        self.location = resolved.location
        self.batch_size = batch_size
        get_dimension = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        self.native_dimension = int(get_dimension())
        if max_seq_length is not None:
            self._model.max_seq_length = max_seq_length
        #: Tokens read per text, prompt included; longer texts are truncated.
        self.max_seq_length = int(self._model.max_seq_length)
        self.task_prompts = select_task_prompts(self._model.prompts or {}, task_prompts)
        #: What the evaluator reports as the model's weight precision ("float32" for a model loaded as saved).
        self.weight_precision = str(next(self._model.parameters()).dtype).removeprefix("torch.")
        # One encode at a time: torch already uses every thread it is given, and interleaved calls only thrash.
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str], task_type: TaskType, dimension: int | None = None) -> np.ndarray:
        dimension = dimension or self.native_dimension
        if not texts:
            # Goes through truncate_and_normalize so a bad dimension fails the same way with or without texts.
            return truncate_and_normalize(np.zeros((0, self.native_dimension), dtype=np.float32), dimension)
        import torch

        prompt = self.task_prompts.get(TaskType(task_type))
        with self._lock, torch.inference_mode():
            vectors = self._model.encode(
                list(texts),
                prompt=prompt,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )
        for _ in range(math.ceil(len(texts) / self.batch_size)):
            self.stats.record()
        return truncate_and_normalize(np.asarray(vectors, dtype=np.float32), dimension)

    def close(self) -> None:
        self._model = None  # type: ignore[assignment] - drop the weights; the embedder is unusable afterwards
