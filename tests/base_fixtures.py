"""Small real bases for tests: a root tree holding every kind of special file, its ext4
image, UEC tarballs around it and partitioned disks (raw, qcow2, vmdk) holding it.

Each builder writes under the folder it is given and returns the path it made; the
caller removes the folder (see `scratch`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import struct
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from builder.core import sh
from builder.recipe.distro import EXT3, EXT4_CURRENT
from builder.image.filesystem import make_filesystem, tree_usage

MiB = 1024 * 1024

# Owners no host account has: the copy must keep the numbers, not map names.
UID, GID = 24680, 13579
UID2, GID2 = 31337, 27182

OS_RELEASE = (b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
              b'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n')

# struct vfs_cap_data, revision 2, effective: cap_net_raw (13) permitted, as `setcap
# cap_net_raw+ep` writes it
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)

LONG_NAME = "a-file-with-a-name-long-enough-that-a-link-to-it-is-no-fast-symlink.txt"

SPARSE_SIZE = 8 * MiB
SPARSE_DATA = ((0, 64 * 1024), (5 * MiB, 192 * 1024))     # (offset, length) of its two data extents


@contextlib.contextmanager
def scratch(prefix: str = "bake-test-base-") -> Iterator[Path]:
    """A fresh folder on a filesystem that keeps xattrs, removed with all it holds on exit."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        sh.unmount_all_under(d)
        shutil.rmtree(d, ignore_errors=True)


