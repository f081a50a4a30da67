"""Prompt names: the one table saying under which name each task type's prompt is stored in a model and looked up.

A sentence-transformers model keeps its prompts in `config_sentence_transformers.json` as {name: prefix}. embforge
names them by TaskType (`PROMPT_NAMES`): the trainer's `TrainConfig.task_prompts` are keyed by these names,
`StudentEncoder.save` writes them under these names (plus the "query" / "document" aliases that sentence-transformers'
`encode_query` / `encode_document` read), and `StudentEncoder`, `LocalEmbedder` (hence evaluation) and
`SentenceTransformer(dir).encode(texts, prompt_name=prompt_name(task_type))` all read them back by these names.
Training and evaluation cannot drift apart (tevatron's lesson).

Models embforge did not train name their prompts otherwise: EmbeddingGemma ships "Retrieval-query", "Classification",
"STS", ...; many sentence-transformers models ship only "query" / "document". `prompts_by_task_type` reads those
through `FOREIGN_PROMPT_NAMES`, but only for a model that has no prompt under a TaskType name: a model that names its
prompts by TaskType is read by those names alone, so a task type it was trained without embeds the bare text instead
of silently borrowing the generic query prompt.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipelines.clients.base import TaskType

#: TaskType -> the name of its prompt in a model's prompts: the TaskType's own name.
PROMPT_NAMES: dict[TaskType, str] = {task_type: task_type.value for task_type in TaskType}

#: sentence-transformers' alias names -> the task type whose prompt they repeat. Written beside the TaskType names
#: so `encode_query` / `encode_document` (which look for "query" / "document") use the trained prompts.
PROMPT_ALIASES: dict[str, TaskType] = {"query": TaskType.RETRIEVAL_QUERY, "document": TaskType.RETRIEVAL_DOCUMENT}

#: Names tried, in order, for models without TaskType-named prompts. EmbeddingGemma's names first, then the
#: sentence-transformers convention ("query" / "document"); query-side tasks fall back to the generic query prompt.
FOREIGN_PROMPT_NAMES: dict[TaskType, tuple[str, ...]] = {
    TaskType.RETRIEVAL_QUERY: ("Retrieval-query", "query"),
    TaskType.RETRIEVAL_DOCUMENT: ("Retrieval-document", "document", "passage"),
    TaskType.SEMANTIC_SIMILARITY: ("STS",),
    TaskType.CLASSIFICATION: ("Classification",),
    TaskType.CLUSTERING: ("Clustering",),
    TaskType.QUESTION_ANSWERING: ("Question Answering", "query"),
    TaskType.FACT_VERIFICATION: ("Fact Verification", "query"),
    TaskType.CODE_RETRIEVAL_QUERY: ("Code Retrieval", "query"),
}


def prompt_name(task_type: TaskType | str) -> str:
    """The prompt name of `task_type` (a TaskType or its name; "query" / "document" name their task types)."""
    if isinstance(task_type, str) and task_type in PROMPT_ALIASES:
        task_type = PROMPT_ALIASES[task_type]
    try:
        return PROMPT_NAMES[TaskType(task_type)]
    except ValueError:
        raise KeyError(f"{task_type!r} is not a task type (expected one of {sorted(PROMPT_NAMES.values())} or "
                       f"{sorted(PROMPT_ALIASES)})") from None


def prompts_by_task_type(model_prompts: Mapping[str, str]) -> dict[TaskType, str]:
    """The prompt of each task type in a model's own prompts (`SentenceTransformer.prompts`); see the module docstring.

    Task types left out embed the bare text, as do those whose prompt is "" (kept here: a model trained with "" for a
    task type has that task type, without a prompt). A foreign name with an empty prompt falls through to the next.
    """
    if any(name in model_prompts for name in PROMPT_NAMES.values()):
        return {task_type: model_prompts[name] for task_type, name in PROMPT_NAMES.items() if name in model_prompts}
    found = {task_type: next((model_prompts[name] for name in names if model_prompts.get(name)), None)
             for task_type, names in FOREIGN_PROMPT_NAMES.items()}
    return {task_type: prompt for task_type, prompt in found.items() if prompt}


def prompts_to_save(prompts: Mapping[TaskType | str, str]) -> dict[str, str]:
    """Prompts keyed by task type (or prompt name) -> the `prompts` a model directory stores: the TaskType names plus
    the "query" / "document" aliases."""
    saved = {prompt_name(task_type): prompt for task_type, prompt in prompts.items()}
    for alias, task_type in PROMPT_ALIASES.items():
        if PROMPT_NAMES[task_type] in saved:
            saved[alias] = saved[PROMPT_NAMES[task_type]]
    return saved
