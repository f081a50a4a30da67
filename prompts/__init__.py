"""Every LLM prompt embforge sends: one folder per prompt, one source of truth for every backend.

A prompt folder `prompts/<name>/` holds:

- `template.txt`: the user turn, in `string.Template` syntax (`$field`, `$$` for a literal dollar). Substitution is one
  pass over the template, so braces or `$` inside an inserted value are never re-interpreted.
- `system.txt` (optional): the static system instruction. It takes no fields, so it is the same for every request.
- `examples.jsonl` (optional): few-shot examples, one JSON object a line: the template's fields plus `"output"`, the
  answer. Answers are validated against the output model at import time, so a broken example fails loudly.
- `__init__.py`: the pydantic output model and `PROMPT = PromptSpec.from_package(__name__, ...)`.

The registry discovers the folders by itself: adding a prompt needs no edit here. Untrusted text (passages, queries,
seed examples) goes into `data_fields`; `render` wraps each such value in `<field>...</field>` and neutralises any
closing tag inside it, so a passage can never close its own block and pose as instructions.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.resources
import pkgutil
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, ValidationError

from pipelines.clients.base import ChatMessage
from pipelines.json_lines import INVALID_JSON, INVALID_UTF8, parse_json_lines

#: A value a template field accepts: inline fields take str or int; data fields take str or a sequence of str.
FieldValue = str | int | tuple[str, ...]

#: Tag around each item of a list-valued data field, inside the field's own block.
ITEM_TAG = "item"

TEMPLATE_FILE = "template.txt"
SYSTEM_FILE = "system.txt"
EXAMPLES_FILE = "examples.jsonl"
#: The key of an examples.jsonl row that holds the answer; every other key is a template field.
EXAMPLE_OUTPUT_KEY = "output"


class PromptRenderError(ValueError):
    """A prompt was rendered with missing, unexpected or ill-typed fields."""


# --- Validators shared by the output models ---------------------------------------------------------------------------
# They are AfterValidators rather than pydantic constraints so the JSON schema handed to backends stays plain `string`.


def _strip_non_empty(value: str) -> str:
    text = value.strip()
    if not text:
        raise ValueError("must not be empty or whitespace")
    return text


def at_most_words(limit: int) -> AfterValidator:
    """An AfterValidator rejecting text longer than `limit` whitespace-separated words."""

    def check(value: str) -> str:
        words = len(value.split())
        if words > limit:
            raise ValueError(f"has {words} words, more than {limit}")
        return value

    return AfterValidator(check)


#: A string answer field: surrounding whitespace stripped, empty rejected.
NonEmptyText = Annotated[str, AfterValidator(_strip_non_empty)]

#: What each relevance grade means; the system.txt of relevance_grading and of negative_scoring state the same rubric.
RELEVANCE_LEVELS: dict[int, str] = {
    0: "irrelevant",
    1: "related but does not answer",
    2: "partially answers",
    3: "fully answers",
}

#: A relevance grade answer field, one of RELEVANCE_LEVELS. strict: "2", 2.0 or true mean the model ignored the
#: schema, so the answer is not trusted.
RelevanceLevel = Annotated[int, Field(ge=min(RELEVANCE_LEVELS), le=max(RELEVANCE_LEVELS), strict=True)]


# --- The spec ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FewShotExample:
    """One demonstration: the template fields of its user turn and the assistant's answer, already canonical."""

    inputs: tuple[tuple[str, FieldValue], ...]
    answer: str

    @property
    def fields(self) -> dict[str, FieldValue]:
        return dict(self.inputs)


