"""ext2/3/4 filesystems in files, read and grown with e2fsprogs: no mount, no loop device,
no root."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from builder.core import sh
from builder.core.errors import BakeError


@dataclass
class FsFacts:
    """What the superblock of an ext filesystem says of it."""

    type: str
    label: str
    uuid: str
    features: list[str]
    block_size: int
    block_count: int

    @property
    def size(self) -> int:
        return self.block_size * self.block_count


# Features an ext3 driver mounts (read-write) plus every compat feature: anything else
# makes a filesystem ext4, as blkid decides.
EXT3_FEATURES = {"has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "needs_recovery",
                 "meta_bg", "sparse_super", "large_file", "dir_prealloc", "imagic_inodes", "lazy_bg",
                 "exclude_bitmap", "sparse_super2", "journal_dev"}


@contextlib.contextmanager
def e2name(path: Path, offset: int = 0) -> Iterator[str]:
    """The name e2fsprogs opens `path` by, at byte `offset`: they read a `?` in a name as
    the start of options, so a name holding one is reached through a symlink."""
    suffix = f"?offset={offset}" if offset else ""
    if "?" not in str(path):
        yield str(path) + suffix
        return
    with tempfile.TemporaryDirectory(prefix="bake-e2-") as d:
        link = Path(d) / "image"
        link.symlink_to(Path(path).resolve())
        yield str(link) + suffix


def facts_at(path: Path, offset: int = 0) -> FsFacts | None:
    """What the superblock of an ext filesystem at byte `offset` of `path` says; None when
    there is none."""
    with e2name(path, offset) as name:
        r = sh.run(["dumpe2fs", "-h", name], check=False, quiet=True)
    if r.returncode != 0:
        return None
    fields: dict[str, str] = {}
    for line in r.output.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    try:
        features = fields.get("Filesystem features", "").split()
        features = [] if features == ["(none)"] else features
        if any(f not in EXT3_FEATURES for f in features):
            fstype = "ext4"
        else:
            fstype = "ext3" if "has_journal" in features else "ext2"
        label = fields.get("Filesystem volume name", "")
        return FsFacts(type=fstype, label="" if label == "<none>" else label,
                       uuid=fields.get("Filesystem UUID", ""), features=features,
                       block_size=int(fields["Block size"]), block_count=int(fields["Block count"]))
    except (KeyError, ValueError):
        return None


def fs_facts(image: Path) -> FsFacts:
    """Type, label, UUID, features and size of the ext filesystem in file `image`; a
    BakeError when it holds none."""
    facts = facts_at(Path(image))
    if facts is None:
        raise BakeError(f"{image}: not an ext2/ext3/ext4 filesystem (dumpe2fs cannot read its superblock)")
    return facts


def _debugfs(name: str, request: str) -> str:
    out = sh.run(["debugfs", "-R", request, name], quiet=True, what="reading the image with debugfs").output
    if "Filesystem not open" in out:
        raise BakeError(f"{name}: not an ext2/ext3/ext4 filesystem (debugfs cannot open it)")
    return out


def _quote(path: str) -> str:
    """`path` as one argument of a debugfs request (in double quotes, a quote doubled)."""
    if "\n" in path or "\0" in path:
        raise BakeError(f"{path!r}: a path with a newline cannot be read from an image")
    return '"' + path.replace('"', '""') + '"'


_STAT_TYPE = re.compile(r"^Inode: \d+\s+Type: (.+?)\s+Mode:", re.M)
_FAST_LINK = re.compile(r'^Fast link dest: "(.*)"$', re.M)
MAX_SYMLINKS = 40


def _stat(name: str, path: str) -> tuple[str, str] | None:
    """(type, stat output) of `path` in the image, its last component not followed;
    None if absent. debugfs follows symlinks in the folders on the way, inside the
    image."""
    out = _debugfs(name, f"stat {_quote(path)}")
    m = _STAT_TYPE.search(out)
    return (m.group(1), out) if m else None


def _dump(name: str, path: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="bake-debugfs-") as d:
        target = Path(d) / "file"
        _debugfs(name, f"dump {_quote(path)} {_quote(str(target))}")
        if not target.exists():
            raise BakeError(f"{name}: debugfs could not read {path} out of the image")
        return target.read_bytes()


def _resolve(name: str, path: str) -> tuple[str, str] | None:
    """(path, type) of `path` in the image after following symlinks, each inside the
    image; None if absent or a link loop."""
    path = "/" + path.lstrip("/")
    for _ in range(MAX_SYMLINKS):
        st = _stat(name, path)
        if st is None:
            return None
        kind, out = st
        if kind != "symlink":
            return path, kind
        m = _FAST_LINK.search(out)
        target = m.group(1) if m else _dump(name, path).decode(errors="surrogateescape")
        # not normalised here: debugfs resolves `..` through the folders themselves, as the
        # kernel does when a folder on the way is a symlink
        path = target if target.startswith("/") else path.rsplit("/", 1)[0] + "/" + target
    return None


def read_file(image: Path, path: str) -> bytes | None:
    """The contents of file `path` in the ext filesystem `image` (symlinks followed inside
    the image), None if there is no such file."""
    with e2name(Path(image)) as name:
        found = _resolve(name, path)
        if found is None or found[1] != "regular":
            return None
        return _dump(name, found[0])


_LS_LINE = re.compile(r"^/(\d+)/(\d+)/(\d+)/(\d+)/(.*)/(\d*)/$")


def list_dir(image: Path, path: str) -> list[str] | None:
    """The names in folder `path` of the ext filesystem `image` (symlinks followed inside
    the image), without . and ..; None if there is no such folder."""
    with e2name(Path(image)) as name:
        found = _resolve(name, path)
        if found is None or found[1] != "directory":
            return None
        out = _debugfs(name, f"ls -p {_quote(found[0])}")
    names = [m.group(5) for m in map(_LS_LINE.match, out.splitlines()) if m]
    return sorted(n for n in names if n not in (".", ".."))


ROOT_MARKERS = ("/sbin/init", "/usr/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd", "/bin/sh")


def holds_root(name: str) -> bool:
    """Whether the ext filesystem e2fsprogs opens by `name` holds a root tree: /etc and an
    init (or /bin/sh)."""
    etc = _stat(name, "/etc")
    if etc is None or etc[0] != "directory":
        return False
    return any(_stat(name, p) is not None for p in ROOT_MARKERS)


def grow(image: Path, extra: int) -> None:
    """Give the ext filesystem in file `image` `extra` more bytes (rounded down to its
    block size): the file is lengthened, checked and the filesystem resized to fill it."""
    if extra < 0:
        raise BakeError(f"cannot grow {image} by a negative size ({extra} bytes)")
    facts = fs_facts(image)
    new_size = (facts.size + extra) // facts.block_size * facts.block_size
    if new_size <= facts.size:
        return
    os.truncate(image, max(new_size, os.path.getsize(image)))
    r = sh.run(["e2fsck", "-f", "-p", image], check=False, what=f"checking {image}")
    if r.returncode not in (0, 1):     # 1: errors were corrected
        raise sh.CommandError(r.argv, r.returncode, r.output[-4000:], f"checking {image} before growing it")
    blocks = new_size // facts.block_size
    sh.run(["resize2fs", image, str(blocks)], what=f"growing the filesystem in {image}")
