"""Where log lines go: embforge's own progress and summary on the console; everything else in the run's log file.

Beam, faiss, transformers, sentence-transformers, google-genai and huggingface_hub log INFO and WARNING lines by the
hundred (Beam alone writes one per type hint it cannot read). None of them helps a user who is not debugging, so by
default the console shows only records of embforge's own loggers, and a file (`<run>/embforge.log`) gets every record
of every library at INFO and above, Python warnings included. With `-v` the console shows everything, at DEBUG.

Lines logged before the command knows its run directory (while the config is read) are held in memory and written
to the file once it is opened, so the file misses nothing.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

#: The log file's name in a run directory.
LOG_NAME = "embforge.log"
#: Top-level packages whose loggers are embforge's own.
OWN_PACKAGES = frozenset({"embforge", "pipelines", "embedder", "data_schemas", "prompts", "benchmarks"})
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Handlers this module installed, so that configuring again (tests call the CLI many times) replaces them.
_INSTALLED: list[logging.Handler] = []


class _OwnRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".", 1)[0] in OWN_PACKAGES


class _ConsoleFormatter(logging.Formatter):
    """Plain messages; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def _quiet_library_output(verbose: bool) -> None:
    """Libraries that write to the terminal around logging: send their records through it, and keep their progress
    bars for -v (they draw one per model load)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "0" if verbose else "1")
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    # transformers gives its loggers a handler of their own that bypasses the root logger: use ours instead.
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    if verbose:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()


def configure(verbose: bool) -> None:
    """Console logging for a command; `attach_file` adds the log file once the run directory is known."""
    root = logging.getLogger()
    for handler in _INSTALLED:
        root.removeHandler(handler)
        handler.close()
    _INSTALLED.clear()
    for handler in list(root.handlers):
        # A module-level `logging.warning(...)` in a library imported earlier installs this (logging.basicConfig's
        # handler, printing every library's records): it would undo the point. Subclasses (pytest's) stay.
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_ConsoleFormatter("%(message)s") if not verbose else logging.Formatter(_FILE_FORMAT))
    if not verbose:
        console.addFilter(_OwnRecords())
    # Records until the file is known; `flushLevel` above CRITICAL: only `attach_file` (or the cap) empties it.
    pending = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    for handler in (console, pending):
        root.addHandler(handler)
        _INSTALLED.append(handler)
    logging.captureWarnings(True)
    _quiet_library_output(verbose)


def attach_file(path: str | None) -> None:
    """Append every record, from now and from before (held in memory), to the log file at `path`; None: commands
    without a run directory keep no file, and the held records are dropped."""
    root = logging.getLogger()
    file_handler = None
    if path is not None:
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    for handler in list(_INSTALLED):
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.setTarget(file_handler)
            handler.flush()
            root.removeHandler(handler)
            _INSTALLED.remove(handler)
            handler.close()
    if file_handler is not None:
        root.addHandler(file_handler)
        _INSTALLED.append(file_handler)
