"""What a base image is and how bake gets its own copy of the bare filesystem out of it.

A base is one of: a bare ext2/3/4 filesystem image (a partition image, what bake
itself makes), a disk image with a partition table (raw, qcow2, vmdk or anything else
qemu-img reads), a UEC tarball (`NAME.img` with the kernel, ramdisk and loader beside
it), or a bake build folder. Everything here works on files with e2fsprogs, qemu-img and
sfdisk, so none of it needs root: nothing is mounted and no loop device is used.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from builder.core import sh
from builder.core.record import Build, sha256_file
from builder.core.errors import BakeError

KINDS = ("filesystem", "disk", "uec-tarball", "build")
ROLES = ("image", "kernel", "ramdisk", "loader")
IMAGE_NAME = "base.img"

MiB = 1024 * 1024
BLOCK = 4096            # granularity of the holes bake's copies get
CHUNK = 1 << 20

EXT_MAGIC_OFFSET = 1024 + 56
GZIP_MAGIC = b"\x1f\x8b"

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


@dataclass
class Partition:
    """A partition of a disk image (offsets in bytes) and the filesystem it holds."""

    number: int
    start: int
    size: int
    type: str
    fs: FsFacts | None
    has_root: bool


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
    if head[:2] == GZIP_MAGIC or _is_plain_tar(path):
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
    compressed = _is_gzip(path)
    members: dict[str, str] = {}
    try:
        with tarfile.open(path, "r|gz" if compressed else "r|") as tar:
            for m in tar:
                role = member_role(m.name)
                if role is None or not m.isfile():
                    continue
                if role in members:
                    raise BakeError(f"{path}: two members could be the {role}: {members[role]} and {m.name}")
                members[role] = m.name
    except (tarfile.TarError, EOFError, OSError) as e:
        what = "a gzip file that is not a whole tar archive" if compressed else "a damaged tar archive"
        raise BakeError(f"{path}: {what} ({e}); the base should be {WHAT_A_BASE_IS}") from None
    if "image" not in members:
        raise BakeError(f"{path}: a tarball without a partition image (no *.img member); a UEC tarball holds "
                        "NAME.img, NAME-vmlinuz-* and maybe NAME-initrd-* and NAME-loader")
    return Source(path, "uec-tarball", "tar.gz" if compressed else "tar", members)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _disk_format(path: Path) -> str | None:
    """qemu-img's name for the format of disk image `path`, None when it is no disk image
    (qemu-img calls anything it does not know "raw": a raw disk must have a partition
    table)."""
    r = sh.run(["qemu-img", "info", "-U", "--output=json", path], check=False, quiet=True)
    try:
        info = json.loads(r.output[r.output.index("{"):]) if r.returncode == 0 else {}
    except ValueError:      # no JSON object (a warning ahead of it is skipped)
        return None
    fmt = info.get("format")
    if fmt != "raw":
        return fmt
    return "raw" if _partition_table(path) is not None else None


def sha256_of(source: Source) -> str:
    """SHA-256 of the base: of the file given, or of a build folder's partition image."""
    if source.kind == "build":
        return sha256_file(source.path / source.members["image"])
    return sha256_file(source.path)


# --- ext filesystems, read with e2fsprogs -------------------------------------------

# Features an ext3 driver mounts (read-write) plus every compat feature: anything else
# makes a filesystem ext4, as blkid decides.
EXT3_FEATURES = {"has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "needs_recovery",
                 "meta_bg", "sparse_super", "large_file", "dir_prealloc", "imagic_inodes", "lazy_bg",
                 "exclude_bitmap", "sparse_super2", "journal_dev"}


@contextlib.contextmanager
def _e2name(path: Path, offset: int = 0) -> Iterator[str]:
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


def _facts_at(path: Path, offset: int = 0) -> FsFacts | None:
    with _e2name(path, offset) as name:
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
    facts = _facts_at(Path(image))
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
    with _e2name(Path(image)) as name:
        found = _resolve(name, path)
        if found is None or found[1] != "regular":
            return None
        return _dump(name, found[0])


_LS_LINE = re.compile(r"^/(\d+)/(\d+)/(\d+)/(\d+)/(.*)/(\d*)/$")


def list_dir(image: Path, path: str) -> list[str] | None:
    """The names in folder `path` of the ext filesystem `image` (symlinks followed inside
    the image), without . and ..; None if there is no such folder."""
    with _e2name(Path(image)) as name:
        found = _resolve(name, path)
        if found is None or found[1] != "directory":
            return None
        out = _debugfs(name, f"ls -p {_quote(found[0])}")
    names = [m.group(5) for m in map(_LS_LINE.match, out.splitlines()) if m]
    return sorted(n for n in names if n not in (".", ".."))


ROOT_MARKERS = ("/sbin/init", "/usr/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd", "/bin/sh")


def _holds_root(name: str) -> bool:
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


# --- disks --------------------------------------------------------------------------

def _partition_table(raw: Path) -> dict | None:
    """sfdisk's reading of the partition table of `raw`, None when it finds none."""
    r = sh.run(["sfdisk", "-J", raw], check=False, quiet=True)
    if r.returncode != 0 or "{" not in r.output:
        return None
    try:
        return json.loads(r.output[r.output.index("{"):])["partitiontable"]
    except (ValueError, KeyError):
        return None


