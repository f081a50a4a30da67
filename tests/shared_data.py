"""Where the shared evaluation data (SciFact, Banking77) is, for the tests and benchmarks that read real data.

It is not part of embforge: the product is always given its data paths. Tests that need the folder are marked
`needs_shared_data` and skip without it; benchmarks stop with a message naming `--data` and the variable.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

#: Environment variable naming the shared evaluation data folder.
SHARED_DATA_ENV = "EMBFORGE_SHARED_DATA"


def find_shared_data() -> Path | None:
    """The shared evaluation data folder: `$EMBFORGE_SHARED_DATA`, else `shared/data` beside the repository checkout
    (`../shared/data` from the repo root). None when it does not exist (a fresh machine has none)."""
    configured = os.environ.get(SHARED_DATA_ENV)
    folder = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "data"
    return folder if folder.is_dir() else None


def data_set_folder(parser: argparse.ArgumentParser, given: str | None, name: str) -> str:
    """A benchmark's data folder: `given` (its --data), else data set `name` in the shared data folder; stops `parser`
    with a message naming --data and the variable when neither is there."""
    if given is not None:
        return given
    shared = find_shared_data()
    if shared is None:
        parser.error(f"no shared data folder: pass --data or set {SHARED_DATA_ENV}")
    return str(shared / name)
