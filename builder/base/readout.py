"""What bake reads out of an image through the libguestfs appliance (`appliance`):
`inspect` (distribution, release, kernels, filesystem), `extract_tree` (the root tree,
exactly), `boot_files` (a kernel and its initrd) and `root_filesystem` (a root the host
cannot reach, e.g. on LVM).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from builder.base import diskinfo
from builder.base.appliance import ERROR_TAIL, WAKE, ApplianceError, Handle, doing, opened, version_key
from builder.base.holes import data_layout, restore_holes
from builder.core import sh
from builder.core.cache import TAR_FLAGS
from builder.core.errors import BakeError
from builder.core.interrupts import deferred

log = logging.getLogger("bake.base")


# --- inspection -----------------------------------------------------------------------

def _key_values(text: str) -> dict[str, str]:
    """KEY=value lines (os-release, lsb-release), quotes removed."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            out[key] = value
    return out


def _read_release(g: Handle) -> dict[str, str]:
    """/etc/os-release (or /usr/lib/os-release) with /etc/lsb-release's DISTRIB_* beside it."""
    facts: dict[str, str] = {}
    for path in ("/etc/lsb-release", "/usr/lib/os-release", "/etc/os-release"):
        if g.is_file(path, followsymlinks=True):
            facts.update(_key_values(g.cat(path)))
    return facts


def _init_system(g: Handle) -> str | None:
    """As the chroot path tells it (`customize.detect_init_system`), None for neither."""
    if g.exists("/sbin/initctl") or g.exists("/sbin/initctl.distrib"):
        return "upstart"
    if g.exists("/lib/systemd/systemd") or g.exists("/usr/lib/systemd/systemd"):
        return "systemd"
    return None


def _kernels(g: Handle) -> list[str]:
    if not g.is_dir("/boot", followsymlinks=True):
        return []
    versions = [n.removeprefix("vmlinuz-") for n in g.ls("/boot") if n.startswith("vmlinuz-")]
    return sorted(versions, key=version_key)


def inspect(image: Path) -> dict:
    """What the bare filesystem image `image` holds, by libguestfs's inspection and its
    superblock: distro, version ("12", "10.04"), codename, product, package_format,
    package_management, kernels (the versions of /boot/vmlinuz-*, oldest first), fs_type,
    label, uuid, init_system ("systemd", "upstart" or None) and arch. An image that
    inspection does not take for a root (it looks for /etc/fstab or /etc/hosts) is
    described from its os-release alone; one with neither is a BakeError."""
    image = Path(image)
    with opened([image], mount=False) as g, doing(f"inspecting {image.name}"):
        device = g.list_devices()[0]
        roots = g.inspect_os()
        facts: dict[str, Any] = {"distro": None, "version": None, "codename": None, "product": None,
                                 "package_format": None, "package_management": None, "arch": None}
        major = minor = None
        if roots:
            root = roots[0]
            unknown = lambda v: None if v in ("unknown", "") else v  # noqa: E731
            facts.update(distro=unknown(g.inspect_get_distro(root)),
                         product=unknown(g.inspect_get_product_name(root)),
                         package_format=unknown(g.inspect_get_package_format(root)),
                         package_management=unknown(g.inspect_get_package_management(root)),
                         arch=unknown(g.inspect_get_arch(root)))
            major, minor = g.inspect_get_major_version(root), g.inspect_get_minor_version(root)
            g.mount_ro(root, "/")
        else:
            g.mount_ro(device, "/")
        release = _read_release(g)
        if not roots and not release:
            raise BakeError(f"{image}: no operating system found in it (no /etc/os-release, no /etc/lsb-release)")
        facts["distro"] = facts["distro"] or (release.get("ID") or release.get("DISTRIB_ID", "")).lower() or None
        facts["product"] = facts["product"] or release.get("PRETTY_NAME") or release.get("DISTRIB_DESCRIPTION")
        facts["version"] = release.get("VERSION_ID") or release.get("DISTRIB_RELEASE") or _version(
            facts["distro"], major, minor)
        in_version = re.search(r"\(([a-z]+)\)", release.get("VERSION", ""))
        facts["codename"] = (release.get("VERSION_CODENAME") or release.get("UBUNTU_CODENAME")
                             or release.get("DISTRIB_CODENAME") or (in_version.group(1) if in_version else None))
        facts["kernels"] = _kernels(g)
        facts["init_system"] = _init_system(g)
        facts["fs_type"] = g.vfs_type(device)
        facts["label"] = g.vfs_label(device)
        facts["uuid"] = g.vfs_uuid(device)
    return facts


def _version(distro: str | None, major: int | None, minor: int | None) -> str | None:
    if not major:
        return None
    if distro == "ubuntu":
        return f"{major}.{minor or 0:02d}"
    return f"{major}.{minor}" if minor else str(major)


# --- the root tree --------------------------------------------------------------------

