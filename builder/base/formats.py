"""What a base image is and how bake gets its own copy of the bare filesystem out of it.

A base is one of: a bare ext2/3/4 filesystem image (a partition image, what bake
itself makes), a disk image with a partition table (raw, qcow2, vmdk, vhdx, vpc, vdi or
qed, one file that names no other: `diskinfo`), a UEC tarball (`NAME.img` with the
kernel, ramdisk and loader beside it; its members checked and its sizes capped:
`tarball`), or a bake build folder. Everything here works on files with e2fsprogs,
qemu-img and sfdisk, so none of it needs root: nothing is mounted and no loop device is
used. An ext filesystem is read by `extfs`, a disk's partitions by `disks`.
"""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from builder.base import diskinfo, tarball
from builder.base.disks import Partition, choose_partition, partition_table, partitions_of_raw, raw_disk
from builder.base.extfs import FsFacts, facts_at, fs_facts
from builder.base.tarball import is_gzip
from builder.core.record import Build, sha256_file
from builder.core.errors import BakeError

KINDS = ("filesystem", "disk", "uec-tarball", "build")
ROLES = ("image", "kernel", "ramdisk", "loader")
IMAGE_NAME = "base.img"

BLOCK = 4096            # granularity of the holes bake's copies get
CHUNK = 1 << 20

EXT_MAGIC_OFFSET = 1024 + 56

# What a recipe's base can be, for messages about what it is not.
WHAT_A_BASE_IS = ("a bare ext2/3/4 filesystem image, a disk image with a partition table (raw, qcow2, "
                  "vmdk, ...), a UEC tarball (*.tar.gz holding NAME.img) or a bake build folder")


@dataclass
class Source:
    """A base as given: the file or folder, what kind of thing it is and, for a tarball or
    a build folder, which member or file plays which role."""

    path: Path
    kind: str
    format: str
    members: dict[str, str] = field(default_factory=dict)


@dataclass
class Unpacked:
    """bake's own copies of what a base holds, under the work folder."""

    image: Path
    kernel: Path | None
    ramdisk: Path | None
    loader: Path | None
    partition: Partition | None
    fs: FsFacts


# --- identifying --------------------------------------------------------------------

def identify(path: Path) -> Source:
    """Say what kind of base `path` is; a BakeError saying what was expected for anything
    that is not one."""
    given = Path(path)
    if not given.exists():
        raise BakeError(f"{given}: no such file or folder (the base should be {WHAT_A_BASE_IS})")
    path = given.resolve()
    if path.is_dir():
        return _identify_build(path)
    if not path.is_file():
        raise BakeError(f"{path}: not a regular file (the base should be {WHAT_A_BASE_IS})")
    with open(path, "rb") as f:
        head = f.read(EXT_MAGIC_OFFSET + 2)
    if head[EXT_MAGIC_OFFSET:EXT_MAGIC_OFFSET + 2] == b"\x53\xef":
        return Source(path, "filesystem", fs_facts(path).type)
    if head[:2] == tarball.GZIP_MAGIC or _is_plain_tar(path):
        return _identify_tarball(path)
    fmt = _disk_format(path)
    if fmt is None:
        raise BakeError(f"{path}: unknown format: not {WHAT_A_BASE_IS}")
    return Source(path, "disk", fmt)


