"""Files a bundle is made of: private directories, private files, and I/O errors told as
what the user can fix (a full disk, an unreadable file) rather than as tracebacks."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import BakeError


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
