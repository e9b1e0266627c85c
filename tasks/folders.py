"""Folders adrank writes whole and may later replace: only ones it wrote itself, which a marker file inside
says. A folder a user pointed adrank at (real logs, a scratch folder that held something else) is never
deleted."""

from __future__ import annotations

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
