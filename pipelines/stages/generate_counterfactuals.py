"""Stage 3, GenerateCounterfactuals (Gemini Embedding): classification data from a task spec and a few seed examples.

Input: a task spec file (YAML or JSON, read through Beam filesystems, so `gs://` works), loaded when the pipeline is
built so a broken spec stops the run before any work. Output: `{"kept": CLASSIFICATION_EXAMPLE rows, "rejected":
REJECTED rows, "tallies": (("stage", STAGE, field), count) for the manifest, "answers": LLMAnswer for usage}`.

Three kinds of kept rows (`origin`):
- "seed": the spec's own labelled examples (when `include_seed_examples`).
- "generated": new examples the LLM writes for one label, shown a few seeds of that label (`example_generation`).
- "counterfactual": a seed minimally edited so that it belongs to another label (`counterfactual_generation`); it keeps
  `counterfactual_of` (the seed's example_id) and `original_label`. Pairs that differ in a few words but not in label
  are what teaches an embedding model what a label depends on.

The task spec (`load_task_spec`):

    name: bike_share_support
    description: Route messages sent to a city bike-sharing service
    labels:
      - {name: payment, description: Charges, refunds, passes and payment methods}
      - {name: broken_bike, description: A bike that is damaged or does not work}
    seed_examples: seeds.csv          # relative to the spec file; CSV or JSONL (optionally .gz)
    # or, to name the columns:  seed_examples: {path: seeds.csv, text_field: message, label_field: topic}
    examples:                         # inline seeds, in addition to or instead of the file
      - {text: "The bike at Elm St has a flat tyre", label: broken_bike}

What is an error and what is a rejected row: a problem of the spec itself (unreadable file, unknown key, fewer than
two labels, duplicate label names, a label without description, a seed file without the configured column, or every
seed row unusable, which is almost always a wrong `text_field` / `label_field`) raises `TaskSpecError` naming the file
and the field. A problem of one seed row is data, not a broken spec: the row becomes a rejected row whose `detail`
names the file, line and field, so nothing is silently dropped and the rest of the seeds still work.

Rejects (reason codes). Seed rows: `malformed_row` (unparseable JSONL line, CSV row with the wrong number of columns,
a non-string field), `empty_text`, `missing_label`, `unknown_label`, `duplicate_seed` (same normalized text as an
earlier seed). LLM output: `llm_failed` (no valid answer; raw answer kept), `skipped_by_budget` (never called: the
run's LLM budget was spent), `surplus` (an answer listed more examples than asked), `empty_text` (no words left after
normalization), `unchanged` (a counterfactual identical to its seed),
`copies_example` (repeats a text the prompt showed as a few-shot example), `duplicate` (repeats a seed or an earlier
generated example), `conflicting_labels` (the same text generated for two different labels: all copies go, since the
text cannot be trusted for either), `not_minimal` (a counterfactual that rewrote most of the seed).

Accounting. The stage's units are the seed rows it read (valid or not) plus its LLM requests (one per label and
chunk of `examples_per_request` new examples, one per seed and target label for counterfactuals), so
`input = seed rows read + requests`. A seed row ends as kept, rejected or, when `include_seed_examples` is off,
`skipped`. A request's answer ends as one rejected row (`llm_failed`) or as one row per text it listed, each kept or
rejected; the rows beyond the first of an answer are reported as `expanded`. So the manifest's balance holds:
`input + expanded = kept + rejected + skipped`. The "tallies" output carries input, expanded, kept and skipped
(rejected is counted from the rejected rows, as for every stage).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import apache_beam as beam
import numpy as np
import yaml
from apache_beam.io.filesystems import FileSystems

from pipelines.clients.base import GenerationConfig
from pipelines.clients.factory import LLMSpec
from pipelines.config_loading import ConfigError
from pipelines.llm_calls import CallLLM, LLMAnswer, LLMRequest, RunBudget, failure_reason
from pipelines.stages import StageCounters, normalize, rejected_row, stable_hash
from prompts import PromptSpec, get_prompt
from prompts.example_generation import MAX_EXAMPLES

STAGE = "generate_counterfactuals"
EXAMPLES_PROMPT = "example_generation"
COUNTERFACTUAL_PROMPT = "counterfactual_generation"
#: Among copies of one text, the origin listed first is kept: a counterfactual is worth more than a new example
#: because it comes paired with its seed.
ORIGINS = ("seed", "counterfactual", "generated")

_SPEC_KEYS = ("name", "description", "labels", "seed_examples", "examples")
_LABEL_KEYS = ("name", "description")
_SEED_FILE_KEYS = ("path", "text_field", "label_field")


class TaskSpecError(ConfigError):
    """The task spec cannot be used as given; the message names the file and the field. Raised while the pipeline is
    built, before any work."""


# --- The task spec ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSpec:
    name: str
    description: str


@dataclass(frozen=True)
class SeedExample:
    #: The seed's example_id, derived from its text (not its line), so editing the seed file elsewhere keeps the ids,
    #: and with them every deterministic choice and LLM cache key, unchanged.
    seed_id: str
    text: str
    label: str
    #: Where it came from, e.g. "data/seeds.csv line 4" or "task.yaml examples[2]".
    location: str


@dataclass(frozen=True)
class RejectedSeed:
    reason: str
    location: str
    detail: str
    #: The row as JSON (or the raw line when it did not parse), for the rejected row's payload.
    payload: str


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    labels: tuple[LabelSpec, ...]
    seeds: tuple[SeedExample, ...] = ()
    rejected_seeds: tuple[RejectedSeed, ...] = ()
    source: str = ""

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    def label(self, name: str) -> LabelSpec:
        for label in self.labels:
            if label.name == name:
                return label
        raise KeyError(f"task {self.name!r} has no label {name!r}")

    def seeds_of(self, label: str) -> tuple[SeedExample, ...]:
        """The label's seeds ordered by id, so choices among them do not depend on the seed file's order."""
        return tuple(sorted((seed for seed in self.seeds if seed.label == label), key=lambda seed: seed.seed_id))

    @property
    def seed_rows_read(self) -> int:
        return len(self.seeds) + len(self.rejected_seeds)


def example_id(task: str, origin: str, source_id: str, index: int | str) -> str:
    """Deterministic id of an output row: the same task, origin, source and index give the same id in every run."""
    material = json.dumps([task, origin, source_id, index], ensure_ascii=False)
    return hashlib.sha256(material.encode()).hexdigest()[:20]


def _read_text(path: str, what: str) -> str:
    try:
        with FileSystems.open(path) as handle:
            data = handle.read()
    except Exception as error:  # Beam wraps every filesystem's own error type; any of them means "cannot read"
        raise TaskSpecError(f"{path}: cannot read the {what} ({error})") from error
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TaskSpecError(f"{path}: the {what} is not UTF-8 ({error})") from error


def _required_text(mapping: Mapping[str, Any], key: str, where: str) -> str:
    value = mapping.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise TaskSpecError(f"{where}: missing or empty {key!r} (expected a non-empty string)")
    return value.strip()


def _check_keys(mapping: Any, allowed: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if not isinstance(mapping, Mapping):
        raise TaskSpecError(f"{where}: expected a mapping with keys {', '.join(allowed)}, got {type(mapping).__name__}")
    unknown = sorted(str(key) for key in mapping if key not in allowed)
    if unknown:
        raise TaskSpecError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(allowed)})")
    return mapping


def _parse_labels(value: Any, source: str) -> tuple[LabelSpec, ...]:
    if not isinstance(value, list):
        raise TaskSpecError(f"{source}: 'labels' must be a list of {{name, description}}, got {type(value).__name__}")
    labels: list[LabelSpec] = []
    first_at: dict[str, int] = {}
    for index, item in enumerate(value):
        where = f"{source}: labels[{index}]"
        item = _check_keys(item, _LABEL_KEYS, where)
        name = _required_text(item, "name", where)
        if name in first_at:
            raise TaskSpecError(f"{where}: duplicate label name {name!r} (first at labels[{first_at[name]}])")
        first_at[name] = index
        labels.append(LabelSpec(name, _required_text(item, "description", where)))
    if len(labels) < 2:
        raise TaskSpecError(f"{source}: 'labels' needs at least 2 labels, got {len(labels)}: "
                            "a classification task (and a counterfactual) needs another label to flip to")
    return tuple(labels)


def _malformed(location: str, detail: str, payload: str) -> RejectedSeed:
    return RejectedSeed("malformed_row", location, f"{location}: {detail}", payload)


def _read_seed_file(
    path: str, text_field: str, label_field: str
) -> Iterator[tuple[str, Mapping[str, Any] | RejectedSeed]]:
    """(location, row) per data row of a CSV or JSONL seed file; a row that does not parse comes as a RejectedSeed."""
    text = _read_text(path, "seed file")
    base = path.lower().removesuffix(".gz")  # FileSystems.open decompresses .gz by itself
    if base.endswith(".jsonl"):
        # split("\n"), not splitlines(): a JSON string may hold U+2028 and friends, which splitlines() breaks on.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            location = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield location, _malformed(location, f"not valid JSON ({error.msg})", line)
                continue
            if not isinstance(row, dict):
                yield location, _malformed(location, f"expected a JSON object, got {type(row).__name__}", line)
                continue
            yield location, row
    elif base.endswith(".csv"):
        # csv.reader, not DictReader: DictReader skips blank lines silently, which would misnumber the rows.
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            raise TaskSpecError(f"{path}: empty seed file (expected a header row naming {text_field!r} and "
                                f"{label_field!r})")
        for column in (text_field, label_field):
            if column not in header:
                raise TaskSpecError(f"{path}: no column {column!r} (columns: {', '.join(header)}); "
                                    "set seed_examples.text_field / label_field in the task spec")
        while True:
            location = f"{path} line {reader.line_num + 1}"
            row = next(reader, None)
            if row is None:
                return
            if not row:
                continue
            if len(row) != len(header):
                # Usually an unquoted comma inside the text: the columns have shifted, so no field can be trusted.
                yield location, _malformed(location, f"{len(row)} columns where the header has {len(header)}",
                                           json.dumps(row, ensure_ascii=False))
                continue
            yield location, dict(zip(header, row, strict=True))
    else:
        raise TaskSpecError(f"{path}: unknown seed file format (use .csv or .jsonl, optionally .gz)")


def _label_value(value: Any) -> str | None:
    """Labels compare as strings, so a JSONL label 1 matches a spec label "1"; None when absent or blank."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value).strip() or None