@contextlib.contextmanager
def _raw_disk(disk: Path, fmt: str, work: Path) -> Iterator[Path]:
    """The disk as a raw file: itself when raw, else a sparse conversion under `work`,
    removed on exit."""
    if fmt == "raw":
        yield Path(disk)
        return
    work.mkdir(parents=True, exist_ok=True)
    raw = work / f"{Path(disk).name}.raw.tmp"
    try:
        sh.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", disk, raw],
               what=f"converting {disk} ({fmt}) to a raw disk")
        yield raw
    finally:
        raw.unlink(missing_ok=True)


def _partitions_of_raw(raw: Path, disk: Path) -> list[Partition]:
    table = _partition_table(raw)
    if table is None:
        # a disk image of a bare filesystem (some clouds take those): the whole disk, as number 0
        facts = _facts_at(raw)
        if facts is None:
            raise BakeError(f"{disk}: neither a partition table (MBR or GPT) nor an ext filesystem on the disk")
        with _e2name(raw) as name:
            return [Partition(0, 0, os.path.getsize(raw), "", facts, _holds_root(name))]
    sector = int(table.get("sectorsize", 512))
    found = []
    for p in table.get("partitions", []):
        m = re.search(r"(\d+)$", p.get("node", ""))
        if not m or not p.get("size"):
            continue
        start, size = int(p["start"]) * sector, int(p["size"]) * sector
        facts = _facts_at(raw, start)
        has_root = False
        if facts is not None:
            with _e2name(raw, start) as name:
                has_root = _holds_root(name)
        found.append(Partition(int(m.group(1)), start, size, str(p.get("type", "")), facts, has_root))
    return found


def partitions(disk: Path, fmt: str, work: Path) -> list[Partition]:
    """The partitions of disk image `disk` (qemu-img format `fmt`; MBR or GPT), each with
    the ext filesystem it holds and whether that holds a root tree. A disk that is not
    raw is converted to a sparse raw file under `work` for the reading and that removed.
    A disk with no partition table whose whole content is an ext filesystem has one
    partition, number 0, the whole disk."""
    with _raw_disk(disk, fmt, work) as raw:
        return _partitions_of_raw(raw, disk)


def describe(p: Partition) -> str:
    """"2 (ext4 'uec-rootfs', 1024 MiB, root tree)" — for messages naming candidates."""
    if p.fs is None:
        return f"{p.number} (no ext filesystem, {p.size // MiB} MiB)"
    label = f" '{p.fs.label}'" if p.fs.label else " (no label)"
    return f"{p.number} ({p.fs.type}{label}, {p.fs.size // MiB} MiB{', root tree' if p.has_root else ''})"


class NoRootPartition(BakeError):
    """No partition of a disk holds an ext root tree the host can read (it may be on LVM)."""


def choose_partition(disk: Path, parts: list[Partition], wanted: int | str) -> Partition:
    """The partition `wanted` names: a number, a filesystem label, or "auto" for the only
    one holding a root tree; a BakeError naming the partitions otherwise."""
    listing = "; ".join(describe(p) for p in parts) or "none"
    hint = "name one in the recipe's base as `partition: NUMBER` or `partition: LABEL`"
    if wanted == "auto":
        roots = [p for p in parts if p.has_root]
        if len(roots) == 1:
            return roots[0]
        if not roots:
            raise NoRootPartition(f"{disk}: no partition holds a root tree (/etc and an init or /bin/sh); "
                                  f"its partitions: {listing}")
        raise BakeError(f"{disk}: {len(roots)} partitions hold a root tree: "
                        f"{'; '.join(describe(p) for p in roots)}; {hint}")
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        chosen = [p for p in parts if p.number == wanted]
        what = f"no partition {wanted}"
    else:
        chosen = [p for p in parts if p.fs is not None and p.fs.label == wanted]
        what = f"no partition's filesystem is labelled {wanted!r}"
        if len(chosen) > 1:
            raise BakeError(f"{disk}: {len(chosen)} filesystems are labelled {wanted!r}: "
                            f"{'; '.join(describe(p) for p in chosen)}; name one by number")
    if not chosen:
        raise BakeError(f"{disk}: {what}; its partitions: {listing}")
    if chosen[0].fs is None:
        raise BakeError(f"{disk}: partition {chosen[0].number} holds no ext filesystem; its partitions: {listing}")
    return chosen[0]


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


def _extract_members(tarball: Path, wanted: dict[str, Path]) -> None:
    """Write members `wanted` (name -> file) of `tarball`, sparse, in one pass over it
    (a compressed tarball cannot be read out of order cheaply)."""
    left = dict(wanted)
    try:
        with tarfile.open(tarball, "r|*") as tar:
            for m in tar:
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
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BakeError(f"{tarball}: the tarball could not be read to its end ({e})") from None
    if left:
        raise BakeError(f"{tarball}: member(s) {', '.join(sorted(left))} missing from the tarball")


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
            with _raw_disk(source.path, source.format, work) as raw:
                chosen = choose_partition(source.path, _partitions_of_raw(raw, source.path), partition)
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
    facts = _facts_at(image)
    if facts is None:
        raise BakeError(f"{tarball}: its image {member} is no bare ext2/ext3/ext4 filesystem (a disk image "
                        "in a tarball is not a UEC image: unpack it and give the disk image as the base)")
    have = os.path.getsize(image)
    if facts.size > have:
        raise BakeError(f"{tarball}: the {facts.type} filesystem in {member} is {facts.size} bytes but the "
                        f"member holds only {have} (a truncated image)")
    os.truncate(image, facts.size)
