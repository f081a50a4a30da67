"""Finding a corpus's files: what a corpus path (a file, folder, glob or builtin name) names, and each file's format.

Separate from ReadCorpus because it runs on the launcher while the pipeline is built (a wrong path fails before any
worker starts), while reading runs on workers. Formats by file name, for `format = "auto"`:
`.jsonl` / `.ndjson` / `.json` (optionally `.gz` / `.bz2` / `.zst` ...) -> jsonl, `corpus.jsonl` -> beir (a BEIR folder
reads only its corpus), `.parquet` -> parquet, `.txt` / `.md` / `.markdown` -> text, and a folder holding
`state.json` / `dataset_info.json` / `dataset_dict.json` -> save_to_disk. Names starting with "." (`.git/`,
`.DS_Store`) are tool files, never corpus text; files of no known format are skipped with a warning.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Literal

from apache_beam.io.filesystems import FileSystems

from pipelines.config_loading import ConfigError

LOGGER = logging.getLogger(__name__)

BUILTIN_STDLIB = "builtin:python-stdlib"
BUILTIN_CORPORA = (BUILTIN_STDLIB,)

CorpusFormat = Literal["auto", "jsonl", "beir", "parquet", "save_to_disk", "text"]

#: File suffix -> format, for `format = "auto"`. `.json` is read as JSON Lines: most `.json` corpora are.
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
    ".txt": "text", ".md": "text", ".markdown": "text",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".deflate", ".zst", ".zstd", ".xz", ".lzma")
_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
_BEIR_CORPUS_NAMES = ("corpus.jsonl", "corpus.jsonl.gz")
_GLOB_CHARS = re.compile(r"[*?\[]")


class CorpusError(ConfigError):
    """The corpus setting names nothing readable; raised while the pipeline is built, before any work."""


@dataclass(frozen=True)
class CorpusFile:
    """One unit of reading: a file, a saved dataset folder, or a builtin corpus."""

    path: str
    format: str
    #: Path relative to the corpus root, used in text passage ids so they do not depend on where the corpus lies.
    relative_path: str
    size: int | None = None


def detect_format(path: str) -> str | None:
    """The format a file's name says (`corpus.jsonl` -> beir, `a.jsonl.gz` -> jsonl), None when it says nothing."""
    name = path.replace("\\", "/").rsplit("/", 1)[-1].lower()
    compressed = False
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name, compressed = name.removesuffix(suffix), True
    if name == "corpus.jsonl":
        return "beir"
    dot = name.rfind(".")
    file_format = _SUFFIX_FORMATS.get(name[dot:]) if dot > 0 else None
    # Parquet compresses inside the file; an externally compressed one is not something pyarrow can open.
    return None if compressed and file_format == "parquet" else file_format


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    if not root:
        return path
    return path[len(root) + 1:] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def _is_hidden(relative_path: str) -> bool:
    # .git/, .ipynb_checkpoints/, .DS_Store: tool files inside a corpus folder, never corpus text.
    return any(part.startswith(".") and part not in (".", "..") for part in relative_path.split("/"))


def _is_local_folder(path: str) -> bool:
    # An empty local folder "exists" for FileSystems like a file does; object stores have no empty folders.
    return "://" not in path and os.path.isdir(path)


def _match(pattern: str) -> list[tuple[str, int]]:
    return sorted((metadata.path, metadata.size_in_bytes)
                  for result in FileSystems.match([pattern]) for metadata in result.metadata_list)


def plan_corpus(path: str, corpus_format: CorpusFormat = "auto") -> tuple[CorpusFile, ...]:
    """The files `path` names, each with its format (`corpus_format`, or detected from the name when "auto"), sorted
    by path. Raises `CorpusError` when there are none.

    Runs on the launcher while the pipeline is built, so a wrong path fails before any worker starts.
    """
    if path.startswith("builtin:"):
        if path not in BUILTIN_CORPORA:
            raise CorpusError(f"unknown builtin corpus {path!r} (known: {', '.join(BUILTIN_CORPORA)})")
        return (CorpusFile(path, "builtin", path),)

    explicit_file = False
    if _GLOB_CHARS.search(path):
        # Relative paths are taken from the folder above the first wildcard: data/*/x.md -> <dir>/x.md.
        root = _GLOB_CHARS.split(path, maxsplit=1)[0].rsplit("/", 1)[0]
        matched = _match(path)
    else:
        root = path.rstrip("/")
        if corpus_format in ("auto", "save_to_disk") and any(
                FileSystems.exists(FileSystems.join(root, marker)) for marker in _SAVE_TO_DISK_MARKERS):
            return (CorpusFile(root, "save_to_disk", root.rsplit("/", 1)[-1]),)
        matched = _match(FileSystems.join(root, "**"))  # a folder: every file below it
        if matched and corpus_format in ("auto", "beir"):
            beir_corpus = [entry for entry in matched if _relative(entry[0], root) in _BEIR_CORPUS_NAMES]
            matched = beir_corpus or matched  # a BEIR folder also holds queries and qrels, which are not the corpus
        elif not matched and FileSystems.exists(root) and not _is_local_folder(root):
            matched = _match(root)
            root = root.rsplit("/", 1)[0] if "/" in root else ""
            explicit_file = True
    if corpus_format == "save_to_disk":
        raise CorpusError(f"corpus path {path} is not a folder written by save_to_disk "
                          f"(no {' / '.join(_SAVE_TO_DISK_MARKERS)} in it)")
    if not matched:
        raise CorpusError(f"corpus path {path} matches no files")

    files: list[CorpusFile] = []
    skipped: list[str] = []
    for file_path, size in matched:
        relative_path = _relative(file_path, root)
        if _is_hidden(relative_path) and not explicit_file:
            continue
        file_format = corpus_format if corpus_format != "auto" else detect_format(file_path)
        if file_format is None:
            if explicit_file:
                raise CorpusError(f"cannot tell the format of {file_path} from its name; set format to one of "
                                  f"jsonl, beir, parquet, text")
            skipped.append(relative_path)
            continue
        files.append(CorpusFile(file_path, file_format, relative_path, size))
    if skipped:
        LOGGER.warning("corpus path %s: skipping %d files of no known format (e.g. %s); set format to read them",
                       path, len(skipped), ", ".join(skipped[:3]))
    if not files:
        hint = "; a save_to_disk dataset is read from its folder" if any(
            name.endswith(".arrow") for name in skipped) else "; set format to read them anyway"
        raise CorpusError(f"corpus path {path} matches no corpus files ({len(matched)} file(s), none of them "
                          f"{', '.join(sorted(_SUFFIX_FORMATS))}){hint}")
    return tuple(files)


def file_stem(path: str) -> str:
    """A file's name without folders, compression suffixes or extension (`docs/install.md.gz` -> `install`)."""
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