def extract_tree(image: Path, tree: Path) -> None:
    """Copy the root tree of the bare filesystem image `image` into `tree` (made; it must
    be absent or empty) through libguestfs, exactly: numeric owners, modes, xattrs of
    every namespace (file capabilities too), ACLs, hard links, device nodes, fifos and
    holes. The filesystem's own lost+found is left out. Needs root (owners and device
    nodes are made on the host), but not a loop device or a mount.

    The tree comes out through `tar_out`, which writes sparse files in full; where an
    ext2/3/4 image has holes (debugfs reads its extent maps, no mount needed) they are
    punched again on the host, so the tree's files hold data exactly where the image's
    do. For another filesystem the holes are lost (a warning says so)."""
    image, tree = Path(image), Path(tree)
    if os.geteuid() != 0:
        raise BakeError("copying a base image's tree out needs root: its owners and device nodes are made on the host")
    if tree.exists() and (not tree.is_dir() or any(tree.iterdir())):
        raise BakeError(f"{tree}: the base's tree goes into a new or empty folder, and this is not one")
    layout = data_layout(image)
    tree.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with opened([image]) as g, doing(f"copying the root tree of {image.name} out of the appliance"):
        _tar_out(g, tree)
    holes = restore_holes(tree, layout) if layout is not None else 0
    log.info("root tree of %s copied out in %.1f s (%d file(s) with holes)", image.name, time.monotonic() - start,
             holes)


def _tar_out(g: Handle, tree: Path) -> None:
    """`tar_out` of the image's / streamed through a pipe into `tar -x` in `tree`."""
    extract = ["tar", *TAR_FLAGS, "--same-owner", "--same-permissions", "-C", str(tree), "-xf", "-"]
    with tempfile.TemporaryFile() as err:
        r, w = os.pipe()
        try:
            with sh.background(extract, stdin=r, stderr=err) as tar:
                os.close(r)
                r = -1
                failure: ApplianceError | None = None
                try:
                    g.tar_out("/", f"/dev/fd/{w}", numericowner=True, xattrs=True, acls=True,
                              excludes=["./lost+found"])
                except ApplianceError as e:
                    failure = e
                os.close(w)
                w = -1
                while True:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        tar.wait(WAKE)
                        break
        finally:
            with deferred():
                for fd in (r, w):
                    if fd >= 0:
                        os.close(fd)
        # tar's own words first: libguestfs only says the pipe broke
        if tar.returncode != 0:
            err.seek(0)
            tail = err.read()[-ERROR_TAIL:].decode(errors="replace")
            raise sh.CommandError(extract, tar.returncode, tail, "unpacking the tree that libguestfs's tar_out sent")
        if failure is not None:
            raise failure


# --- boot files -----------------------------------------------------------------------

def boot_files(image: Path, dest: Path, version: str | None = None) -> tuple[Path, Path | None, str]:
    """Copy /boot/vmlinuz-VERSION and /boot/initrd.img-VERSION out of the bare filesystem
    image `image` into folder `dest` (made) under those names. Without `version`: the
    newest kernel that has an initrd (the newest kernel when none has). Returns (kernel,
    ramdisk or None, version); a BakeError when there is no such kernel."""
    image, dest = Path(image), Path(dest)
    with opened([image]) as g, doing(f"copying the kernel out of {image.name}"):
        names = g.ls("/boot") if g.is_dir("/boot", followsymlinks=True) else []
        kernels = [n.removeprefix("vmlinuz-") for n in names if n.startswith("vmlinuz-")]
        initrds = {n.removeprefix("initrd.img-") for n in names if n.startswith("initrd.img-")}
        if version is None:
            if not kernels:
                raise BakeError(f"{image}: no kernel in its /boot (no /boot/vmlinuz-*)")
            version = max([v for v in kernels if v in initrds] or kernels, key=version_key)
        elif version not in kernels:
            raise BakeError(f"{image}: no /boot/vmlinuz-{version} in it (kernels there: "
                            f"{', '.join(sorted(kernels, key=version_key)) or 'none'})")
        dest.mkdir(parents=True, exist_ok=True)
        kernel = dest / f"vmlinuz-{version}"
        g.download(f"/boot/vmlinuz-{version}", str(kernel))
        ramdisk = None
        if version in initrds:
            ramdisk = dest / f"initrd.img-{version}"
            g.download(f"/boot/initrd.img-{version}", str(ramdisk))
    return kernel, ramdisk, version


# --- layouts the host cannot read -----------------------------------------------------

def root_filesystem(disk: Path, fmt: str, dest: Path) -> str:
    """The root filesystem of `disk` (QEMU format `fmt`) where the host cannot reach it
    (a root on LVM: no device-mapper is needed here), found by libguestfs's inspection
    and copied to `dest`; returns its device in the appliance (e.g. /dev/vg0/root).
    `dest` is then made sparse on the host (`fallocate --dig-holes`). The disk is
    checked again first (`diskinfo.require`): libguestfs is told its format."""
    diskinfo.require(disk, fmt)
    with opened([Path(disk)], readonly=True, mount=False, fmt=fmt) as g:
        with doing(f"looking for the root filesystem of {Path(disk).name}"):
            roots = g.inspect_os()
        if len(roots) != 1:
            found = ", ".join(roots) or "none"
            raise BakeError(f"{disk}: libguestfs's inspection finds {len(roots)} operating system roots ({found}); "
                            "bake takes a base with exactly one")
        root = roots[0]
        with doing(f"copying {root} out of {Path(disk).name}"):
            g.download(root, str(dest))
    sh.run(["fallocate", "--dig-holes", str(dest)], what="making the copied filesystem sparse")
    return root