def _template_fields(template: str, where: str) -> tuple[str, ...]:
    """Field names in order of first appearance; an invalid placeholder (`$` not followed by a name) is an error."""
    names: list[str] = []
    for match in string.Template.pattern.finditer(template):
        if match.group("invalid") is not None:
            line = template.count("\n", 0, match.start("invalid")) + 1
            raise ValueError(f"{where} line {line}: stray '$' (write '$$' for a literal dollar sign)")
        name = match.group("named") or match.group("braced")
        if name and name not in names:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class PromptSpec:
    """A prompt: template + output model + version. Frozen and made of module-level objects, so it pickles for Beam.

    Bump `version` on any change to the template, system text, examples or output model: it is part of every cache key
    and is written next to every generated row.
    """

    name: str
    version: str
    output_model: type[BaseModel]
    #: The user turn, `string.Template` syntax.
    template: str
    #: Static system instruction; None sends no system message.
    system: str | None = None
    examples: tuple[FewShotExample, ...] = ()
    #: Fields holding untrusted text, wrapped in `<field>...</field>` blocks when rendered.
    data_fields: tuple[str, ...] = ()
    #: When set, `render` uses only the examples whose value of this field equals the request's.
    example_key: str | None = None
    #: Few-shot examples per request (the first ones in file order, after `example_key` filtering).
    max_examples: int = 3
    #: "json": the assistant answers with the output model as compact JSON. "text": the output model has one str field
    #: and the assistant answers with its bare value (prompts scored with log p(answer | prompt), see query_likelihood).
    answer_format: Literal["json", "text"] = "json"
    #: Checks request values beyond types (allowed query types, count range); raises ValueError naming the field.
    check_fields: Callable[[Mapping[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        fields = _template_fields(self.template, f"prompt {self.name}: {TEMPLATE_FILE}")
        if self.system is not None:
            # The system text is sent as is; a placeholder there would silently never be filled.
            system_fields = _template_fields(self.system, f"prompt {self.name}: {SYSTEM_FILE}")
            if system_fields:
                raise ValueError(f"prompt {self.name}: {SYSTEM_FILE} takes no fields, found {', '.join(system_fields)}")
        for declared in (*self.data_fields, *([self.example_key] if self.example_key else [])):
            if declared not in fields:
                raise ValueError(f"prompt {self.name}: field {declared!r} is declared but not in {TEMPLATE_FILE}")
        if self.max_examples < 0:
            raise ValueError(f"prompt {self.name}: max_examples must be >= 0, got {self.max_examples}")
        if self.answer_format == "text":
            model_fields = self.output_model.model_fields
            if len(model_fields) != 1 or next(iter(model_fields.values())).annotation is not str:
                raise ValueError(f"prompt {self.name}: answer_format 'text' needs an output model with one str field")
        for index, example in enumerate(self.examples, start=1):
            try:
                self.render_user(**example.fields)
            except PromptRenderError as error:
                raise ValueError(f"prompt {self.name}: few-shot example {index}: {error}") from None

    @functools.cached_property
    def _closing_tag(self) -> re.Pattern[str]:
        # Every data tag of the prompt, not only the value's own: a query must not close the passage block either.
        # Lenient about case and spaces because LLMs are.
        tags = "|".join(re.escape(tag) for tag in sorted({*self.data_fields, ITEM_TAG}))
        return re.compile(rf"<\s*/\s*({tags})\b[^>]*>", re.IGNORECASE)

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields `render` requires, in order of first appearance in the template."""
        return _template_fields(self.template, self.name)

    @classmethod
    def from_package(
        cls,
        package: str,
        *,
        version: str,
        output_model: type[BaseModel],
        data_fields: Sequence[str] = (),
        example_key: str | None = None,
        max_examples: int = 3,
        answer_format: Literal["json", "text"] = "json",
        check_fields: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> PromptSpec:
        """Load a prompt folder: call as `PromptSpec.from_package(__name__, ...)` from the folder's `__init__.py`.

        Files are read through importlib.resources, so this works from a source checkout, an editable install and a
        wheel alike.
        """
        folder = importlib.resources.files(package)
        template = folder.joinpath(TEMPLATE_FILE).read_text(encoding="utf-8").rstrip("\n")
        system_file = folder.joinpath(SYSTEM_FILE)
        system = system_file.read_text(encoding="utf-8").rstrip("\n") if system_file.is_file() else None
        spec = cls(
            name=package.rsplit(".", 1)[-1],
            version=version,
            output_model=output_model,
            template=template,
            system=system,
            data_fields=tuple(data_fields),
            example_key=example_key,
            max_examples=max_examples,
            answer_format=answer_format,
            check_fields=check_fields,
        )
        examples_file = folder.joinpath(EXAMPLES_FILE)
        if not examples_file.is_file():
            return spec
        examples = spec._parse_examples(examples_file.read_bytes())
        return dataclasses.replace(spec, examples=examples)

    def _parse_examples(self, data: bytes) -> tuple[FewShotExample, ...]:
        examples = []
        for line in parse_json_lines(data):
            where = f"prompt {self.name}: {EXAMPLES_FILE} line {line.number}"
            if line.problem in (INVALID_UTF8, INVALID_JSON):
                raise ValueError(f"{where}: {line.detail}")
            row = line.value
            if not isinstance(row, dict) or EXAMPLE_OUTPUT_KEY not in row:
                raise ValueError(f"{where}: expected an object with an {EXAMPLE_OUTPUT_KEY!r} key")
            output = row.pop(EXAMPLE_OUTPUT_KEY)
            try:
                answer = self.format_answer(output)
            except ValidationError as error:
                model = self.output_model.__name__
                raise ValueError(f"{where}: output does not validate as {model}: {error}") from None
            inputs = tuple((key, tuple(value) if isinstance(value, list) else value) for key, value in row.items())
            try:
                self.render_user(**dict(inputs))
            except PromptRenderError as error:
                raise ValueError(f"{where}: {error}") from None
            examples.append(FewShotExample(inputs=inputs, answer=answer))
        return tuple(examples)

    # --- rendering ---------------------------------------------------------------------------------------------------

    def format_answer(self, answer: BaseModel | Mapping[str, Any]) -> str:
        """The canonical assistant turn for `answer`: what few-shot examples show and what score mode scores.

        Validates `answer` against the output model first, so it is also the normalised form (stripped strings).
        """
        value = self.output_model.model_validate(answer if isinstance(answer, Mapping) else answer.model_dump())
        if self.answer_format == "text":
            return str(next(iter(value.model_dump().values())))
        return value.model_dump_json()

    def _neutralise(self, text: str) -> str:
        return self._closing_tag.sub(lambda match: f"&lt;/{match.group(1)}&gt;", text)

    def _data_block(self, name: str, value: FieldValue) -> str:
        if isinstance(value, str):
            body = self._neutralise(value)
        elif isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
            body = "\n".join(f"<{ITEM_TAG}>{self._neutralise(item)}</{ITEM_TAG}>" for item in value)
        else:
            raise PromptRenderError(
                f"prompt {self.name}: field {name!r} is data and takes str or a list of str, got {type(value).__name__}"
            )
        return f"<{name}>\n{body}\n</{name}>" if body else f"<{name}></{name}>"

    def _check(self, fields: Mapping[str, Any]) -> None:
        expected = self.fields
        missing = [name for name in expected if name not in fields]
        unexpected = sorted(name for name in fields if name not in expected)
        if missing or unexpected:
            problems = [f"missing field {name!r}" for name in missing]
            problems += [f"unexpected field {name!r}" for name in unexpected]
            raise PromptRenderError(f"prompt {self.name}: {'; '.join(problems)} (expects: {', '.join(expected)})")
        for name, value in fields.items():
            if name in self.data_fields:
                continue  # type-checked by _data_block
            # bool is an int subclass, but "True" in a prompt is always a caller's mistake.
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise PromptRenderError(
                    f"prompt {self.name}: field {name!r} takes str or int, got {type(value).__name__}"
                )
        if self.check_fields is not None:
            try:
                self.check_fields(fields)
            except ValueError as error:
                raise PromptRenderError(f"prompt {self.name}: {error}") from None

    def render_user(self, **fields: Any) -> str:
        """The user turn for `fields` alone (no system message, no examples)."""
        self._check(fields)
        values = {
            name: self._data_block(name, value) if name in self.data_fields else str(value)
            for name, value in fields.items()
        }
        return string.Template(self.template).substitute(values)

    def select_examples(self, **fields: Any) -> tuple[FewShotExample, ...]:
        """The examples `render` shows for these fields: deterministic, the first matches in file order."""
        if self.example_key is None:
            candidates = self.examples
        else:
            candidates = tuple(
                example for example in self.examples if example.fields.get(self.example_key) == fields[self.example_key]
            )
        return candidates[: self.max_examples]

    def render(self, **fields: Any) -> tuple[ChatMessage, ...]:
        """System message (if any), few-shot examples as user/assistant turns, then the request's user turn."""
        return self.render_with(self.select_examples(**fields), **fields)

    def render_with(self, examples: Sequence[FewShotExample], **fields: Any) -> tuple[ChatMessage, ...]:
        """`render`, showing `examples` instead of `select_examples`' choice (e.g. a user's own, chosen per row)."""
        user = self.render_user(**fields)
        messages = [ChatMessage("system", self.system)] if self.system is not None else []
        for example in examples:
            messages.append(ChatMessage("user", self.render_user(**example.fields)))
            messages.append(ChatMessage("assistant", example.answer))
        messages.append(ChatMessage("user", user))
        return tuple(messages)

    def render_text(self, **fields: Any) -> str:
        """All messages as one string with role headers: the canonical form golden files compare."""
        return "\n\n".join(f"=== {message.role} ===\n{message.content}" for message in self.render(**fields)) + "\n"


# --- The registry -----------------------------------------------------------------------------------------------------


def data_field(content: str, name: str) -> str:
    """The text of data field `name` in a rendered user message (the inverse of `PromptSpec`'s data blocks, closing
    tags in the data left neutralised); "" when the message has no such field. For backends that answer from the
    data itself: test fakes and benchmarks' scripted writers."""
    match = re.search(rf"<{name}>\n?(.*?)\n?</{name}>", content, re.S)
    return match.group(1) if match else ""


def discover_prompts(package: str) -> dict[str, PromptSpec]:
    """Import every subpackage of `package` and collect its `PROMPT`, keyed by name (sorted)."""
    root = importlib.import_module(package)
    found: dict[str, PromptSpec] = {}
    for module_info in pkgutil.iter_modules(root.__path__):
        if not module_info.ispkg:
            continue
        module = importlib.import_module(f"{package}.{module_info.name}")
        spec = getattr(module, "PROMPT", None)
        if not isinstance(spec, PromptSpec):
            raise TypeError(f"{module.__name__} defines no PROMPT = PromptSpec(...); every prompt folder must")
        if spec.name != module_info.name:
            raise ValueError(f"{module.__name__}: PROMPT.name is {spec.name!r}, expected the folder name")
        found[spec.name] = spec
    return dict(sorted(found.items()))


@functools.cache
def _registry() -> dict[str, PromptSpec]:
    # Lazy: the prompt subpackages import PromptSpec from here, so discovery cannot run while this module loads.
    return discover_prompts(__name__)


def all_prompts() -> dict[str, PromptSpec]:
    """Every prompt, by name."""
    return dict(_registry())


def get_prompt(name: str) -> PromptSpec:
    registry = _registry()
    if name not in registry:
        raise KeyError(f"unknown prompt {name!r}; known prompts: {', '.join(registry)}")
    return registry[name]


def prompt_versions() -> dict[str, str]:
    """Name -> version of every prompt, for the run manifest."""
    return {name: spec.version for name, spec in _registry().items()}
