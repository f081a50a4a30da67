"""An in-memory Beam filesystem for tests: `memfs://` paths that `apache_beam.io.filesystems.FileSystems` can match,
create, open, rename and delete, so code that promises to work on gs:// or s3:// can be tested on a filesystem that is
not the local one, without a network.

It behaves like an object store, as gs:// does: a path is an object name, there are no folders (`mkdirs` does nothing,
`exists` is True for files only, `delete` of a folder-like prefix deletes what lies under it), and `*` in a pattern
stops at "/" while `**` does not (Beam's own pattern rules).

Beam finds a FileSystem subclass by its `scheme()` once the class is imported, so importing this module registers
`memfs://`. Files live in one dict of this process, shared by its threads (Beam's FnApiRunner runs in-process) but not
by other processes. Use it through `memory_filesystem()` (or the `memfs` fixture in tests/conftest.py), which empties
it before and after:

    with memory_filesystem() as root:  # "memfs://test"
        path = FileSystems.join(root, "run", "manifest.json")
        with FileSystems.create(path) as handle:
            handle.write(b"{}")

`copy_local_tree(local_dir, destination)` mirrors a folder written by a local-only helper (a model folder, say).
`memory_filesystem(seekable=False)` makes `open` return forward-only streams, as some object-store downloads are, to
check that a reader does not rely on seek().
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, ClassVar

from apache_beam.io.filesystem import BeamIOError, CompressedFile, CompressionTypes, FileMetadata, FileSystem
from apache_beam.io.filesystems import FileSystems

SCHEME = "memfs"
PREFIX = f"{SCHEME}://"
#: The root `memory_filesystem()` hands out; any memfs:// path works, this one just reads well in messages.
ROOT = f"{PREFIX}test"


@dataclass(frozen=True)
class _Stored:
    content: bytes
    mtime: float


_FILES: dict[str, _Stored] = {}
# FnApiRunner runs bundles on threads: every read-modify-write of _FILES holds the lock.
_LOCK = threading.Lock()


class _Writer(io.BytesIO):
    """Collects what is written; the file appears on close, whole, as an object-store upload does."""

    mode = "wb"  # CompressedFile reads it

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def close(self) -> None:
        if not self.closed:
            stored = _Stored(self.getvalue(), time.time())
            with _LOCK:
                _FILES[self._path] = stored
        super().close()


class _Reader(io.BytesIO):
    mode = "rb"  # CompressedFile reads it


class _ForwardOnlyStream(io.RawIOBase):
    """Reads `content` front to back; seek() and tell() raise, as on a streamed download."""

    mode = "rb"

    def __init__(self, content: bytes):
        super().__init__()
        self._content = memoryview(content)
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._content[self._position:self._position + len(buffer)]
        buffer[:len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)


def _check(path: str) -> str:
    if not path.startswith(PREFIX):
        raise ValueError(f"{path!r} is not a {PREFIX} path")
    return path


def _get(path: str) -> _Stored:
    with _LOCK:
        stored = _FILES.get(_check(path))
    if stored is None:
        raise BeamIOError(f"{path}: no such file", {path: FileNotFoundError(path)})
    return stored


def _files_at(path: str) -> list[str]:
    """`path` itself if it is a file, else every file under `path/` (a folder-like prefix), sorted."""
    folder = _check(path).rstrip("/") + "/"
    with _LOCK:
        if path in _FILES:
            return [path]
        return sorted(name for name in _FILES if name.startswith(folder))


class MemoryFileSystem(FileSystem):
    """The `memfs://` filesystem; see the module docstring."""

    #: False: `open` returns forward-only streams (set through `memory_filesystem(seekable=False)`).
    seekable: ClassVar[bool] = True

    @classmethod
    def scheme(cls) -> str:
        return SCHEME

    def join(self, basepath: str, *paths: str) -> str:
        path = _check(basepath)
        for part in paths:
            path = path.rstrip("/") + "/" + part.lstrip("/")
        return path

    def split(self, path: str) -> tuple[str, str]:
        rest = _check(path.strip())[len(PREFIX):]
        if "/" not in rest:
            return PREFIX + rest, ""
        head, tail = rest.rsplit("/", 1)
        return PREFIX + head, tail

    def mkdirs(self, path: str) -> None:
        _check(path)  # no folders, as on an object store

    def has_dirs(self) -> bool:
        return False

    def _list(self, dir_or_prefix: str) -> Iterator[FileMetadata]:
        with _LOCK:
            listed = sorted((name, stored) for name, stored in _FILES.items() if name.startswith(dir_or_prefix))
        for name, stored in listed:
            yield FileMetadata(name, len(stored.content), stored.mtime)

    def create(self, path: str, mime_type: str = "application/octet-stream",
               compression_type: str = CompressionTypes.AUTO) -> BinaryIO:
        writer = _Writer(_check(path))
        compression_type = FileSystem._get_compression_type(path, compression_type)
        if compression_type == CompressionTypes.UNCOMPRESSED:
            return writer
        return CompressedFile(writer, compression_type=compression_type)

    def open(self, path: str, mime_type: str = "application/octet-stream",
             compression_type: str = CompressionTypes.AUTO) -> BinaryIO:
        content = _get(path).content
        reader = (_Reader(content) if MemoryFileSystem.seekable
                  else io.BufferedReader(_ForwardOnlyStream(content)))
        compression_type = FileSystem._get_compression_type(path, compression_type)
        if compression_type == CompressionTypes.UNCOMPRESSED:
            return reader
        return CompressedFile(reader, compression_type=compression_type)

    def _transfer(self, sources: list[str], destinations: list[str], *, remove_source: bool, operation: str) -> None:
        if len(sources) != len(destinations):
            raise BeamIOError(f"{operation}: {len(sources)} sources for {len(destinations)} destinations")
        errors: dict[tuple[str, str], Exception] = {}
        for source, destination in zip(sources, destinations, strict=True):
            names = _files_at(source)
            if not names:
                errors[(source, destination)] = FileNotFoundError(source)
                continue
            for name in names:
                # A file maps to the destination itself; a folder's files keep their place below it.
                below = name[len(source.rstrip("/")):]
                target = destination if name == source else _check(destination).rstrip("/") + below
                with _LOCK:
                    stored = _FILES.pop(name) if remove_source else _FILES[name]
                    _FILES[target] = stored
        if errors:
            raise BeamIOError(f"{operation} operation failed", errors)

    def copy(self, source_file_names: list[str], destination_file_names: list[str]) -> None:
        self._transfer(source_file_names, destination_file_names, remove_source=False, operation="Copy")

    def rename(self, source_file_names: list[str], destination_file_names: list[str]) -> None:
        self._transfer(source_file_names, destination_file_names, remove_source=True, operation="Rename")

    def exists(self, path: str) -> bool:
        with _LOCK:
            return _check(path) in _FILES

    def size(self, path: str) -> int:
        return len(_get(path).content)

    def last_updated(self, path: str) -> float:
        return _get(path).mtime

    def checksum(self, path: str) -> str:
        return hashlib.md5(_get(path).content).hexdigest()

    def metadata(self, path: str) -> FileMetadata:
        stored = _get(path)
        return FileMetadata(path, len(stored.content), stored.mtime)

    def delete(self, paths: list[str]) -> None:
        errors: dict[str, Exception] = {}
        for path in paths:
            names = _files_at(path)
            if not names:
                errors[path] = FileNotFoundError(path)
            with _LOCK:
                for name in names:
                    _FILES.pop(name, None)
        if errors:
            raise BeamIOError("Delete operation failed", errors)


def stored_paths() -> list[str]:
    """Every file now in the memory filesystem, sorted."""
    with _LOCK:
        return sorted(_FILES)


def copy_local_tree(local_dir: str, destination: str) -> str:
    """Copy every file below the local folder `local_dir` to the same relative path below `destination` (a memfs://
    folder), byte for byte; returns `destination`."""
    for folder, _, names in os.walk(local_dir):
        for name in names:
            source = os.path.join(folder, name)
            relative = os.path.relpath(source, local_dir).replace(os.sep, "/")
            target = FileSystems.join(destination, relative)
            with open(source, "rb") as reader, FileSystems.create(
                    target, compression_type=CompressionTypes.UNCOMPRESSED) as writer:
                shutil.copyfileobj(reader, writer)
    return destination


def clear() -> None:
    with _LOCK:
        _FILES.clear()


@contextmanager
def memory_filesystem(*, seekable: bool = True) -> Iterator[str]:
    """An empty memory filesystem for the block; yields its root, `memfs://test`. Emptied again on exit."""
    clear()
    MemoryFileSystem.seekable = seekable
    try:
        yield ROOT
    finally:
        MemoryFileSystem.seekable = True
        clear()
