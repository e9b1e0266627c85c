"""Folders adrank writes whole and may later replace: only ones it wrote itself, which a marker file inside
says. A folder a user pointed adrank at (real logs, a scratch folder that held something else) is never
deleted."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".adrank-wrote-this"


def check_replaceable(folder: Path, default: Path | None = None) -> None:
    """FileExistsError unless folder is absent, empty, the given default location or marked by mark()."""
    if not folder.exists() or (default is not None and folder.resolve() == default.resolve()):
        return
    if folder.is_dir() and (not any(folder.iterdir()) or (folder / MARKER).exists()):
        return
    raise FileExistsError(
        f"{folder}: not a folder adrank wrote (no {MARKER} in it), so adrank will not replace it; "
        "point adrank at another folder, or remove this one yourself"
    )


def mark(folder: Path) -> None:
    """Say that adrank wrote folder, so a later run may replace it."""
    (folder / MARKER).write_text("written by adrank; adrank may replace this folder\n")


@contextmanager
def replaced_whole(folder: Path, default: Path | None = None) -> Iterator[Path]:
    """Write a new folder in the block (into the yielded, marked temporary sibling), then swap it in for
    folder: a crash never leaves half of one, and a folder adrank did not write is refused before anything
    is written (check_replaceable). The temporary folder has a fresh name (never another's) and is removed
    if the block fails."""
    check_replaceable(folder, default)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        mark(tmp)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
