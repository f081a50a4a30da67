"""The task spec of GenerateCounterfactuals: labels with descriptions and seed examples, read as the pipeline is built.

A task spec is a YAML or JSON file, read through Beam filesystems (so `gs://` works):

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
and the field. A problem of one seed row is data, not a broken spec: it comes back in `TaskSpec.rejected_seeds`
(reason `malformed_row`, `empty_text`, `missing_label`, `unknown_label` or `duplicate_seed`, with a `detail` naming
the file, line and field), and the stage turns it into a rejected row, so nothing is silently dropped and the rest of
the seeds still work.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from apache_beam.io.filesystems import FileSystems

from pipelines.config_loading import ConfigError
from pipelines.json_lines import parse_json_lines
from pipelines.text_matching import normalize

_SPEC_KEYS = ("name", "description", "labels", "seed_examples", "examples")
_LABEL_KEYS = ("name", "description")
_SEED_FILE_KEYS = ("path", "text_field", "label_field")


class TaskSpecError(ConfigError):
    """The task spec cannot be used as given; the message names the file and the field. Raised while the pipeline is
    built, before any work."""


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


def _read_bytes(path: str, what: str) -> bytes:
    try:
        with FileSystems.open(path) as handle:
            return handle.read()
    except Exception as error:  # Beam wraps every filesystem's own error type; any of them means "cannot read"
        raise TaskSpecError(f"{path}: cannot read the {what} ({error})") from error


def _read_text(path: str, what: str) -> str:
    data = _read_bytes(path, what)
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
    base = path.lower().removesuffix(".gz")  # FileSystems.open decompresses .gz by itself
    if base.endswith(".jsonl"):
        # A seed file travels inside the pipeline graph, so it is small: read whole, then line by line.
        for line in parse_json_lines(_read_bytes(path, "seed file")):
            location = f"{path} line {line.number}"
            if line.problem is None:
                yield location, line.value
            else:
                yield location, _malformed(location, line.detail, line.text)
    elif base.endswith(".csv"):
        # csv.reader, not DictReader: DictReader skips blank lines silently, which would misnumber the rows.
        reader = csv.reader(io.StringIO(_read_text(path, "seed file"), newline=""))
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
