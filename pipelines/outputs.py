"""Outputs are written aside, then swapped in: nothing of an earlier run is lost before the new one is known good.

Every command that replaces an earlier result (generate's shards and manifest, the hold-out split, the trained student,
the evaluation report) writes the new result into a staging folder first. Only once it is complete (and, for generate,
balanced) does `promote` move it into place, removing the old files of the same entries. A run that fails at
construction or half-way leaves the earlier result as it was; its own partial output stays in the staging folder,
which the next run clears.

All I/O goes through Beam filesystems, so local paths and gs:// behave alike (a rename on GCS is a copy and a delete,
per file). Swaps are per file, not atomic as a whole: a process killed in the middle of `promote` can leave the new
result partly moved, never a mixture with nothing to recover, since the new files are still under the staging folder
and a re-run (served by the cache) writes them again.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from collections.abc import Iterable

from apache_beam.io.filesystems import FileSystems

#: The folder under an output directory that holds a result being written.
STAGING_NAME = ".staging"


def ensure_folder(path: str) -> None:
    """Create `path` (and its parents) unless it exists; safe when several processes do it at once.

    Beam's `mkdirs` raises when the folder exists, so check-then-create races between workers that flush at the same
    moment (one creates it between another's check and its create). The error is only real if the folder is still
    missing afterwards.
    """
    try:
        FileSystems.mkdirs(path)
    except OSError:
        if not FileSystems.exists(path):
            raise


def _is_local(path: str) -> bool:
    return "://" not in path


def staging_path(output: str) -> str:
    return posixpath.join(output, STAGING_NAME)


def sibling_staging_path(output: str) -> str:
    """A staging folder beside `output` (`runs/x/student` -> `runs/x/.student.staging`), for results that are a
    whole folder: the student, the report."""
    parent, name = posixpath.split(output.rstrip("/"))
    return posixpath.join(parent, f".{name}.staging")


def files_under(folder: str) -> list[str]:
    """Every file below `folder`, at any depth, sorted; [] when it does not exist."""
    pattern = posixpath.join(folder, "**")
    return sorted(meta.path for meta in FileSystems.match([pattern])[0].metadata_list)


def remove_tree(folder: str) -> None:
    """Delete `folder` and everything below it, if it exists."""
    if FileSystems.exists(folder):
        FileSystems.delete([folder])


def promote(staging: str, output: str, entries: Iterable[str]) -> None:
    """Replace each entry of `output` (a folder or a file, relative name) by the one in `staging`, then remove
    `staging`. An entry absent from `staging` is removed from `output` too: the new result has none."""
    for entry in entries:
        old, new = posixpath.join(output, entry), posixpath.join(staging, entry)
        old_files = files_under(old) or ([old] if FileSystems.exists(old) else [])
        if old_files:
            FileSystems.delete(old_files)
        remove_tree(old)
        new_files = files_under(new) or ([new] if FileSystems.exists(new) else [])
        for source in new_files:
            target = posixpath.join(output, posixpath.relpath(source, staging))
            ensure_folder(posixpath.dirname(target))
            FileSystems.rename([source], [target])
    remove_tree(staging)


def replace_folder(staging: str, output: str) -> None:
    """Make `output` hold exactly what `staging` holds (every entry), then remove `staging`."""
    if _is_local(staging) and _is_local(output):
        # Two renames of whole folders: faster than file by file, and the gap without an `output` is one rename long.
        previous = f"{sibling_staging_path(output)}.previous"
        shutil.rmtree(previous, ignore_errors=True)
        if os.path.exists(output):
            os.rename(output, previous)
        os.rename(staging, output)
        shutil.rmtree(previous, ignore_errors=True)
        return
    names = {posixpath.relpath(path, staging).split("/", 1)[0] for path in files_under(staging)}
    names |= {posixpath.relpath(path, output).split("/", 1)[0] for path in files_under(output)}
    promote(staging, output, sorted(names))
