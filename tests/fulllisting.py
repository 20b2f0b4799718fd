"""A full listing of a tree, for saying that two trees (or images) hold the same files.

One line per entry, sorted by path: type, all twelve mode bits, owner numbers, size,
device numbers, symlink target, SHA-256 of the contents, hard-link group, every xattr
with its value (capabilities and ACLs included) and where a regular file's data is
(SEEK_DATA/SEEK_HOLE: which ranges hold data, not how many blocks they take). Times and
folder sizes are left out: they differ between filesystems that hold the same tree.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from builder.core import sh
from builder.base.extfs import fs_facts

EXCLUDED = {"lost+found"}      # at the top only: what mkfs makes, not part of a tree


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def data_extents(path: str) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of a file that hold data, by SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str) -> str:
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return ""
        raise
    return ",".join(f"{n}={os.getxattr(path, n, follow_symlinks=False).hex()}" for n in names)


def _paths(root: str) -> list[str]:
    found = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in EXCLUDED]
            filenames = [f for f in filenames if f not in EXCLUDED]
        for name in dirnames + filenames:
            found.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(found)


def listing(root: Path) -> list[str]:
    """Every entry of the tree at `root` (itself as ".", without a top-level lost+found),
    one tab-separated line each, sorted by path."""
    root = os.fspath(root)
    first_name: dict[tuple[int, int], str] = {}
    lines = []
    for rel in _paths(root):
        full = os.path.join(root, rel)
        st = os.lstat(full)
        kind = _kind(st.st_mode)
        fields = [rel, kind, f"mode={stat.S_IMODE(st.st_mode):04o}", f"uid={st.st_uid}", f"gid={st.st_gid}"]
        if kind != "dir":
            fields.append(f"size={st.st_size}")
        if kind in ("char", "block"):
            fields.append(f"rdev={os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        if kind == "symlink":
            fields.append(f"target={os.readlink(full)}")
        if kind == "file":
            extents = data_extents(full)
            data = sum(end - start for start, end in extents)
            fields.append(f"sha256={_sha256(full)}")
            fields.append(f"sparse={'yes' if data < st.st_size else 'no'}")
            fields.append("data=" + ",".join(f"{a}-{b}" for a, b in extents))
        if kind != "dir" and st.st_nlink > 1:
            fields.append(f"link={first_name.setdefault((st.st_dev, st.st_ino), rel)}")
        fields.append(f"xattrs={_xattrs(full)}")
        lines.append("\t".join(fields))
    return lines


def image_listing(image: Path) -> list[str]:
    """`listing` of the filesystem in `image`, mounted read-only (its journal not replayed)
    on a loop device for the reading."""
    fstype = fs_facts(image).type
    options = "ro" if fstype == "ext2" else "ro,noload"     # ext2 has no journal to leave alone
    with tempfile.TemporaryDirectory(prefix="bake-listing-") as mnt, \
            sh.loop_device(image, read_only=True) as dev, \
            sh.mount(dev, mnt, fstype=fstype, options=options):
        return listing(Path(mnt))
