"""Disk images with a partition table (MBR or GPT, read with sfdisk; any format qemu-img
reads): their partitions, the ext filesystem each holds, and which one is a base's root."""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from builder.base import diskinfo
from builder.base.extfs import FsFacts, e2name, facts_at, holds_root
from builder.core import sh
from builder.core.errors import BakeError

MiB = 1024 * 1024


@dataclass
class Partition:
    """A partition of a disk image (offsets in bytes) and the filesystem it holds."""

    number: int
    start: int
    size: int
    type: str
    fs: FsFacts | None
    has_root: bool


def partition_table(raw: Path) -> dict | None:
    """sfdisk's reading of the partition table of `raw`, None when it finds none."""
    r = sh.run(["sfdisk", "-J", raw], check=False, quiet=True)
    if r.returncode != 0 or "{" not in r.output:
        return None
    try:
        return json.loads(r.output[r.output.index("{"):])["partitiontable"]
    except (ValueError, KeyError):
        return None


@contextlib.contextmanager
def raw_disk(disk: Path, fmt: str, work: Path) -> Iterator[Path]:
    """The disk as a raw file: itself when raw, else a sparse conversion under `work`,
    removed on exit. The disk is checked again first (`diskinfo.require`): QEMU is told
    its format and opens no backing file."""
    diskinfo.require(disk, fmt)
    if fmt == "raw":
        yield Path(disk)
        return
    work.mkdir(parents=True, exist_ok=True)
    raw = work / f"{Path(disk).name}.raw.tmp"
    try:
        sh.run(["qemu-img", "convert", "-U", *diskinfo.convert_source(disk, fmt), "-O", "raw", raw],
               what=f"converting {disk} ({fmt}) to a raw disk")
        yield raw
    finally:
        raw.unlink(missing_ok=True)


def partitions_of_raw(raw: Path, disk: Path) -> list[Partition]:
    """The partitions of `raw`, the raw form of disk image `disk` (see `partitions`)."""
    table = partition_table(raw)
    if table is None:
        # a disk image of a bare filesystem (some clouds take those): the whole disk, as number 0
        facts = facts_at(raw)
        if facts is None:
            raise BakeError(f"{disk}: neither a partition table (MBR or GPT) nor an ext filesystem on the disk")
        with e2name(raw) as name:
            return [Partition(0, 0, os.path.getsize(raw), "", facts, holds_root(name))]
    sector = int(table.get("sectorsize", 512))
    found = []
    for p in table.get("partitions", []):
        m = re.search(r"(\d+)$", p.get("node", ""))
        if not m or not p.get("size"):
            continue
        start, size = int(p["start"]) * sector, int(p["size"]) * sector
        facts = facts_at(raw, start)
        has_root = False
        if facts is not None:
            with e2name(raw, start) as name:
                has_root = holds_root(name)
        found.append(Partition(int(m.group(1)), start, size, str(p.get("type", "")), facts, has_root))
    return found


def partitions(disk: Path, fmt: str, work: Path) -> list[Partition]:
    """The partitions of disk image `disk` (qemu-img format `fmt`; MBR or GPT), each with
    the ext filesystem it holds and whether that holds a root tree. A disk that is not
    raw is converted to a sparse raw file under `work` for the reading and that removed.
    A disk with no partition table whose whole content is an ext filesystem has one
    partition, number 0, the whole disk."""
    with raw_disk(disk, fmt, work) as raw:
        return partitions_of_raw(raw, disk)


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
