"""Files a bundle is made of: private directories, private files, and I/O errors told as
what the user can fix (a full disk, an unreadable file) rather than as tracebacks."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator

from builder.core.errors import BakeError


def private_directory(path: Path) -> None:
    """Make sure directory `path` exists, creating it (and parents) mode 0700."""
    if path.exists() and not path.is_dir():
        raise BakeError(f"{path}: not a directory")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise BakeError(f"{path}: cannot create the directory ({e.strerror})") from None


@contextlib.contextmanager
def os_errors_as_bake_errors(doing: str) -> Iterator[None]:
    """Turn an OSError inside the block into a BakeError saying what was being done."""
    try:
        yield
    except OSError as e:  # a full disk, a read error: the user's to fix, not a bug
        where = f" ({e.filename})" if e.filename else ""
        raise BakeError(f"{doing}: {e.strerror or e}{where}") from None


def create_private(path: Path) -> BinaryIO:
    """Create `path` for writing, mode 0600, failing if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def first_missing(path: Path) -> Path | None:
    """The outermost of `path` and its parents that does not exist yet (the folder a
    mkdir -p of `path` would create first), or None when `path` exists."""
    path = Path(os.path.abspath(path))
    missing = None
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        missing = p
    return missing


@contextlib.contextmanager
def removed_on_failure(created: Path | None) -> Iterator[None]:
    """Remove folder `created` (and what is in it) if the block raises; None for nothing.

    Give only a folder this run made itself (see `first_missing`): a failed command must
    leave no half-written destination behind, and must never take a folder the user had.
    """
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