def pattern(n: int, seed: int = 0) -> bytes:
    """`n` bytes without a zero byte (so no block of them reads as a hole), varying with
    `seed`."""
    base = bytes((i + seed) % 255 + 1 for i in range(255))
    return (base * (n // 255 + 1))[:n]


def _file(path: Path, data: bytes = b"", *, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)        # after chown, which clears setuid and setgid
    return path


def _dir(path: Path, *, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def special_tree(dest: Path) -> Path:
    """A small root tree at `dest` (made) holding every kind of file a copy could get
    wrong: setuid, setgid, sticky, a file capability, user and trusted xattrs, access
    and default ACLs, three names of one inode, device nodes, a fifo, a sparse file,
    symlinks (relative, absolute, dangling, through merged-/usr links), owners with no
    host account, an empty file and bookworm's /etc/os-release symlink."""
    dest = Path(dest)
    _dir(dest)
    for d in ("etc", "usr", "usr/bin", "usr/sbin", "usr/lib", "usr/lib/systemd", "usr/lib/modules", "var",
              "boot", "dev"):
        _dir(dest / d)
    # merged /usr, as bookworm has it: root markers are found through these links
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")):
        (dest / link).symlink_to(target)
    _file(dest / "usr/lib/os-release", OS_RELEASE)
    (dest / "etc/os-release").symlink_to("../usr/lib/os-release")
    _file(dest / "usr/bin/sh", b"#!fake shell\n", mode=0o755)
    _file(dest / "usr/lib/systemd/systemd", pattern(20000, 1), mode=0o755)
    (dest / "usr/sbin/init").symlink_to("/lib/systemd/systemd")
    _file(dest / "boot/vmlinuz-6.1.0-99-amd64", pattern(3000, 2))
    _file(dest / "boot/initrd.img-6.1.0-99-amd64", pattern(2000, 3))
    _dir(dest / "usr/lib/modules/6.1.0-99-amd64")

    _file(dest / "usr/bin/suid", pattern(5000, 4), mode=0o4755)
    _file(dest / "usr/bin/sgid", pattern(5000, 5), mode=0o2755, gid=GID)
    _dir(dest / "tmp", mode=0o1777)
    _dir(dest / "var/shared", mode=0o2775, gid=GID)
    ping = _file(dest / "usr/bin/ping", pattern(7000, 6), mode=0o755)
    os.setxattr(ping, "security.capability", CAPABILITY)

    xf = _file(dest / "etc/xattrs", b"has xattrs\n", uid=UID, gid=GID, mode=0o640)
    os.setxattr(xf, "user.comment", b"a user attribute")
    os.setxattr(xf, "user.binary", bytes(range(256)))
    os.setxattr(xf, "trusted.bake", b"trusted namespace")
    os.setxattr(dest / "var/shared", "user.folder", b"on a folder")

    acl = _file(dest / "etc/acl-file", b"acl\n", mode=0o640)
    sh.run(["setfacl", "-m", f"u:{UID}:rw-,g:{GID}:r--,m::rw-", acl], what="setting an ACL")
    acldir = _dir(dest / "var/acl-dir", mode=0o750)
    sh.run(["setfacl", "-m", f"u:{UID}:rwx", "-d", "-m", f"u:{UID}:r-x,g:{GID2}:rwx", acldir],
           what="setting a default ACL")

    hl = _file(dest / "usr/bin/linked", pattern(9000, 7), mode=0o755, uid=UID2, gid=GID2)
    os.link(hl, dest / "usr/bin/linked-too")
    os.link(hl, dest / "etc/linked-third")

    os.mknod(dest / "dev/ttyS0", 0o620 | stat.S_IFCHR, os.makedev(4, 64))
    os.chown(dest / "dev/ttyS0", 0, 5)
    os.chmod(dest / "dev/ttyS0", 0o620)     # mknod's mode goes through the umask
    os.mknod(dest / "dev/sdb1", 0o660 | stat.S_IFBLK, os.makedev(8, 17))
    os.chown(dest / "dev/sdb1", 0, 6)
    os.chmod(dest / "dev/sdb1", 0o660)
    os.mkfifo(dest / "var/fifo", 0o640)
    os.chmod(dest / "var/fifo", 0o640)

    sparse = dest / "var/sparse"
    with open(sparse, "wb") as f:
        for i, (offset, length) in enumerate(SPARSE_DATA):
            f.seek(offset)
            f.write(pattern(length, 10 + i))
        f.truncate(SPARSE_SIZE)
    _file(dest / "usr/lib/blob", pattern(MiB + 123, 8))

    (dest / "etc/dangling").symlink_to("/nonexistent/target")
    os.symlink("../usr/bin/linked", dest / "etc/owned-link")
    os.lchown(dest / "etc/owned-link", UID, GID)
    _dir(dest / "home/user", mode=0o700, uid=UID, gid=GID)
    _file(dest / "home/user/.profile", b"# profile\n", mode=0o600, uid=UID, gid=GID)
    _file(dest / "etc/empty", b"", mode=0o600)
    _file(dest / "etc/naïve name.txt", "ünïcode\n".encode())
    _file(dest / 'etc/say "hi"', b"quoted\n")
    # a target longer than 60 bytes is kept in a block of its own, not in the inode
    _file(dest / f"usr/lib/{LONG_NAME}", b"reached through a slow symlink\n")
    (dest / "etc/long-link").symlink_to(f"../usr/lib/{LONG_NAME}")
    return dest


def fs_image(tree: Path, dest: Path, label: str = "uec-rootfs", size: int = 64 * MiB, *,
             fs: str = "ext4", features: Sequence[str] | None = None) -> Path:
    """The ext filesystem image `dest` of `tree`, made as bake makes its own."""
    _, inodes = tree_usage(tree)
    if features is None:
        features = {"ext4": EXT4_CURRENT, "ext3": EXT3}.get(fs) or [f for f in EXT3 if f != "has_journal"]
    make_filesystem(Path(tree), Path(dest), fs=fs, label=label, size=size, features=list(features), inodes=inodes)
    return Path(dest)


def boot_file(name: str, role: str) -> bytes:
    """The contents `uec_tarball` gives the kernel, ramdisk or loader of tarball `name`."""
    return f"{role} of {name}\n".encode() + pattern(4000, len(role))


def uec_tarball(dest: Path, name: str, image: Path, *, initrd: bool = True, loader: bool = True) -> Path:
    """`dest/NAME.tar.gz` as Ubuntu published UEC images: NAME.img and NAME-vmlinuz-virtual
    (all Lucid had), with NAME-initrd-virtual, and NAME-loader and NAME-floppy as later
    releases added. Returns the tarball's path."""
    import io
    import tarfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{name}.tar.gz"
    members = [("kernel", f"{name}-vmlinuz-virtual")]
    if initrd:
        members.append(("ramdisk", f"{name}-initrd-virtual"))
    if loader:
        members += [("loader", f"{name}-loader"), ("floppy", f"{name}-floppy")]
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        tar.add(image, arcname=f"{name}.img")
        for role, member in members:
            data = boot_file(name, role)
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out


def raw_disk(images: Path | Sequence[Path], dest: Path, *, table: str = "dos",
             extra_partition_space: int = 8 * MiB) -> Path:
    """A raw disk `dest` with one partition per image (in order, from 1 MiB, 1 MiB
    aligned), each `extra_partition_space` larger than its image; the space past each
    filesystem is filled with bytes that are not zero, so a copy that does not stop at
    the filesystem's end shows."""
    images = [Path(images)] if isinstance(images, (str, os.PathLike)) else [Path(i) for i in images]
    starts, sizes = [], []
    pos = MiB
    for img in images:
        size = -(-(img.stat().st_size + extra_partition_space) // MiB) * MiB
        starts.append(pos)
        sizes.append(size)
        pos += size
    dest = Path(dest)
    with open(dest, "wb") as f:
        f.truncate(pos + MiB)       # room for GPT's backup header
    script = f"label: {table}\n" + "".join(f"start={s // 512}, size={n // 512}, type=L\n"
                                            for s, n in zip(starts, sizes))
    sh.run(["sfdisk", "-q", dest], input=script, what="partitioning the test disk")
    with open(dest, "r+b") as out:
        for img, start, size in zip(images, starts, sizes):
            with open(img, "rb") as src:
                out.seek(start)
                while chunk := src.read(MiB):
                    if chunk.count(0) == len(chunk):
                        out.seek(len(chunk), os.SEEK_CUR)
                    else:
                        out.write(chunk)
            slack = start + size - out.tell()
            out.write(pattern(slack, 99))
    return dest


def disk_image(images: Path | Sequence[Path], dest: Path, *, fmt: str = "qcow2", table: str = "dos",
               extra_partition_space: int = 8 * MiB) -> Path:
    """`raw_disk` converted by qemu-img to `fmt` (qcow2 compressed) as `dest`."""
    dest = Path(dest)
    if fmt == "raw":
        return raw_disk(images, dest, table=table, extra_partition_space=extra_partition_space)
    raw = dest.with_name(dest.name + ".raw")
    try:
        raw_disk(images, raw, table=table, extra_partition_space=extra_partition_space)
        sh.run(["qemu-img", "convert", *(["-c"] if fmt == "qcow2" else []), "-f", "raw", "-O", fmt, raw, dest],
               what=f"making the {fmt} test disk")
    finally:
        raw.unlink(missing_ok=True)
    return dest


def qcow2_disk(image: Path | Sequence[Path], dest: Path, *, extra_partition_space: int = 8 * MiB,
               table: str = "dos") -> Path:
    """A compressed qcow2 disk with an MBR (or `table="gpt"`) whose partition(s) hold
    `image`, each partition larger than its filesystem."""
    return disk_image(image, dest, fmt="qcow2", table=table, extra_partition_space=extra_partition_space)


def vmdk_disk(image: Path | Sequence[Path], dest: Path, *, extra_partition_space: int = 8 * MiB) -> Path:
    """As `qcow2_disk`, as a vmdk."""
    return disk_image(image, dest, fmt="vmdk", extra_partition_space=extra_partition_space)
