"""Sparse files through libguestfs: `tar_out` writes them in full, so where an ext2/3/4
image's files have holes (read from its extent maps with debugfs, no mount needed) they
are punched again in the tree copied out, and the tree holds data exactly where the
image does."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.base.extfs import fs_facts
from builder.core import sh
from builder.core.errors import BakeError

log = logging.getLogger("bake.base")


@dataclass
class FileData:
    """Where a regular file of an image holds data."""

    ino: int
    size: int
    data: list[tuple[int, int]] | None = None     # byte ranges holding data


_LS_LINE = re.compile(r"^/(\d+)/(\d+)/\d+/\d+/(.*)/(\d*)/$")
_EXTENT = re.compile(r"\((\d+)(?:-(\d+))?(\[u\])?\):")
_ECHO = re.compile(r"^debugfs: (?:ls -p|stat) <(\d+)>$")


def _debugfs(image: Path, commands: list[str], what: str) -> dict[int, list[str]]:
    """Run `commands` (each naming one inode as <N>) in one debugfs; each inode's output lines."""
    with tempfile.NamedTemporaryFile("w", prefix="bake-debugfs-", suffix=".cmds") as f:
        f.write("".join(c + "\n" for c in commands))
        f.flush()
        out = sh.run(["debugfs", "-f", f.name, image], quiet=True, what=what,
                     extra_env={"PAGER": "cat", "DEBUGFS_PAGER": "__none__"}).output
    blocks: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        m = _ECHO.match(line)
        if m:
            current = blocks.setdefault(int(m.group(1)), [])
        elif current is not None:
            current.append(line)
    return blocks


def data_layout(image: Path) -> dict[str, FileData] | None:
    """Every regular file with holes in the ext2/3/4 filesystem `image`, by its path
    below the root: where its data is. None (with a warning) for another filesystem."""
    try:
        facts = fs_facts(image)
    except BakeError:
        facts = None
    if facts is None or not facts.type.startswith("ext"):
        log.warning("%s is no ext2/3/4 filesystem: its sparse files come out of libguestfs in full", image.name)
        return None
    what = f"reading the layout of {image.name} with debugfs"
    files: dict[str, FileData] = {}
    level = {2: ""}                                   # inode 2 is the root folder
    while level:
        listed = _debugfs(image, [f"ls -p <{ino}>" for ino in level], what)
        deeper = {}
        for ino, prefix in level.items():
            for line in listed.get(ino, []):
                m = _LS_LINE.match(line)
                if not m or m.group(3) in (".", ".."):
                    continue
                child, mode, name, size = int(m.group(1)), int(m.group(2), 8), m.group(3), m.group(4)
                path = f"{prefix}{name}"
                if stat.S_ISDIR(mode) and path != "lost+found":
                    deeper[child] = path + "/"
                elif stat.S_ISREG(mode) and int(size or 0) > 0:
                    files.setdefault(path, FileData(child, int(size)))
        level = deeper
    by_ino: dict[int, FileData] = {}
    for f in files.values():
        by_ino.setdefault(f.ino, f)
    stats = _debugfs(image, [f"stat <{ino}>" for ino in by_ino], what)
    bs = facts.block_size
    for ino, f in by_ino.items():
        lines = stats.get(ino, [])
        header = next((i for i, line in enumerate(lines) if line in ("EXTENTS:", "BLOCKS:")), None)
        if header is None:
            # inline data, or a map debugfs did not show: taken as all data, never punched
            f.data = [(0, f.size)]
            continue
        ranges: list[tuple[int, int]] = []
        for m in _EXTENT.finditer("\n".join(lines[header + 1:])):
            if m.group(3):          # unwritten: reads as zeros, and SEEK_DATA calls it a hole
                continue
            first = int(m.group(1))
            last = int(m.group(2) or first)
            start, end = first * bs, min((last + 1) * bs, f.size)
            if start >= end:
                continue
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        f.data = ranges
    return {path: f for path, f in files.items()
            if by_ino[f.ino].data != [(0, f.size)] and by_ino[f.ino] is f}


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def restore_holes(tree: Path, layout: dict[str, FileData]) -> int:
    """Punch the image's holes into the tree's (full) copies of its sparse files, keeping
    their mode, xattrs (a write drops file capabilities) and times. Returns how many."""
    done = 0
    for rel, f in layout.items():
        path = tree / rel
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
            log.warning("%s: not found as the image lists it; its holes are not restored", rel)
            continue
        xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}
        block = max(st.st_blksize, 4096)
        holes, pos = [], 0
        for start, end in (f.data or []) + [(f.size, f.size)]:
            if start > pos:
                holes.append((pos, start))
            pos = max(pos, end)
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for start, end in holes:
                if end == f.size:       # to the block's end: a partial last block is not freed
                    end = -(-end // block) * block
                if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, end - start) != 0:
                    e = ctypes.get_errno()
                    raise BakeError(f"{path}: cannot make its holes again ({os.strerror(e)}); "
                                    "the tree's filesystem must support punching holes (ext4, xfs, btrfs, tmpfs)")
        finally:
            os.close(fd)
        if stat.S_IMODE(os.lstat(path).st_mode) != stat.S_IMODE(st.st_mode):
            os.chmod(path, stat.S_IMODE(st.st_mode))
        for name, value in xattrs.items():
            try:
                same = os.getxattr(path, name, follow_symlinks=False) == value
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
                same = False
            if not same:
                os.setxattr(path, name, value, follow_symlinks=False)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        done += 1
    return done
