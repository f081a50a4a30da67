"""The offline default corpus: passages from the Python standard library's own documentation (its docstrings).

It exists so a fresh machine with no network and no data can run the whole pipeline: every Python ships these texts.
One passage per documented module, class, function and method of a fixed list of modules, id and title the dotted
name (`json.dumps`), text the docstring cleaned by `inspect.cleandoc`.

Deterministic for one Python version: modules in the fixed order below, members sorted by name, the first of
identical texts kept. Docstrings change slightly between Python versions (and a module missing from a stripped-down
build is skipped), so the corpus of Python 3.11 is not byte-identical to that of 3.12; compare runs on one version.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from collections.abc import Iterator
from typing import Any

from apache_beam.io.filesystems import FileSystems

LOGGER = logging.getLogger(__name__)

#: The modules read, in this order. Widely used, mostly pure-Python modules whose docstrings are real prose;
#: changing the list changes the corpus (and so every cache key downstream), so append rather than reorder.
STDLIB_MODULES: tuple[str, ...] = (
    "json", "csv", "pathlib", "itertools", "functools", "collections", "datetime", "re", "argparse", "logging",
    "subprocess", "sqlite3", "statistics", "textwrap", "unittest", "urllib.parse", "zipfile", "heapq", "bisect",
    "string", "shutil", "tempfile", "random", "decimal", "fractions", "typing", "dataclasses", "enum", "contextlib",
    "inspect", "io", "difflib", "fnmatch", "glob", "gzip", "tarfile", "uuid", "calendar", "copy", "pprint",
    "operator", "threading", "queue", "email.message", "http.client", "xml.etree.ElementTree", "configparser",
    "ipaddress", "secrets", "base64", "hashlib",
)

#: Docstrings shorter than this are one-liners ("Return the square root of x.") that give a query generator
#: nothing to ask about.
MIN_WORDS = 20


def _belongs_to(member: Any, module_name: str) -> bool:
    """True when `member` is defined by `module_name` or its private C twin (`heapq.heappush` lives in `_heapq`).

    Re-exports from other modules (`subprocess.signal`, `typing.re`) are skipped: they are documented where defined.
    """
    owner = getattr(member, "__module__", None)
    if not isinstance(owner, str):
        return False
    owner = owner.lstrip("_")
    root = module_name.split(".")[0]
    return owner == module_name or owner.startswith(module_name + ".") or owner in (root, f"{root}.{root}")


def _docstring(member: Any) -> str | None:
    """The member's own docstring, cleaned. Read from `__doc__`, never `inspect.getdoc`, which would return a base
    class's docstring for an undocumented override and so repeat it once per subclass."""
    if isinstance(member, (classmethod, staticmethod)):
        member = member.__func__
    doc = getattr(member, "__doc__", None)
    return inspect.cleandoc(doc).strip() if isinstance(doc, str) else None


def _is_documentable_attribute(attribute: Any) -> bool:
    # Data attributes (ints, strings, enum members) carry their *type's* docstring, so only callables and properties.
    return inspect.isroutine(attribute) or isinstance(attribute, (property, classmethod, staticmethod))


def _documented_members(module_name: str) -> Iterator[tuple[str, Any]]:
    """(dotted name, object) for the module, its public classes and functions, and their public methods."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # a Python built without e.g. sqlite3 still gets a corpus, a smaller one
        LOGGER.warning("stdlib corpus: skipping %s (%s)", module_name, error)
        return
    yield module_name, module
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or inspect.ismodule(member):
            continue
        if not (inspect.isclass(member) or inspect.isroutine(member)) or not _belongs_to(member, module_name):
            continue
        yield f"{module_name}.{name}", member
        if inspect.isclass(member):
            for attribute_name, attribute in sorted(vars(member).items()):
                if not attribute_name.startswith("_") and _is_documentable_attribute(attribute):
                    yield f"{module_name}.{name}.{attribute_name}", attribute


def stdlib_records(max_passages: int | None = None) -> list[dict[str, str]]:
    """Corpus records `{"id", "title", "text"}` from `STDLIB_MODULES`, in a fixed order, at most `max_passages`."""
    if max_passages is not None and max_passages < 0:
        raise ValueError(f"max_passages must be >= 0 or None, got {max_passages}")
    records: list[dict[str, str]] = []
    seen_objects: set[int] = set()
    seen_texts: set[str] = set()
    for module_name in STDLIB_MODULES:
        for dotted_name, member in _documented_members(module_name):
            if max_passages is not None and len(records) >= max_passages:
                return records
            # The same object reached twice (an alias like `logging.warn`) is documented once, under its first name.
            if id(member) in seen_objects:
                continue
            seen_objects.add(id(member))
            text = _docstring(member)
            if not text or len(text.split()) < MIN_WORDS or text in seen_texts:
                continue
            seen_texts.add(text)
            records.append({"id": dotted_name, "title": dotted_name, "text": text})
    return records


def build_stdlib_corpus(path: str, max_passages: int | None = None) -> int:
    """Write the stdlib corpus as JSONL (`id`, `title`, `text`) to `path` (local or any Beam filesystem).

    Returns the number of passages written. Line N of the file is the passage whose `source` is
    `builtin:python-stdlib:N` when `ReadCorpusConfig(path="builtin:python-stdlib")` reads the same corpus.
    """
    records = stdlib_records(max_passages)
    with FileSystems.create(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    return len(records)
