"""Training configuration for the student embedder: one frozen dataclass (it pickles).

`TrainConfig.validate()` reports every impossible value in one message; `TrainConfig.from_dict` names unknown keys.
The task prompts here are what the student is trained with: `StudentEncoder.save` writes them into the model
directory (`config_sentence_transformers.json`) under the prompt names of `pipelines.clients.task_prompts` (the one
table of prompt names: the TaskType names), and `StudentEncoder`, `LocalEmbedder` (so evaluation) and
`SentenceTransformer.encode(prompt_name=...)` read them back by the same names, so training and evaluation cannot drift
apart (tevatron's lesson).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipelines.clients.base import TaskType
from pipelines.clients.specs import DEFAULT_LOCAL_STUDENT
from pipelines.clients.task_prompts import PROMPT_NAMES

#: EmbeddingGemma's prompt strings ("task: ... | query: " for the query side, "title: none | text: " for documents),
#: keyed by prompt name (`PROMPT_NAMES`: the TaskType names the rest of embforge uses).
DEFAULT_TASK_PROMPTS: dict[str, str] = {PROMPT_NAMES[task_type]: prompt for task_type, prompt in {
    TaskType.RETRIEVAL_QUERY: "task: search result | query: ",
    TaskType.RETRIEVAL_DOCUMENT: "title: none | text: ",
    TaskType.SEMANTIC_SIMILARITY: "task: sentence similarity | query: ",
    TaskType.CLASSIFICATION: "task: classification | query: ",
    TaskType.CLUSTERING: "task: clustering | query: ",
    TaskType.QUESTION_ANSWERING: "task: question answering | query: ",
    TaskType.FACT_VERIFICATION: "task: fact checking | query: ",
    TaskType.CODE_RETRIEVAL_QUERY: "task: code retrieval | query: ",
}.items()}

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Weight precisions of quantization-aware training and export (`embedder.qat`); here so the config needs no torch.
QAT_SCHEMES = ("int8", "int4", "mixed")
LR_SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    #: Hub id, local path (plain transformers or sentence-transformers directory) or `packaged:<name>`.
    student: str = DEFAULT_LOCAL_STUDENT
    #: Tokens per text after the prompt; 256 is what all-MiniLM-L6-v2 was trained with.
    max_seq_length: int = 256
    #: Examples per batch (every batch is full but the last of each task in an epoch); every other example's positive
    #: and negatives are in-batch negatives, so bigger is better for quality. 32 is what a 2-core CPU trains at about
    #: one triplet per second.
    batch_size: int = 32
    #: Optimizer steps; None trains for `epochs` passes over the data instead.
    max_steps: int | None = None
    epochs: int = 1
    #: 2e-5: the usual fine-tuning rate for BERT-size encoders (sentence-transformers' default).
    learning_rate: float = 2e-5
    #: For the freshly initialized linear layers (the projection after pooling, the distillation head): at the encoder's
    #: fine-tuning rate a random layer barely moves in a short run; 1e-3 is the usual Adam rate for a new layer.
    head_learning_rate: float = 1e-3
    #: Fraction of the optimizer steps spent warming up linearly from 0 (10%: the BERT fine-tuning default).
    warmup_ratio: float = 0.1
    #: "linear" or "cosine" decay to 0 after warmup, or "constant".
    lr_schedule: str = "linear"
    #: AdamW decoupled weight decay, not applied to biases and LayerNorm weights.
    weight_decay: float = 0.01
    #: Gradient-norm clip (0 = off); 1.0 keeps one odd batch from throwing the pretrained weights far.
    max_grad_norm: float = 1.0
    #: Micro-batches per optimizer step. Each micro-batch is its own contrastive batch (in-batch negatives do not
    #: span micro-batches), so this saves memory but does not enlarge the set of negatives.
    grad_accumulation: int = 1
    #: "auto": bf16 autocast on CUDA when supported, else fp16 with a GradScaler; fp32 on CPU.
    precision: str = "auto"
    #: "auto" picks CUDA when available.
    device: str = "auto"
    #: Torch CPU threads; None uses every core this process may run on (never more).
    num_threads: int | None = None
    seed: int = 42
    #: Quantization-aware training: "int8", "int4" or "mixed" fake-quantizes the encoder's weights (and the inputs of
    #: its int8 layers) as `embforge quantize --precision` will store them (`embedder.qat`); None trains in float. To
    #: finish a float student with QAT, as EmbeddingGemma does, set `student` to the trained model's folder.
    qat: str | None = None
    #: Output size of an optional linear projection after mean pooling (a sentence-transformers Dense module).
    projection_dim: int | None = None
    #: Prompt name (`pipelines.clients.task_prompts.PROMPT_NAMES`: the TaskType name) -> prompt prefix, saved with the
    #: model under that name and read back by it at evaluation.
    task_prompts: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_TASK_PROMPTS))
    #: Triplet `task` or classification `task_name` -> TaskType used for its query side (the text being classified).
    #: Unlisted triplet tasks use RETRIEVAL_QUERY, unlisted classification tasks CLASSIFICATION; documents, positives,
    #: negatives and label descriptions always use RETRIEVAL_DOCUMENT.
    task_types: Mapping[str, str] = field(default_factory=dict)
    #: Prompt that `SentenceTransformer.encode` applies when no prompt_name is given. None: raw text, what a user
    #: calling plain `encode` expects; `encode_query` / `encode_document` pick the "query" / "document" aliases.
    default_prompt_name: str | None = None

    # Losses. A term is on when its weight is > 0.
    #: 0.05 = sentence-transformers' MNRL scale of 20, a well-tried setting for MiniLM-size students.
    temperature: float = 0.05
    infonce_weight: float = 1.0
    #: Matryoshka: the contrastive losses are averaged over these truncations (descending, at most the model's
    #: dimension). Empty: full dimension only.
    matryoshka_dims: tuple[int, ...] = (384, 256, 128, 64)
    #: Embedding matching to the teacher embeddings cached in the triplet rows (skipped where a row has none).
    distillation_weight: float = 1.0
    #: Global orthogonal regularization: its terms are ~0.05 for a pretrained MiniLM, small next to InfoNCE (~1), so 1.0
    #: nudges embeddings apart without fighting the main loss.
    spread_out_weight: float = 1.0
    classification_weight: float = 1.0
    #: Margin distillation (MarginMSE, GPL): the student's score margin between a triplet's positive and each of its
    #: hard negatives regresses onto the teacher's (cosines of the cached teacher vectors). Off by default: a lever to
    #: ablate; it needs teacher embeddings in the triplet rows.
    margin_distillation_weight: float = 0.0
    #: With `qat`: the fake-quantized student's vectors regress onto those of the float model it started from (a frozen
    #: copy, dropout off), 1 - cosine per text of each batch. QAT then spends its steps on what quantization broke
    #: rather than on moving the model, and needs no labels: every query and passage of a batch is a training text.
    #: Alone (the other triplet weights 0) the float model itself is the target, the usual data-free QAT recipe.
    qat_self_distillation_weight: float = 0.0

    #: Optimizer steps between checkpoints; 0 writes only the final one.
    checkpoint_every: int = 500
    #: Checkpoints kept on disk (oldest removed first); 0 keeps all of them, e.g. for a soup of checkpoints.
    keep_checkpoints: int = 0
    output_dir: str = "runs/student"
    #: Rich progress bar; off in tests and non-interactive jobs to keep logs short.
    progress: bool = True

    def problems(self) -> list[str]:
        """Every impossible value, as messages that name the field and what would be valid."""
        found = []
        if not self.student:
            found.append(f"student: empty (a Hub id, a local path or {DEFAULT_LOCAL_STUDENT!r})")
        if self.max_seq_length < 1:
            found.append(f"max_seq_length: {self.max_seq_length} (must be >= 1)")
        if self.batch_size < 2:
            found.append(f"batch_size: {self.batch_size} (must be >= 2: in-batch negatives need another example)")
        if self.max_steps is not None and self.max_steps < 1:
            found.append(f"max_steps: {self.max_steps} (must be >= 1, or None to train by epochs)")
        if self.max_steps is None and self.epochs < 1:
            found.append(f"epochs: {self.epochs} (must be >= 1 when max_steps is None)")
        if not self.learning_rate > 0:
            found.append(f"learning_rate: {self.learning_rate} (must be > 0)")
        if not self.head_learning_rate > 0:
            found.append(f"head_learning_rate: {self.head_learning_rate} (must be > 0)")
        if not 0 <= self.warmup_ratio < 1:
            found.append(f"warmup_ratio: {self.warmup_ratio} (must be in [0, 1))")
        if self.lr_schedule not in LR_SCHEDULES:
            found.append(f"lr_schedule: {self.lr_schedule!r} (expected one of {', '.join(LR_SCHEDULES)})")
        if self.weight_decay < 0:
            found.append(f"weight_decay: {self.weight_decay} (must be >= 0)")
        if self.max_grad_norm < 0:
            found.append(f"max_grad_norm: {self.max_grad_norm} (must be >= 0; 0 = no clipping)")
        if self.grad_accumulation < 1:
            found.append(f"grad_accumulation: {self.grad_accumulation} (must be >= 1)")
        if self.precision not in PRECISIONS:
            found.append(f"precision: {self.precision!r} (expected one of {', '.join(PRECISIONS)})")
        if self.qat is not None and self.qat not in QAT_SCHEMES:
            found.append(f"qat: {self.qat!r} (expected one of {', '.join(QAT_SCHEMES)}, or unset to train in float)")
        if self.qat_self_distillation_weight > 0 and self.qat is None:
            found.append(f"qat_self_distillation_weight: {self.qat_self_distillation_weight} needs qat set (a float "
                         "model distilled onto itself learns nothing)")
        if self.num_threads is not None and self.num_threads < 1:
            found.append(f"num_threads: {self.num_threads} (must be >= 1, or None for all available cores)")
        if self.projection_dim is not None and self.projection_dim < 1:
            found.append(f"projection_dim: {self.projection_dim} (must be >= 1, or None for no projection)")
        task_type_names = {task_type.value for task_type in TaskType}
        prompt_names = set(PROMPT_NAMES.values())
        unknown_prompts = sorted(set(self.task_prompts) - prompt_names)
        if unknown_prompts:
            found.append(f"task_prompts: unknown task types {unknown_prompts} (expected {sorted(prompt_names)})")
        if not all(isinstance(prompt, str) for prompt in self.task_prompts.values()):
            found.append("task_prompts: every prompt must be a string")
        bad_task_types = sorted(f"{task}={kind}" for task, kind in self.task_types.items()
                                if kind not in task_type_names)
        if bad_task_types:
            found.append(f"task_types: unknown task types {bad_task_types} (expected {sorted(task_type_names)})")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.task_prompts:
            found.append(f"default_prompt_name: {self.default_prompt_name!r} is not a key of task_prompts")
        if not self.temperature > 0:
            found.append(f"temperature: {self.temperature} (must be > 0)")
        dims = tuple(self.matryoshka_dims)
        if any(not isinstance(dim, int) or dim < 1 for dim in dims):
            found.append(f"matryoshka_dims: {dims} (every dimension must be a positive integer)")
        elif any(later >= earlier for earlier, later in zip(dims, dims[1:], strict=False)):
            found.append(f"matryoshka_dims: {dims} (must be strictly descending, e.g. (384, 256, 128, 64))")
        elif dims and self.projection_dim is not None and dims[0] > self.projection_dim:
            found.append(f"matryoshka_dims: {dims[0]} is larger than projection_dim {self.projection_dim}")
        weights = {name: getattr(self, name) for name in
                   ("infonce_weight", "distillation_weight", "spread_out_weight", "classification_weight",
                    "margin_distillation_weight", "qat_self_distillation_weight")}
        negative = sorted(name for name, weight in weights.items() if weight < 0)
        if negative:
            found.append(f"{', '.join(negative)}: must be >= 0")
        elif not any(weight > 0 for weight in weights.values()):
            found.append("every loss weight is 0: nothing to train")
        if self.checkpoint_every < 0:
            found.append(f"checkpoint_every: {self.checkpoint_every} (must be >= 0; 0 = only at the end)")
        if self.keep_checkpoints < 0:
            found.append(f"keep_checkpoints: {self.keep_checkpoints} (must be >= 0; 0 = keep all)")
        if not self.output_dir:
            found.append("output_dir: empty")
        elif "://" in self.output_dir:
            found.append(f"output_dir: {self.output_dir!r} (must be a local folder: the student is saved with torch)")
        return found

    def validate(self) -> TrainConfig:
        found = self.problems()
        if found:
            raise ValueError("invalid TrainConfig: " + "; ".join(found))
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a plain dict (YAML / JSON / CLI); unknown keys are an error that names them."""
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown TrainConfig keys: {', '.join(hints)}; known keys: {', '.join(sorted(known))}")
        values = dict(values)
        _check_scalar_types(cls, values)
        if "matryoshka_dims" in values and values["matryoshka_dims"] is not None:
            values["matryoshka_dims"] = tuple(values["matryoshka_dims"])
        if values.get("matryoshka_dims") is None:
            values.pop("matryoshka_dims", None)
        for key in ("task_prompts", "task_types"):
            if key in values:
                values[key] = dict(values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values; `from_dict(to_dict())` round-trips."""
        values = dataclasses.asdict(self)
        values["matryoshka_dims"] = list(self.matryoshka_dims)
        values["task_prompts"] = dict(self.task_prompts)
        values["task_types"] = dict(self.task_types)
        return values

    def query_task_type(self, task: str, *, classification: bool) -> str:
        """The TaskType whose prompt goes in front of a query (or text to classify) of `task`."""
        default = TaskType.CLASSIFICATION.value if classification else TaskType.RETRIEVAL_QUERY.value
        return self.task_types.get(task, default)


#: Python types a scalar setting accepts, and how an error names them.
_SCALAR_TYPES = {bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
                 str: ((str,), "a string")}


def _check_scalar_types(cls: type, values: Mapping[str, Any]) -> None:
    """A scalar setting of the wrong type is one ValueError naming it (not a TypeError from a later comparison)."""
    for name, annotation in typing.get_type_hints(cls).items():
        if name not in values:
            continue
        value = values[name]
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        options = typing.get_args(annotation) if union else (annotation,)
        if value is None and type(None) in options:
            continue
        for option in options:
            accepted, wanted = _SCALAR_TYPES.get(option, ((), ""))
            if not wanted:
                break  # not a scalar setting: from_dict and validate check it
            if isinstance(value, accepted) and (option is bool or not isinstance(value, bool)):
                break
        else:
            raise ValueError(f"{name}: expected {wanted}, got {value!r}")
