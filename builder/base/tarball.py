"""A tarball from outside (a UEC tarball given as a base), read member by member with
every member checked and every size capped.

bake never extracts such a tarball by its members' names (it copies the members it
wants to names of its own), yet a member that could land outside the folder it is
extracted to, or that is no plain file, folder or link, makes the whole tarball
suspect: it is refused, as Python's `tarfile.data_filter` refuses it (used too where the
interpreter has it). The decompressed stream, each member's size and their sum are held
to `limits.max_image_bytes()` while they are read.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import posixpath
import tarfile
from pathlib import Path
from typing import Iterator

from builder.core.errors import BakeError
from builder.core.limits import max_image_bytes, over_cap

GZIP_MAGIC = b"\x1f\x8b"
HEADROOM = 16 << 20         # tar's own headers and padding on top of the members' bytes


def is_gzip(path: Path) -> bool:
    """Whether `path` starts as a gzip stream does."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


class _Capped:
    """The tar stream (decompressed when the file is gzip), stopping at `cap` bytes."""

    def __init__(self, stream: io.BufferedIOBase, path: Path, cap: int):
        self.stream, self.path, self.cap = stream, path, cap
        self.count = 0

    def read(self, n: int | None = -1) -> bytes:
        data = self.stream.read(self.cap + 1 - self.count if n is None or n < 0 else min(n, self.cap + 1 - self.count))
        self.count += len(data)
        if self.count > self.cap:
            raise over_cap(f"{self.path}: the tar stream holds", self.cap)
        return data


@contextlib.contextmanager
def opened(path: Path) -> Iterator[tarfile.TarFile]:
    """The tarball at `path` (plain or gzip) open for one pass over its members, its
    decompressed stream capped (a BakeError at the cap)."""
    path = Path(path)
    cap = max_image_bytes() + HEADROOM
    with open(path, "rb") as f:
        stream: io.BufferedIOBase = gzip.GzipFile(fileobj=f, mode="rb") if is_gzip(path) else f
        with stream, tarfile.open(fileobj=_Capped(stream, path, cap), mode="r|") as tar:  # type: ignore[call-overload]
            yield tar


def members(tar: tarfile.TarFile, path: Path) -> Iterator[tarfile.TarInfo]:
    """Every member of `tar` (from `path`), each checked (`check_member`) before it is
    given, and their declared sizes held to the cap one by one and summed."""
    cap, total = max_image_bytes(), 0
    for m in tar:
        check_member(path, m)
        if m.size > cap:
            raise over_cap(f"{path}: member {m.name!r} declares {m.size} bytes,", cap)
        total += m.size
        if total > cap:
            raise over_cap(f"{path}: its members up to {m.name!r} hold {total} bytes,", cap)
        yield m


def check_member(path: Path, m: tarfile.TarInfo) -> None:
    """A BakeError naming the tarball and the member when the member has an absolute name
    or a `..` in it, is a device node or a fifo, or is a link whose target leaves the
    tarball's tree."""
    name = m.name
    why = None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/"):
        why = "its name is absolute"
    elif ".." in parts:
        why = "its name climbs out with '..'"
    elif m.ischr() or m.isblk() or m.isfifo():
        why = "it is a device node or a fifo"
    elif not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        why = f"it is of tar type {m.type!r}, no file, folder or link"
    elif m.issym() and (m.linkname.startswith("/") or _leaves(posixpath.join(posixpath.dirname(name), m.linkname))):
        why = f"it is a link to {m.linkname!r}, outside the tarball's tree"
    elif m.islnk() and (m.linkname.startswith("/") or _leaves(m.linkname)):
        why = f"it is a hard link to {m.linkname!r}, outside the tarball's tree"
    if why is None and hasattr(tarfile, "data_filter"):
        try:
            tarfile.data_filter(m, "/nonexistent/bake-extract")
        except tarfile.TarError as e:
            why = str(e)
    if why is not None:
        raise BakeError(f"{path}: member {name!r} refused: {why}; bake takes no tarball with a member that could "
                        "land outside the folder it is unpacked in, or that is not a plain file, folder or link")


def _leaves(relative: str) -> bool:
    normal = posixpath.normpath(relative)
    return normal == ".." or normal.startswith("../")