def _is_plain_tar(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(257)
        return f.read(5) == b"ustar"


def _identify_build(path: Path) -> Source:
    build = Build.load(path)        # a BakeError naming the folder when it is none
    outputs = build.data["outputs"]
    if "image" not in outputs:
        raise BakeError(f"{path}: this build has no partition image (its image stage did not run)")
    build.require_outputs(*[r for r in ROLES if r in outputs])
    return Source(path, "build", "build", {r: outputs[r]["path"] for r in ROLES if r in outputs})


def member_role(name: str) -> str | None:
    """The role of a UEC tarball member by its file name, None for anything else (the
    floppy, READMEs)."""
    base = name.rsplit("/", 1)[-1]
    if "-vmlinuz-" in base:
        return "kernel"
    if "-initrd-" in base:
        return "ramdisk"
    if base.endswith("-loader"):
        return "loader"
    if base.endswith(".img"):
        return "image"
    return None


def _identify_tarball(path: Path) -> Source:
    compressed = is_gzip(path)
    members: dict[str, str] = {}
    try:
        with tarball.opened(path) as tar:
            for m in tarball.members(tar, path):
                role = member_role(m.name)
                if role is None or not m.isfile():
                    continue
                if role in members:
                    raise BakeError(f"{path}: two members could be the {role}: {members[role]} and {m.name}")
                members[role] = m.name
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        what = "a gzip file that is not a whole tar archive" if compressed else "a damaged tar archive"
        raise BakeError(f"{path}: {what} ({e}); the base should be {WHAT_A_BASE_IS}") from None
    if "image" not in members:
        raise BakeError(f"{path}: a tarball without a partition image (no *.img member); a UEC tarball holds "
                        "NAME.img, NAME-vmlinuz-* and maybe NAME-initrd-* and NAME-loader")
    return Source(path, "uec-tarball", "tar.gz" if compressed else "tar", members)


def _disk_format(path: Path) -> str | None:
    """qemu-img's name for the format of disk image `path`, None when it is no disk image
    (qemu-img calls anything it does not know "raw": a raw disk must have a partition
    table). A disk that points at other files, or whose format QEMU cannot prove, is
    refused here, before anything reads it (`diskinfo.probe`)."""
    fmt = diskinfo.probe(path)
    if fmt != "raw":
        return fmt
    return "raw" if partition_table(path) is not None else None


def sha256_of(source: Source) -> str:
    """SHA-256 of the base: of the file given, or of a build folder's partition image."""
    if source.kind == "build":
        return sha256_file(source.path / source.members["image"])
    return sha256_file(source.path)


# --- sparse copies ------------------------------------------------------------------

class _SparseWriter:
    """Writes a stream to a file, leaving a hole wherever a whole aligned block is zero."""

    _zero = memoryview(bytes(BLOCK))

    def __init__(self, out: IO[bytes]):
        self.out = out
        self.pos = 0

    def seek(self, pos: int) -> None:
        self.pos = pos

    def write(self, data: bytes) -> None:
        mv = memoryview(data)
        i, n = 0, len(mv)
        run_start = None
        while i < n:
            j = min(n, i + BLOCK - (self.pos + i) % BLOCK)
            zero = mv[i:j] == self._zero[: j - i]
            if not zero and run_start is None:
                run_start = i
            elif zero and run_start is not None:
                self._put(mv, run_start, i)
                run_start = None
            i = j
        if run_start is not None:
            self._put(mv, run_start, n)
        self.pos += n

    def _put(self, mv: memoryview, a: int, b: int) -> None:
        self.out.seek(self.pos + a)
        self.out.write(mv[a:b])

    def finish(self, length: int) -> None:
        self.out.truncate(length)


def _copy_range(src: Path, offset: int, length: int, dst: Path) -> None:
    """Copy `length` bytes of `src` from `offset` into a new sparse file `dst`; the bytes
    past the end of `src` read as zeros."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        w = _SparseWriter(out)
        fd, end, pos = f.fileno(), offset + length, offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:      # ENXIO: only a hole is left
                    raise
                break
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            f.seek(data)
            w.seek(data - offset)
            while data < hole:
                chunk = f.read(min(CHUNK, hole - data))
                if not chunk:
                    break
                w.write(chunk)
                data += len(chunk)
            pos = hole
        w.finish(length)


def _extract_members(path: Path, wanted: dict[str, Path]) -> None:
    """Write members `wanted` (name -> file) of the tarball at `path`, sparse, in one pass
    over it (a compressed tarball cannot be read out of order cheaply), every member
    checked and every size capped on the way (`tarball.members`)."""
    left = dict(wanted)
    try:
        with tarball.opened(path) as tar:
            for m in tarball.members(tar, path):
                if m.name not in left or not m.isfile():
                    continue
                f = tar.extractfile(m)
                assert f is not None
                with f, open(left.pop(m.name), "wb") as out:
                    w = _SparseWriter(out)
                    while chunk := f.read(CHUNK):
                        w.write(chunk)
                    w.finish(w.pos)
                if not left:
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise BakeError(f"{path}: the tarball could not be read to its end ({e})") from None
    if left:
        raise BakeError(f"{path}: member(s) {', '.join(sorted(left))} missing from the tarball")


# --- unpacking ----------------------------------------------------------------------

def unpack(source: Source, work: Path, *, partition: int | str = "auto") -> Unpacked:
    """Copy what `source` holds under `work`: the bare filesystem as `work/base.img`
    (sparse, exactly the filesystem's bytes: a longer file or partition is cut at the
    filesystem's end), and a tarball's or build's kernel, ramdisk and loader under their
    own names. `partition` chooses a disk's partition (see `choose_partition`)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if partition != "auto" and source.kind != "disk":
        raise BakeError(f"{source.path}: `partition` only applies to disk images; this is a {source.kind}")
    image = work / IMAGE_NAME
    extras: dict[str, Path] = {}
    chosen: Partition | None = None
    try:
        if source.kind == "filesystem":
            facts = fs_facts(source.path)
            _copy_whole_fs(source.path, 0, facts, image, os.path.getsize(source.path))
        elif source.kind == "disk":
            with raw_disk(source.path, source.format, work) as raw:
                chosen = choose_partition(source.path, partitions_of_raw(raw, source.path), partition)
                assert chosen.fs is not None
                _copy_whole_fs(raw, chosen.start, chosen.fs, image, chosen.size)
        elif source.kind == "uec-tarball":
            for role in ("kernel", "ramdisk", "loader"):
                if role in source.members:
                    extras[role] = work / source.members[role].rsplit("/", 1)[-1]
            _extract_members(source.path, {source.members["image"]: image,
                                           **{source.members[r]: p for r, p in extras.items()}})
            _cut_to_fs(image, source.path, source.members["image"])
        elif source.kind == "build":
            src = source.path / source.members["image"]
            facts = fs_facts(src)
            _copy_whole_fs(src, 0, facts, image, os.path.getsize(src))
            for role in ("kernel", "ramdisk", "loader"):
                if role in source.members:
                    extras[role] = work / Path(source.members[role]).name
                    shutil.copyfile(source.path / source.members[role], extras[role])
        else:
            raise BakeError(f"{source.path}: unknown kind of base {source.kind!r}")
        facts = fs_facts(image)
    except BaseException:
        for p in [image, *extras.values()]:
            p.unlink(missing_ok=True)
        raise
    return Unpacked(image, extras.get("kernel"), extras.get("ramdisk"), extras.get("loader"), chosen, facts)


def _copy_whole_fs(src: Path, offset: int, facts: FsFacts, dst: Path, available: int) -> None:
    if facts.size > available:
        raise BakeError(f"{src}: its {facts.type} filesystem is {facts.size} bytes but only {available} are there "
                        "(a truncated image or a partition smaller than its filesystem)")
    _copy_range(src, offset, facts.size, dst)


def _cut_to_fs(image: Path, tarball: Path, member: str) -> None:
    facts = facts_at(image)
    if facts is None:
        raise BakeError(f"{tarball}: its image {member} is no bare ext2/ext3/ext4 filesystem (a disk image "
                        "in a tarball is not a UEC image: unpack it and give the disk image as the base)")
    have = os.path.getsize(image)
    if facts.size > have:
        raise BakeError(f"{tarball}: the {facts.type} filesystem in {member} is {facts.size} bytes but the "
                        f"member holds only {have} (a truncated image)")
    os.truncate(image, facts.size)
