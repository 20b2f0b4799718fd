"""Disks laid out the way a Eucalyptus KVM node controller lays them out.

The node builds one MBR disk per instance: partition 1 is the image's partition image,
partition 2 an ephemeral ext3 filesystem, partition 3 swap (m1.small: 5 GB in all).
Here the disk is assembled once per build as a sparse raw file (the MBR written by
sfdisk on the file, the image placed with `dd conv=sparse`, no loop device and no
partition scanning) and each instance boots a qcow2 overlay of it, so an instance's
writes never reach the build's files.

A verification may also ask for free space right after partition 1 (`free_after_root`):
growpart, which an image's growroot runs at boot, grows a partition only up to the
start of the next one, so the gap sits between partition 1 and the ephemeral partition,
and partition 1 stays exactly the image's size. The partitions keep their numbers
(vda2 ephemeral, vda3 swap), so the metadata's block-device-mapping holds for both
layouts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from builder.core import sh
from builder.core.errors import BakeError

MiB = 1 << 20
GiB = 1 << 30
FIRST_SECTOR = 2048  # 1 MiB alignment, as parted and sfdisk do


@dataclass(frozen=True)
class InstanceType:
    """CPUs, memory and disk of an instance type (Eucalyptus 3.3+ defaults)."""

    name: str
    cpus: int
    memory_mib: int
    disk_gib: int
    swap_mib: int = 512


INSTANCE_TYPES = {
    t.name: t
    for t in (
        InstanceType("m1.small", 1, 256, 5),
        InstanceType("c1.medium", 2, 512, 10),
    )
}


def instance_type(name: str) -> InstanceType:
    """The instance type called `name`; a BakeError lists the known ones."""
    try:
        return INSTANCE_TYPES[name]
    except KeyError:
        raise BakeError(f"unknown instance type {name!r}; known: {', '.join(INSTANCE_TYPES)}") from None


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def node_disk_name(itype: InstanceType, free_after_root: int = 0) -> str:
    """The file name of the node disk for `itype` with `free_after_root` bytes of free
    space after partition 1: one name per layout, so that a cached disk of one layout is
    never taken for the other."""
    if free_after_root <= 0:
        return f"disk-{itype.name}.raw"
    return f"disk-{itype.name}-free{_round_up(free_after_root, MiB) // MiB}M.raw"


def node_disk(image: Path, dest: Path, itype: InstanceType, *, free_after_root: int = 0) -> Path:
    """Assemble (or reuse) the node-style disk of `image` at `dest` (a sparse raw file).

    With `free_after_root` (bytes, rounded up to whole MiB), that much unpartitioned
    space follows partition 1, and the ephemeral and swap partitions come after it; the
    disk is then larger than the instance type's when the type's size cannot hold it.

    Reused when `dest` was made from the same image file (size and modification time)
    for the same instance type and free space; otherwise rebuilt.
    """
    image = Path(image)
    st = image.stat()
    gap = _round_up(max(free_after_root, 0), MiB)
    stamp = {"image": str(image.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "type": itype.name}
    if gap:
        stamp["free_after_root"] = gap
    stamp_file = dest.with_suffix(dest.suffix + ".json")
    if dest.exists() and stamp_file.exists():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return dest
        except ValueError:
            pass
    sh.require("sfdisk", "mke2fs", "mkswap", "dd")
    root_bytes = _round_up(st.st_size, MiB)
    swap_bytes = itype.swap_mib * MiB
    total = max(itype.disk_gib * GiB, root_bytes + gap + swap_bytes + 64 * MiB + FIRST_SECTOR * 512)
    eph_bytes = total - FIRST_SECTOR * 512 - root_bytes - gap - swap_bytes
    eph_bytes -= eph_bytes % MiB
    root_start = FIRST_SECTOR * 512
    eph_start = root_start + root_bytes + gap
    swap_start = eph_start + eph_bytes
    size = swap_start + swap_bytes

    tmp = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)
    try:
        tmp.unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            f.truncate(size)
        table = (
            "label: dos\n"
            f"start={root_start // 512}, size={root_bytes // 512}, type=83\n"
            f"start={eph_start // 512}, size={eph_bytes // 512}, type=83\n"
            f"start={swap_start // 512}, size={swap_bytes // 512}, type=82\n"
        )
        sh.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", tmp], input=table,
               what="writing the MBR of the instance disk", quiet=True)
        sh.run(["dd", f"if={image}", f"of={tmp}", "bs=1M", f"seek={root_start // MiB}", "conv=sparse,notrunc",
                "status=none"], what="placing the partition image in partition 1", quiet=True)
        sh.run(["mke2fs", "-q", "-F", "-t", "ext3", "-L", "ephemeral0", "-E", f"offset={eph_start}", tmp,
                f"{eph_bytes // 1024}k"], what="making the ephemeral ext3 filesystem (partition 2)", quiet=True)
        swap = dest.with_name(dest.name + ".swap")
        try:
            with open(swap, "wb") as f:
                f.truncate(swap_bytes)
            sh.run(["mkswap", "-L", "swap", swap], what="making the swap partition (partition 3)", quiet=True)
            sh.run(["dd", f"if={swap}", f"of={tmp}", "bs=1M", f"seek={swap_start // MiB}", "count=1",
                    "conv=notrunc", "status=none"], quiet=True)
        finally:
            swap.unlink(missing_ok=True)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    stamp_file.write_text(json.dumps(stamp))
    return dest


def overlay(base: Path, dest: Path) -> Path:
    """A copy-on-write qcow2 overlay of `base` at `dest`: what one instance writes to."""
    sh.require("qemu-img")
    sh.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", os.fspath(Path(base).resolve()), dest],
           what="creating the instance's copy-on-write overlay", quiet=True)
    return dest


def blank_volume(dest: Path, size_bytes: int, *, label: str | None = None, fstype: str = "ext4") -> Path:
    """A sparse raw volume of `size_bytes`, unformatted or with a labelled filesystem."""
    with open(dest, "wb") as f:
        f.truncate(size_bytes)
    if label is not None:
        sh.run(["mke2fs", "-q", "-F", "-t", fstype, "-L", label, dest], what=f"formatting volume {label}", quiet=True)
    return dest