def _check_seed_row(
    location: str, row: Mapping[str, Any], text_field: str, label_field: str, labels: tuple[str, ...]
) -> tuple[str, str] | RejectedSeed:
    """(text, label) of a usable seed row, else the RejectedSeed naming the field that is wrong."""
    payload = json.dumps({"source": location, "row": row}, ensure_ascii=False, default=str, sort_keys=True)
    text = row.get(text_field)
    if text is not None and not isinstance(text, str):
        return RejectedSeed("malformed_row", location,
                            f"{location}: field {text_field!r} is {type(text).__name__}, expected a string", payload)
    if text is None or not normalize(text):
        return RejectedSeed("empty_text", location, f"{location}: field {text_field!r} is missing or has no words",
                            payload)
    label = _label_value(row.get(label_field))
    if label is None:
        return RejectedSeed("missing_label", location, f"{location}: field {label_field!r} is missing or empty",
                            payload)
    if label not in labels:
        return RejectedSeed("unknown_label", location, f"{location}: field {label_field!r}: label {label!r} is not "
                            f"one of the task's labels ({', '.join(labels)})", payload)
    return text.strip(), label


def _field_name(mapping: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = mapping.get(key, default)
    if not isinstance(value, str) or not value:
        raise TaskSpecError(f"{where}: {key!r} must be a non-empty column name, got {value!r}")
    return value


def _resolve(spec_path: str, seed_path: str) -> str:
    """A relative seed path is relative to the spec file, wherever the pipeline runs from (local or gs://)."""
    if "://" in seed_path or posixpath.isabs(seed_path):
        return seed_path
    return FileSystems.join(FileSystems.split(spec_path)[0], seed_path)


def _seed_sources(document: Mapping[str, Any], path: str) -> Iterator[tuple[str, Any, str, str]]:
    """(location, row or RejectedSeed, text field, label field) for every seed row: inline examples, then the file."""
    inline = document.get("examples")
    if inline is not None:
        if not isinstance(inline, list):
            raise TaskSpecError(f"{path}: 'examples' must be a list of {{text, label}}, got {type(inline).__name__}")
        for index, item in enumerate(inline):
            location = f"{path} examples[{index}]"
            if not isinstance(item, Mapping):
                item = _malformed(location, f"expected a mapping with text and label, got {type(item).__name__}",
                                  json.dumps(item, ensure_ascii=False, default=str))
            yield location, item, "text", "label"
    seed_file = document.get("seed_examples")
    if seed_file is None:
        return
    where = f"{path}: seed_examples"
    if isinstance(seed_file, str):
        seed_file = {"path": seed_file}
    seed_file = _check_keys(seed_file, _SEED_FILE_KEYS, where)
    seed_path = _resolve(path, _required_text(seed_file, "path", where))
    text_field = _field_name(seed_file, "text_field", "text", where)
    label_field = _field_name(seed_file, "label_field", "label", where)
    for location, row in _read_seed_file(seed_path, text_field, label_field):
        yield location, row, text_field, label_field


def load_task_spec(path: str) -> TaskSpec:
    """Read and check a task spec (YAML or JSON) and its seed rows; see the module docstring for the format.

    Raises TaskSpecError for a spec that cannot be used; seed rows that cannot be used are returned in
    `rejected_seeds` instead.
    """
    text = _read_text(path, "task spec")
    lowered = path.lower()
    try:
        if lowered.endswith((".yaml", ".yml")):
            document = yaml.safe_load(text)
        elif lowered.endswith(".json"):
            document = json.loads(text)
        else:
            raise TaskSpecError(f"{path}: unknown task spec format (use .yaml, .yml or .json)")
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise TaskSpecError(f"{path}: not valid {'JSON' if lowered.endswith('.json') else 'YAML'}: {error}") from error
    document = _check_keys(document, _SPEC_KEYS, path)
    name = _required_text(document, "name", path)
    description = _required_text(document, "description", path)
    if "labels" not in document:
        raise TaskSpecError(f"{path}: missing 'labels' (a list of {{name, description}}, at least 2)")
    labels = _parse_labels(document["labels"], path)
    names = tuple(label.name for label in labels)

    seeds: list[SeedExample] = []
    rejected: list[RejectedSeed] = []
    first_seen: dict[tuple[str, ...], str] = {}
    for location, row, text_field, label_field in _seed_sources(document, path):
        checked = row if isinstance(row, RejectedSeed) else _check_seed_row(
            location, row, text_field, label_field, names)
        if isinstance(checked, RejectedSeed):
            rejected.append(checked)
            continue
        seed_text, label = checked
        words = tuple(normalize(seed_text))
        if words in first_seen:
            payload = json.dumps({"source": location, "row": row}, ensure_ascii=False, default=str, sort_keys=True)
            rejected.append(RejectedSeed("duplicate_seed", location,
                                         f"{location}: the same text as {first_seen[words]}", payload))
            continue
        first_seen[words] = location
        seeds.append(SeedExample(example_id(name, "seed", seed_text, 0), seed_text, label, location))
    if rejected and not seeds:
        raise TaskSpecError(f"{path}: all {len(rejected)} seed rows are unusable (first: {rejected[0].detail}); "
                            "check the seed file's text_field / label_field and the label names")
    return TaskSpec(name, description, labels, tuple(seeds), tuple(rejected), path)


# --- Configuration and plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateCounterfactualsConfig:
    #: The task spec file (YAML or JSON; local path or gs://). Required.
    task_spec: str = ""
    #: New examples per label (0: none). A target, not a promise: rejected examples are not replaced.
    examples_per_label: int = 8
    #: New examples asked for in one request; a label needing more gets several requests, each shown other seeds.
    examples_per_request: int = 8
    #: Label-flipping edits per seed, each toward a different target label (at most the number of other labels).
    counterfactuals_per_seed: int = 1
    #: Seeds per label that get counterfactuals (None: all): caps the cost at about
    #: labels x max_seeds_per_label x counterfactuals_per_seed calls however large the seed file is.
    max_seeds_per_label: int | None = 16
    #: Seeds of the label shown in each example-generation prompt: enough to convey style and length, few enough
    #: that the model is not tempted to paraphrase them.
    seeds_per_prompt: int = 3
    #: Also emit the seed rows themselves (origin "seed"); off, they are counted as skipped.
    include_seed_examples: bool = True
    #: A counterfactual whose word-level edit distance to its seed exceeds this share of the longer text is a rewrite,
    #: not a minimal edit. 0.6: the prompt's own demonstration changes 6 of 14 words (0.43) and is the most an edit
    #: should need; above 0.6 most words changed and the pair no longer isolates what decides the label.
    max_edit_ratio: float = 0.6
    #: Sampling temperature for new examples (each request gets its own sampling seed, so chunks of one label differ).
    #: Counterfactuals always use 0: a minimal edit has one best answer.
    temperature: float = 0.7
    #: Output tokens allowed per requested text: room for a paragraph plus JSON quoting. A cut-off answer fails to
    #: parse and is lost as llm_failed, while unused allowance costs nothing, so it errs on the generous side.
    max_output_tokens_per_example: int = 192
    #: Run seed for every deterministic choice (few-shot seeds, capped seeds, sampling seeds).
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.task_spec:
            raise ValueError("task_spec: the path of the task spec file is required")
        for name in ("examples_per_label", "counterfactuals_per_seed", "seeds_per_prompt"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.examples_per_request <= MAX_EXAMPLES:
            raise ValueError(f"examples_per_request must be in 1..{MAX_EXAMPLES} (the example_generation prompt's "
                             f"limit), got {self.examples_per_request}")
        if self.max_seeds_per_label is not None and self.max_seeds_per_label < 0:
            raise ValueError(f"max_seeds_per_label must be >= 0 or null, got {self.max_seeds_per_label}")
        if not 0 < self.max_edit_ratio <= 1:
            raise ValueError(f"max_edit_ratio must be in (0, 1], got {self.max_edit_ratio}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_output_tokens_per_example < 1:
            raise ValueError(f"max_output_tokens_per_example must be >= 1, got {self.max_output_tokens_per_example}")


@dataclass(frozen=True)
class GenerationUnit:
    """One LLM request of the plan: new examples for a label, or one counterfactual of one seed."""

    kind: Literal["generated", "counterfactual"]
    #: The label to write examples of ("generated") or the seed's own label ("counterfactual").
    label: str
    #: Request number within the label ("generated") or counterfactual slot of the seed ("counterfactual").
    index: int
    #: Examples asked for (always 1 for a counterfactual).
    count: int = 1
    seed_id: str | None = None
    target: str | None = None

    @property
    def request_id(self) -> str:
        if self.kind == "generated":
            return f"generated/{self.label}/{self.index}"
        return f"counterfactual/{self.seed_id}/{self.target}"


def counterfactual_seeds(spec: TaskSpec, config: GenerateCounterfactualsConfig) -> dict[str, list[SeedExample]]:
    """Label -> the seeds that get counterfactuals, at most `max_seeds_per_label`, in a run-seeded order.

    Ranking by a hash of (run seed, seed id) is a random sample that stays put when seeds are added: a new seed
    displaces at most one chosen seed, so a grown seed file re-uses almost every cached answer.
    """
    chosen = {}
    for label in spec.label_names:
        ranked = sorted(spec.seeds_of(label), key=lambda seed: stable_hash(config.seed, seed.seed_id))
        chosen[label] = ranked if config.max_seeds_per_label is None else ranked[: config.max_seeds_per_label]
    return chosen


def target_labels(spec: TaskSpec, seed: SeedExample, config: GenerateCounterfactualsConfig) -> tuple[str, ...]:
    """Target labels for a seed's counterfactuals: the other labels in spec order, rotated by a hashed offset.

    The offset comes from (run seed, seed id), so a label's counterfactuals spread evenly over the other labels in
    expectation (each label pair gets its contrast examples) and a seed keeps its targets, and its cached answers,
    when other seeds are added. "Most confusable" targets would need embeddings this stage does not have and would
    skew the label mix. Each target at most once per seed: two edits toward one label would be near-duplicates.
    """
    others = [name for name in spec.label_names if name != seed.label]
    offset = stable_hash(config.seed, seed.seed_id, "target") % len(others)
    count = min(config.counterfactuals_per_seed, len(others))
    return tuple(others[(offset + slot) % len(others)] for slot in range(count))


def plan_units(spec: TaskSpec, config: GenerateCounterfactualsConfig) -> list[GenerationUnit]:
    """Every LLM request of the stage, in a deterministic order: example chunks per label, then counterfactuals."""
    units = []
    for label in spec.label_names:
        remaining, index = config.examples_per_label, 0
        while remaining > 0:
            count = min(remaining, config.examples_per_request)
            units.append(GenerationUnit("generated", label, index, count))
            remaining -= count
            index += 1
    for label, seeds in counterfactual_seeds(spec, config).items():
        for seed in seeds:
            for slot, target in enumerate(target_labels(spec, seed, config)):
                units.append(GenerationUnit("counterfactual", label, slot, 1, seed.seed_id, target))
    return units


def few_shot_seeds(spec: TaskSpec, unit: GenerationUnit, config: GenerateCounterfactualsConfig) -> tuple[str, ...]:
    """The seed texts shown when asking for new examples: a sample of the label's seeds, different per request."""
    pool = spec.seeds_of(unit.label)
    size = min(config.seeds_per_prompt, len(pool))
    rng = np.random.default_rng(stable_hash(config.seed, spec.name, unit.request_id))
    return tuple(pool[index].text for index in sorted(rng.choice(len(pool), size=size, replace=False)))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def demonstration_texts(prompt: PromptSpec, fields: Mapping[str, Any]) -> tuple[str, ...]:
    """Every data text the prompt's own few-shot demonstrations show for `fields`: their inputs and their answers."""
    texts: list[str] = []
    for example in prompt.select_examples(**fields):
        texts += [text for name, value in example.inputs if name in prompt.data_fields for text in _strings(value)]
        texts += list(_strings(json.loads(example.answer)))
    return tuple(texts)


def build_request(unit: GenerationUnit, spec: TaskSpec, config: GenerateCounterfactualsConfig) -> LLMRequest:
    """The LLM request for one unit; its context carries the unit, the seed and every text the prompt showed."""
    if unit.kind == "generated":
        prompt = get_prompt(EXAMPLES_PROMPT)
        label = spec.label(unit.label)
        shown = few_shot_seeds(spec, unit, config)
        fields: dict[str, Any] = {"task_description": spec.description, "label": label.name,
                                  "label_description": label.description, "seed_examples": shown,
                                  "count": unit.count}
        sampling_seed = stable_hash(config.seed, unit.request_id) % 2**31 if config.temperature > 0 else None
        generation = GenerationConfig(temperature=config.temperature, seed=sampling_seed,
                                      max_output_tokens=unit.count * config.max_output_tokens_per_example)
        seed = None
    else:
        prompt = get_prompt(COUNTERFACTUAL_PROMPT)
        seed = next(candidate for candidate in spec.seeds if candidate.seed_id == unit.seed_id)
        source, target = spec.label(seed.label), spec.label(unit.target or "")
        fields = {"task_description": spec.description, "text": seed.text, "label": source.name,
                  "label_description": source.description, "target_label": target.name,
                  "target_label_description": target.description}
        shown = ()
        generation = GenerationConfig(temperature=0.0, max_output_tokens=config.max_output_tokens_per_example)
    return LLMRequest(
        request_id=unit.request_id,
        prompt_name=prompt.name,
        prompt_version=prompt.version,
        messages=prompt.render(**fields),
        output_model=prompt.output_model,
        config=generation,
        context={"unit": unit, "seed": seed, "shown": (*shown, *demonstration_texts(prompt, fields))},
    )


# --- Judging answers (pure) -------------------------------------------------------------------------------------------


def text_key(text: str) -> str:
    """The form texts are compared in: lowercase words, punctuation and spacing ignored."""
    return " ".join(normalize(text))


def word_edit_distance(source: list[str], edited: list[str]) -> int:
    """Levenshtein distance over words (insert, delete, substitute one word)."""
    previous = list(range(len(edited) + 1))
    for i, source_word in enumerate(source, start=1):
        current = [i] + [0] * len(edited)
        for j, edited_word in enumerate(edited, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (source_word != edited_word))
        previous = current
    return previous[-1]


def edit_ratio(source: str, edited: str) -> float:
    """Word edit distance over the longer text's length: 0 identical, 1 nothing in common."""
    source_words, edited_words = normalize(source), normalize(edited)
    longest = max(len(source_words), len(edited_words))
    return word_edit_distance(source_words, edited_words) / longest if longest else 0.0


def classification_row(
    spec: TaskSpec,
    *,
    row_id: str,
    text: str,
    label: str,
    origin: str,
    counterfactual_of: str | None = None,
    original_label: str | None = None,
    llm_model: str | None = None,
    prompt_version: str | None = None,
) -> dict[str, Any]:
    """A CLASSIFICATION_EXAMPLE row. For a counterfactual the original label leads the negatives: it is the one the
    text was a minimal edit away from, the hardest negative there is."""
    others = [name for name in spec.label_names if name != label]
    if original_label in others:
        others.remove(original_label)
        others.insert(0, original_label)
    return {
        "example_id": row_id,
        "task_name": spec.name,
        "text": text,
        "label": label,
        "label_description": spec.label(label).description,
        "negative_labels": others,
        "origin": origin,
        "counterfactual_of": counterfactual_of,
        "original_label": original_label,
        "llm_model": llm_model,
        "prompt_version": prompt_version,
    }


def seed_text_index(spec: TaskSpec) -> dict[str, SeedExample]:
    """text_key -> seed, for the duplicate-of-a-seed check."""
    return {text_key(seed.text): seed for seed in spec.seeds}


def seed_outcomes(spec: TaskSpec, config: GenerateCounterfactualsConfig) -> list[tuple[str, dict[str, Any] | None]]:
    """("kept", row), ("skipped", None) or ("rejected", REJECTED row) for every seed row the spec read."""
    outcomes: list[tuple[str, dict[str, Any] | None]] = []
    for seed in spec.seeds:
        if config.include_seed_examples:
            outcomes.append(("kept", classification_row(spec, row_id=seed.seed_id, text=seed.text, label=seed.label,
                                                        origin="seed")))
        else:
            outcomes.append(("skipped", None))
    for bad in spec.rejected_seeds:
        outcomes.append(("rejected", rejected_row(STAGE, bad.reason, bad.payload, record_id=bad.location,
                                                  detail=bad.detail)))
    return outcomes


def judge_answer(
    answer: LLMAnswer,
    spec: TaskSpec,
    config: GenerateCounterfactualsConfig,
    llm_model: str,
    seeds_by_text: Mapping[str, SeedExample],
) -> list[tuple[str, dict[str, Any]]]:
    """One answer -> ("candidate", {"row", "raw"}) per text that passed, ("rejected", REJECTED row) per other outcome.

    A failed answer gives exactly one rejected row; a good one gives one outcome per text it lists. Candidates still
    face the run-wide duplicate check (`resolve_duplicates`).
    """
    unit: GenerationUnit = answer.request.context["unit"]
    request_id = answer.request.request_id
    if not answer.ok or answer.value is None:
        payload = {"request_id": request_id, "kind": unit.kind, "label": unit.label, "count": unit.count,
                   "seed_id": unit.seed_id, "target_label": unit.target}
        reason = failure_reason(answer, "llm_failed")
        return [("rejected", rejected_row(STAGE, reason, payload, record_id=request_id, raw_answer=answer.raw,
                                          detail=answer.error))]
    prompt_version = f"{answer.request.prompt_name}@{answer.request.prompt_version}"
    shown = {text_key(text) for text in answer.request.context["shown"]}
    seed: SeedExample | None = answer.request.context["seed"]
    if unit.kind == "generated":
        texts = list(answer.value["examples"])
    else:
        texts = [answer.value["text"]]
    outcomes: list[tuple[str, dict[str, Any]]] = []
    for index, text in enumerate(texts):
        if seed is None:
            row = classification_row(spec, row_id=example_id(spec.name, "generated", request_id, index), text=text,
                                     label=unit.label, origin="generated", llm_model=llm_model,
                                     prompt_version=prompt_version)
        else:
            row = classification_row(spec, row_id=example_id(spec.name, "counterfactual", seed.seed_id, unit.target),
                                     text=text, label=unit.target or "", origin="counterfactual",
                                     counterfactual_of=seed.seed_id, original_label=seed.label, llm_model=llm_model,
                                     prompt_version=prompt_version)
        key = text_key(text)
        reason, detail = None, None
        if index >= unit.count:
            reason, detail = "surplus", f"text {index + 1} of an answer that was asked for {unit.count}"
        elif not key:
            reason, detail = "empty_text", "the text has no words"
        elif seed is not None and key == text_key(seed.text):
            reason, detail = "unchanged", "the counterfactual is the seed text itself"
        elif key in shown:
            reason, detail = "copies_example", "the text repeats an example the prompt showed"
        elif key in seeds_by_text:
            twin = seeds_by_text[key]
            reason = "duplicate"
            detail = f"the text repeats seed {twin.seed_id} ({twin.location}, label {twin.label!r})"
        elif seed is not None:
            ratio = edit_ratio(seed.text, text)
            if ratio > config.max_edit_ratio:
                reason, detail = "not_minimal", (f"word edit ratio {ratio:.2f} to seed {seed.seed_id} is above "
                                                 f"max_edit_ratio {config.max_edit_ratio}")
        if reason is None:
            outcomes.append(("candidate", {"row": row, "raw": answer.raw}))
        else:
            outcomes.append(("rejected", rejected_row(STAGE, reason, row, record_id=row["example_id"],
                                                      raw_answer=answer.raw, detail=detail)))
    return outcomes


def resolve_duplicates(candidates: Iterable[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Candidates sharing one text_key -> ("kept", row) for one of them and ("rejected", row) for the others.

    The kept copy is the first by (origin in ORIGINS order, example_id), so the choice does not depend on arrival
    order. Copies carrying different labels are all rejected: the text is ambiguous for this task.
    """
    ordered = sorted(candidates, key=lambda item: (ORIGINS.index(item["row"]["origin"]), item["row"]["example_id"]))
    labels = sorted({item["row"]["label"] for item in ordered})
    outcomes: list[tuple[str, dict[str, Any]]] = []
    for position, item in enumerate(ordered):
        row = item["row"]
        if len(labels) > 1:
            outcomes.append(("rejected", rejected_row(
                STAGE, "conflicting_labels", row, record_id=row["example_id"], raw_answer=item["raw"],
                detail=f"the same text was generated for labels {', '.join(repr(label) for label in labels)}")))
        elif position == 0:
            outcomes.append(("kept", row))
        else:
            outcomes.append(("rejected", rejected_row(
                STAGE, "duplicate", row, record_id=row["example_id"], raw_answer=item["raw"],
                detail=f"the same text as {ordered[0]['row']['example_id']} ({ordered[0]['row']['origin']})")))
    return outcomes


# --- Beam ------------------------------------------------------------------------------------------------------------

TALLIES = "tallies"
REJECTED = "rejected"


def _tally(name: str, count: int = 1) -> beam.pvalue.TaggedOutput:
    return beam.pvalue.TaggedOutput(TALLIES, (("stage", STAGE, name), count))


class _SeedFn(beam.DoFn):
    def __init__(self):
        self._counters = StageCounters(STAGE)

    def process(self, outcome: tuple[str, dict[str, Any] | None]):
        kind, row = outcome
        self._counters.input.inc()
        yield _tally("input")
        if kind == "kept":
            self._counters.kept.inc()
            yield _tally("kept")
            yield row
        elif kind == "skipped":
            yield _tally("skipped")
        else:
            assert row is not None
            self._counters.reject(row["reason"])
            yield beam.pvalue.TaggedOutput(REJECTED, row)


class _JudgeFn(beam.DoFn):
    def __init__(self, spec: TaskSpec, config: GenerateCounterfactualsConfig, llm_model: str):
        self._spec = spec
        self._config = config
        self._llm_model = llm_model
        self._counters = StageCounters(STAGE)
        self._seeds_by_text: dict[str, SeedExample] = {}

    def setup(self) -> None:
        self._seeds_by_text = seed_text_index(self._spec)

    def process(self, answer: LLMAnswer):
        outcomes = judge_answer(answer, self._spec, self._config, self._llm_model, self._seeds_by_text)
        self._counters.input.inc()
        yield _tally("input")
        # One unit, len(outcomes) rows: the rows beyond the first are the fan-out the manifest calls "expanded".
        if len(outcomes) > 1:
            yield _tally("expanded", len(outcomes) - 1)
        for kind, row in outcomes:
            if kind == "candidate":
                yield text_key(row["row"]["text"]), row
            else:
                self._counters.reject(row["reason"])
                yield beam.pvalue.TaggedOutput(REJECTED, row)


class _ResolveFn(beam.DoFn):
    def __init__(self):
        self._counters = StageCounters(STAGE)

    def process(self, element):
        _, candidates = element
        for kind, row in resolve_duplicates(candidates):
            if kind == "kept":
                self._counters.kept.inc()
                yield _tally("kept")
                yield row
            else:
                self._counters.reject(row["reason"])
                yield beam.pvalue.TaggedOutput(REJECTED, row)


class GenerateCounterfactuals(beam.PTransform):
    """Root transform: task spec -> {"kept": CLASSIFICATION_EXAMPLE rows, "rejected": REJECTED rows,
    "tallies": (("stage", STAGE, field), count) summed per field, "answers": LLMAnswer (for usage accounting)}.

    Apply it to the pipeline (`pipeline | GenerateCounterfactuals(...)`). The spec is read when the pipeline is built,
    so a broken spec fails before any work; it travels inside the graph, which suits seed sets (hundreds to a few
    thousand rows), not whole labelled corpora.
    """

    def __init__(self, config: GenerateCounterfactualsConfig, llm: LLMSpec, cache_dir: str | None = None,
                 budget: RunBudget | None = None):
        super().__init__()
        self._config = config
        self._llm = llm
        self._cache_dir = cache_dir
        self._budget = budget

    def expand(self, pbegin):
        spec = load_task_spec(self._config.task_spec)
        seeds = (
            pbegin
            | "SeedRows" >> beam.Create(seed_outcomes(spec, self._config))
            | "Seeds" >> beam.ParDo(_SeedFn()).with_outputs(REJECTED, TALLIES, main="kept")
        )
        answers = (
            pbegin
            | "Units" >> beam.Create(plan_units(spec, self._config))
            | "Requests" >> beam.Map(build_request, spec, self._config)
            | "CallLLM" >> CallLLM(self._llm, STAGE, self._cache_dir, self._budget)
        )
        judged = answers | "Judge" >> beam.ParDo(
            _JudgeFn(spec, self._config, self._llm.model_name)).with_outputs(REJECTED, TALLIES, main="candidates")
        # Duplicates across requests and labels: one group per normalized text, decided in one place.
        resolved = (
            judged["candidates"]
            | "ByText" >> beam.GroupByKey()
            | "Resolve" >> beam.ParDo(_ResolveFn()).with_outputs(REJECTED, TALLIES, main="kept")
        )
        kept = (seeds["kept"], resolved["kept"]) | "Kept" >> beam.Flatten()
        rejected = (seeds[REJECTED], judged[REJECTED], resolved[REJECTED]) | "Rejected" >> beam.Flatten()
        tallies = (
            (seeds[TALLIES], judged[TALLIES], resolved[TALLIES])
            | "AllTallies" >> beam.Flatten()
            | "SumTallies" >> beam.CombinePerKey(sum)
        )
        return {"kept": kept, "rejected": rejected, "tallies": tallies, "answers": answers}
