"""Build frozen config dataclasses from TOML / YAML files plus `section.key=value` overrides.

Every problem (unknown key, wrong type, impossible value) is found before any work starts and reported as one
`ConfigError` naming the file and the dotted key, e.g. `run.toml: generate.mining.k: must be >= 1, got 0`.
Dataclasses validate their own values in `__post_init__` by raising `ValueError`; the loader adds where.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, found before any work starts."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a .toml, .yaml/.yml or .json file into a dict; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file ({error.strerror})") from error
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format (use .toml, .yaml, .yml or .json)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of sections, got {type(data).__name__}")
    return data


#: A number in exponent notation, as a command line writes a learning rate (5e-5, 1E3, .5e-2).
_EXPONENT_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML: numbers, booleans, lists) to a nested dict copy."""
    result = json.loads(json.dumps(data))
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: cannot parse value: {error}") from error
        if isinstance(value, str) and _EXPONENT_NUMBER.match(value):
            # YAML 1.1 (PyYAML) reads 5e-5 as a string: its floats need a dot and a signed exponent (5.0e-5).
            value = float(value)
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert one value to its annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _convert(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {value!r} fits none of {_type_name(annotation)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a section (table), got {value!r}")
        return build_config(annotation, value, where)
    if origin in (tuple, list, Sequence) or annotation in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_convert(item, item_type, f"{where}[{index}]") for index, item in enumerate(value))
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {str(key): _convert(item, value_type, f"{where}.{key}") for key, item in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(annotation)}")


def build_config(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys; `where` prefixes every message (file or section)."""
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    values = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {error}") from error


def config_to_dict(config: Any) -> Any:
    """A JSON-ready dict of a config (for the manifest and model cards)."""
    if dataclasses.is_dataclass(config):
        return {field.name: config_to_dict(getattr(config, field.name)) for field in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(item) for item in config]
    if isinstance(config, Mapping):
        return {key: config_to_dict(item) for key, item in config.items()}
    return config
