"""Validation of rows and Arrow tables against an embforge schema, with errors that name source, row and column."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

SCHEMA_NAME_KEY = b"embforge.schema"
SCHEMA_VERSION_KEY = b"embforge.schema_version"


class SchemaError(ValueError):
    """A record does not match its schema. The message names the source, the row, the column and what was expected."""

    def __init__(self, message: str, *, source: str, row: int | None = None, column: str | None = None):
        where = source
        if row is not None:
            where += f" row {row}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {message}")
        self.source = source
        self.row = row
        self.column = column


def versioned(name: str, version: int, fields: list[pa.Field]) -> pa.Schema:
    """A schema stamped with its record kind and version, so a reader can refuse shards of another version."""
    return pa.schema(fields, metadata={SCHEMA_NAME_KEY: name.encode(), SCHEMA_VERSION_KEY: str(version).encode()})


def schema_id(schema: pa.Schema) -> str:
    meta = schema.metadata or {}
    return f"{meta.get(SCHEMA_NAME_KEY, b'?').decode()} v{meta.get(SCHEMA_VERSION_KEY, b'?').decode()}"


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _check_value(value: Any, dtype: pa.DataType, nullable: bool, path: str) -> str | None:
    """Return why `value` does not fit `dtype`, or None when it fits. `path` names nested positions."""
    if value is None:
        return None if nullable else f"{path}: null in a non-nullable column (expected {dtype})"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        ok = isinstance(value, str)
    elif pa.types.is_boolean(dtype):
        ok = isinstance(value, bool)
    elif pa.types.is_integer(dtype):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif pa.types.is_floating(dtype):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and math.isnan(float(value)):
            return f"{path}: NaN is not a valid {dtype}"
    elif pa.types.is_timestamp(dtype):
        import datetime

        ok = isinstance(value, datetime.datetime)
    elif pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            return f"{path}: expected {dtype}, got {_describe(value)}"
        items = list(value)
        if pa.types.is_fixed_size_list(dtype) and len(items) != dtype.list_size:
            return f"{path}: expected {dtype.list_size} items, got {len(items)}"
        item_field = dtype.value_field
        for index, item in enumerate(items):
            reason = _check_value(item, item_field.type, item_field.nullable, f"{path}[{index}]")
            if reason:
                return reason
        return None
    elif pa.types.is_map(dtype):
        if not isinstance(value, Mapping):
            return f"{path}: expected {dtype}, got {_describe(value)}"
        for key, item in value.items():
            reason = _check_value(key, dtype.key_type, False, f"{path} key") or _check_value(
                item, dtype.item_type, dtype.item_field.nullable, f"{path}[{key!r}]"
            )
            if reason:
                return reason
        return None
    elif pa.types.is_struct(dtype):
        if not isinstance(value, Mapping):
            return f"{path}: expected {dtype}, got {_describe(value)}"
        for child in dtype:
            reason = _check_value(value.get(child.name), child.type, child.nullable, f"{path}.{child.name}")
            if reason:
                return reason
        return None
    else:
        raise TypeError(f"validator does not know Arrow type {dtype}")
    return None if ok else f"{path}: expected {dtype}, got {_describe(value)}"


def validate_rows(rows: Iterable[Mapping[str, Any]], schema: pa.Schema, *, source: str = "<rows>") -> None:
    """Check python rows (dicts) against `schema`: every column present, no extra column, every value of its type."""
    expected = set(schema.names)
    for row_index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise SchemaError(f"expected a record (mapping), got {_describe(row)}", source=source, row=row_index)
        missing = [name for name in schema.names if name not in row]
        if missing:
            raise SchemaError(f"missing (expected {schema.field(missing[0]).type})", source=source, row=row_index,
                              column=missing[0])
        extra = sorted(set(row) - expected)
        if extra:
            raise SchemaError(f"unexpected column for {schema_id(schema)}", source=source, row=row_index,
                              column=extra[0])
        for schema_field in schema:
            reason = _check_value(row[schema_field.name], schema_field.type, schema_field.nullable, "value")
            if reason:
                raise SchemaError(reason, source=source, row=row_index, column=schema_field.name)


def validate_table(table: pa.Table, schema: pa.Schema, *, source: str = "<table>") -> pa.Table:
    """Check an Arrow table against `schema` and return it cast to the schema (column order and metadata included).

    Column-level type mismatches are reported with the first row whose value cannot be cast; nulls in non-nullable
    columns with the first null row. Shards written by another schema version are refused.
    """
    table_meta = table.schema.metadata or {}
    if SCHEMA_NAME_KEY in table_meta:
        for key in (SCHEMA_NAME_KEY, SCHEMA_VERSION_KEY):
            if table_meta.get(key) != schema.metadata[key]:
                raise SchemaError(f"written as {schema_id(table.schema)}, expected {schema_id(schema)}", source=source)
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise SchemaError(f"missing (expected {schema.field(missing[0]).type})", source=source, column=missing[0])
    extra = [name for name in table.column_names if name not in schema.names]
    if extra:
        raise SchemaError(f"unexpected column for {schema_id(schema)}", source=source, column=extra[0])
    columns = []
    for schema_field in schema:
        column = table.column(schema_field.name)
        if not column.type.equals(schema_field.type):
            try:
                column = column.cast(schema_field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                # Find the first offending row so the message points at data, not just a type.
                values = column.to_pylist()
                for row_index, value in enumerate(values):
                    if _check_value(value, schema_field.type, True, "value"):
                        raise SchemaError(
                            f"expected {schema_field.type}, got {_describe(value)}", source=source, row=row_index,
                            column=schema_field.name,
                        ) from None
                raise SchemaError(f"expected {schema_field.type}, got {column.type}", source=source,
                                  column=schema_field.name) from None
        if not schema_field.nullable and column.null_count:
            first_null = column.is_null().to_pylist().index(True)
            raise SchemaError(f"null in a non-nullable column (expected {schema_field.type})", source=source,
                              row=first_null, column=schema_field.name)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)
