"""Stage image: the partition image (a bare filesystem, no partition table), the kernel
and the ramdisk: the trio a Eucalyptus node boots.

The filesystem is made from the root tree with `mkfs -d` (no loop mount), with the
features the distribution profile says the target's kernel and e2fsck understand.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from builder.core import sh
from builder.core.record import Build
from builder.core.errors import BakeError
from builder.core.log import step
from builder.recipe.recipe import Recipe

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


def newest_kernel(root: Path) -> str:
    """The version of the newest kernel in /boot that has an initrd."""
    versions = []
    for k in (root / "boot").glob("vmlinuz-*"):
        v = k.name[len("vmlinuz-"):]
        if (root / "boot" / f"initrd.img-{v}").exists():
            versions.append(v)
    if not versions:
        raise BakeError(f"no kernel with an initrd in {root}/boot: did the kernel package install?")

    def vkey(v: str):
        return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", v)]
    return sorted(versions, key=vkey)[-1]


def package_list(root: Path) -> list[dict[str, str]]:
    """The packages installed in the tree at `root`: name, version, architecture and the
    Debian source package each was built from (with the source's version where it
    differs from the binary's, as for binNMUs and packages like the kernel's)."""
    out = sh.output(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
                     "-f", "${Package}\t${Version}\t${Architecture}\t${db:Status-Abbrev}\t"
                           "${source:Package}\t${source:Version}\n"])
    pkgs = []
    for line in out.splitlines():
        name, version, arch, status, source, source_version = (line.split("\t") + [""] * 6)[:6]
        if status.startswith("ii"):
            pkg = {"name": name, "version": version, "arch": arch, "source": source or name}
            if source_version and source_version != version:
                pkg["source_version"] = source_version
            pkgs.append(pkg)
    return pkgs


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


def _take_source_boot(root: Path, dest: Path) -> tuple[Path, Path, str] | None:
    """The kernel and ramdisk a base image came with (`base.kernel: from-source`), moved
    out of the tree into `dest`: (kernel, ramdisk, version), else None."""
    from builder.pipeline.stages.baseimage import SOURCE_BOOT, source_kernel_of
    from builder.base.source import kernel_version
    found = source_kernel_of(root)
    if found is None:
        shutil.rmtree(root / SOURCE_BOOT, ignore_errors=True)
        return None
    version = kernel_version(found[0]) or "source"
    kernel, ramdisk = dest / f"vmlinuz-{version}", dest / f"initrd.img-{version}"
    shutil.move(str(found[0]), kernel)
    shutil.move(str(found[1]), ramdisk)
    shutil.rmtree(root / SOURCE_BOOT)
    return kernel, ramdisk, version


def run(build: Build, recipe: Recipe, root: Path) -> dict:
    """Write kernel, ramdisk and partition image into the build directory."""
    start = time.monotonic()
    d = recipe.data
    fs = d["filesystem"]
    sh.require(f"mkfs.{fs}", "e2fsck")
    with step(f"Image: {fs} partition image, kernel, ramdisk"):
        source_boot = _take_source_boot(root, build.dir)
        content, inodes = tree_usage(root)
        size = parse_size(d["size"]) if d["size"] != "auto" else auto_size(content, inodes, parse_size(d["headroom"]))
        if size < content:
            raise BakeError(f"size {d['size']} is smaller than the image's content ({content // MiB} MiB); "
                            "raise `size` or use `size: auto`")
        image = build.dir / f"{recipe.name}.img"
        features = recipe.profile.mkfs_features(fs)
        make_filesystem(root, image, fs=fs, label=d["label"], size=size, features=features, inodes=inodes)
        if source_boot:
            kernel, ramdisk, version = source_boot
        else:
            version = newest_kernel(root)
            kernel = build.dir / f"vmlinuz-{version}"
            ramdisk = build.dir / f"initrd.img-{version}"
            shutil.copyfile(root / "boot" / f"vmlinuz-{version}", kernel)
            shutil.copyfile(root / "boot" / f"initrd.img-{version}", ramdisk)
        for p in (image, kernel, ramdisk):
            p.chmod(0o644)
        build.record_output("kernel", kernel)
        build.record_output("ramdisk", ramdisk)
        build.record_output("image", image)
        build.set("kernel_version", version)
        build.set("packages", package_list(root))
        build.set("filesystem", {"type": fs, "label": d["label"], "size": size, "features": features,
                                 "content_bytes": content, "inodes_used": inodes})
    build.record_stage("image", seconds=round(time.monotonic() - start, 2))
    return build.data["outputs"]
