"""A partition image (a bare filesystem, no partition table) made from a root tree with
`mkfs -d` (no loop mount), and the sizes it takes."""

from __future__ import annotations

import os
import re
from pathlib import Path

from builder.core import sh
from builder.core.errors import BakeError

MiB = 1024 * 1024
INODE_SIZE = 256


def parse_size(text: str) -> int:
    """'2G' / '1536M' -> bytes."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([MG])", text)
    if not m:
        raise BakeError(f"bad size {text!r}: expected a number followed by M or G")
    return int(float(m.group(1)) * (MiB if m.group(2) == "M" else 1024 * MiB))


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes allocated, number of inodes) of a tree, without following links."""
    total, inodes = 0, 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1 and not os.path.isdir(os.path.join(dirpath, name)):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            inodes += 1
            total += max(st.st_blocks * 512, 4096 if name in dirnames else 0)
    return total, inodes


def auto_size(content: int, inodes: int, headroom: int, journal: int = 64 * MiB) -> int:
    """Filesystem size for `content` bytes in `inodes` inodes plus `headroom` free:
    content plus 10 % for block-group metadata, inode tables for twice the inodes,
    the journal and the headroom, rounded up to 16 MiB."""
    raw = int(content * 1.10) + 2 * inodes * INODE_SIZE + journal + headroom
    return -(-raw // (16 * MiB)) * (16 * MiB)


def make_filesystem(root: Path, image: Path, *, fs: str, label: str, size: int, features: list[str],
                    inodes: int) -> None:
    """Write a `size`-byte `fs` filesystem holding the tree at `root` to `image` with
    `mkfs -d` (no loop mount): owners, modes, links, device nodes, xattrs and ACLs as the
    tree has them. Written beside `image` and renamed into place once checked."""
    tmp = image.with_suffix(image.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.truncate(size)
        n_inodes = max(2 * inodes, 32768)
        sh.run([f"mkfs.{fs}", "-q", "-F", "-d", str(root), "-L", label, "-b", "4096",
                "-I", str(INODE_SIZE), "-N", str(n_inodes), "-O", "none," + ",".join(features),
                "-E", "lazy_itable_init=0,lazy_journal_init=0", str(tmp)],
               what=f"making the {fs} filesystem")
        sh.run(["e2fsck", "-f", "-n", str(tmp)], what="checking the new filesystem", quiet=True)
        os.replace(tmp, image)
    finally:
        tmp.unlink(missing_ok=True)
