"""Progress of the slow steps (LLM calls, teacher embeddings) on local runs.

Beam's DirectRunner reports metrics only when a pipeline finishes, and in multi_processing mode the work happens in
other processes. So each worker process writes its running counts to a small JSON file in a folder named by
`EMBFORGE_PROGRESS_DIR` (inherited by worker processes), and the launching process polls that folder and draws a
live table on a terminal, or logs one line every 30 s elsewhere (a CI console, a redirected stderr). Where the
variable is unset (Dataflow workers, tests) reporting is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ENV_VARIABLE = "EMBFORGE_PROGRESS_DIR"
_WRITE_INTERVAL_S = 0.5
#: Seconds between progress lines when the console is not a terminal.
_LOG_INTERVAL_S = 30.0
LOGGER = logging.getLogger(__name__)

_lock = threading.Lock()
_counts: Counter[str] = Counter()
_last_write = 0.0
_file_name = f"{os.getpid()}-{uuid.uuid4().hex}.json"


def advance(task: str, amount: int = 1) -> None:
    """Count `amount` units of `task` done in this process (cheap; writes at most twice a second)."""
    folder = os.environ.get(ENV_VARIABLE)
    if not folder:
        return
    global _last_write
    with _lock:
        _counts[task] += amount
        now = time.monotonic()
        if now - _last_write < _WRITE_INTERVAL_S:
            return
        _last_write = now
        # Written under the lock: threads of one process (multi_threading mode) share the file name.
        path = Path(folder) / _file_name
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(dict(_counts)))
            temporary.replace(path)
        except OSError:
            pass  # the display is cosmetic: a folder removed or a full disk must not fail the pipeline


def flush() -> None:
    """Write the final counts now (called from DoFn teardown / finish_bundle)."""
    global _last_write
    _last_write = 0.0
    advance("_", 0)


def read_totals(folder: str | Path) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for path in Path(folder).glob("*.json"):
        try:
            totals.update(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # a file being replaced right now; the next poll reads it
    totals.pop("_", None)
    return dict(totals)


class LiveProgress:
    """Context manager for the launching process: sets the folder for workers and draws the counts until exit."""

    def __init__(self, title: str, enabled: bool = True):
        self._title = title
        self._enabled = enabled
        self._stop = threading.Event()

    def __enter__(self) -> LiveProgress:
        if not self._enabled:
            return self
        self._folder = tempfile.mkdtemp(prefix="embforge-progress-")
        self._previous = os.environ.get(ENV_VARIABLE)
        os.environ[ENV_VARIABLE] = self._folder
        self._thread = threading.Thread(target=self._draw, daemon=True)
        self._thread.start()
        return self

    def _draw(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.table import Table

        started = time.monotonic()
        console = Console(stderr=True)
        if not console.is_terminal:
            # A log file or CI console: a redrawn table would only pile up copies; a line every so often says enough.
            while not self._stop.wait(_LOG_INTERVAL_S):
                totals = read_totals(self._folder)
                if totals:
                    elapsed = time.monotonic() - started
                    LOGGER.info("%s: %.0f s, %s", self._title, elapsed,
                                ", ".join(f"{task} {count}" for task, count in sorted(totals.items())))
            return

        def render() -> Table:
            elapsed = time.monotonic() - started
            table = Table(title=f"{self._title} - {elapsed:.0f} s", show_edge=False)
            table.add_column("step")
            table.add_column("done", justify="right")
            table.add_column("per second", justify="right")
            for task, count in sorted(read_totals(self._folder).items()):
                table.add_row(task, str(count), f"{count / max(elapsed, 1e-9):.1f}")
            return table

        with Live(render(), console=console, refresh_per_second=2, transient=False) as live:
            while not self._stop.wait(0.5):
                live.update(render())
            live.update(render())

    def __exit__(self, *exc_info) -> None:
        if not self._enabled:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        if self._previous is None:
            os.environ.pop(ENV_VARIABLE, None)
        else:
            os.environ[ENV_VARIABLE] = self._previous
