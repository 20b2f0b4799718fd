"""The one reader of the mount table: `/proc/self/mountinfo`, decoded exactly.

The kernel writes a path in mountinfo with space, tab, newline and backslash escaped as
octal (`\\040 \\011 \\012 \\134`) and every other byte as it is, so a non-ASCII name is
there as its raw bytes (UTF-8, usually). The escapes are undone on those bytes and the
path then decoded with the filesystem encoding (`os.fsdecode`), which gives back the
very string `os.fsencode` made of it: a mount point with blanks, backslashes or
non-ASCII letters in its name compares equal to the path bake mounted on. (Decoding
the line as text and then as `unicode_escape` turns every non-ASCII byte into another
character, and such a mount point is then never recognised.)

This module uses the standard library alone, as the DIB sandbox runs it in a namespace.
"""

from __future__ import annotations

import os
import re

MOUNTINFO = "/proc/self/mountinfo"

_ESCAPE = re.compile(rb"\\([0-7]{3})")


def unescape(field: bytes) -> str:
    """A path as mountinfo writes it (octal escapes, raw bytes) back as the path."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


class Mount:
    """One line of mountinfo (proc(5)): the mount's id, its parent's, the device, the
    root of the mount within its filesystem, where it is mounted, its type and source.

    A plain class, not a dataclass: this module is imported by the first process of every
    confined command, and making a dataclass at import was a fifth of that process's start."""

    __slots__ = ("device", "fstype", "mount_id", "parent_id", "root", "shared", "source", "target")

    def __init__(self, *, mount_id: int, parent_id: int, device: str, root: str, target: str, fstype: str,
                 source: str, shared: bool) -> None:
        self.mount_id, self.parent_id, self.device, self.root = mount_id, parent_id, device, root
        self.target, self.fstype, self.source, self.shared = target, fstype, source, shared

    def __repr__(self) -> str:
        return f"Mount(target={self.target!r}, fstype={self.fstype!r}, source={self.source!r})"


def parse(data: bytes) -> list[Mount]:
    """The mounts described by mountinfo's contents `data`, in the kernel's order."""
    out = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        left, _, right = line.partition(b" - ")
        fields = left.split(b" ")
        tail = right.split(b" ")
        out.append(Mount(mount_id=int(fields[0]), parent_id=int(fields[1]), device=fields[2].decode(),
                         root=unescape(fields[3]), target=unescape(fields[4]),
                         fstype=unescape(tail[0]), source=unescape(tail[1]) if len(tail) > 1 else "",
                         shared=any(o.startswith(b"shared:") for o in fields[6:])))
    return out


def read() -> list[Mount]:
    """This process's mounts, from `/proc/self/mountinfo`."""
    with open(MOUNTINFO, "rb") as f:
        return parse(f.read())


def _below(target: str, top: str) -> bool:
    return target == top or target.startswith(top.rstrip("/") + "/")


def under(path: str | os.PathLike, table: list[Mount] | None = None) -> list[Mount]:
    """The mounts at or below `path` (its real path), the ones to undo first first:
    deeper mount points before shallower ones, and of two on one point the later one."""
    top = os.path.realpath(path)
    mounts = read() if table is None else table
    found = [(i, m) for i, m in enumerate(mounts) if _below(m.target, top)]
    found.sort(key=lambda im: (im[1].target.rstrip("/").count("/"), im[0]), reverse=True)
    return [m for _, m in found]


def targets() -> set[str]:
    """Every mount point of this process."""
    return {m.target for m in read()}
