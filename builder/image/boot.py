"""What boots an image: its kernel and ramdisk (from the tree's /boot, or those the base
image came with), and the packages the tree holds, as build.json records them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from builder.base.source import kernel_version
from builder.core import sh
from builder.core.errors import BakeError
from builder.core.removal import remove_tree

SOURCE_BOOT = ".bake-source-boot"   # the source's own kernel and ramdisk travel with the tree, until the image stage


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
                     "-f", ("${Package}\t${Version}\t${Architecture}\t${db:Status-Abbrev}\t"
                            "${source:Package}\t${source:Version}\n")])
    pkgs = []
    for line in out.splitlines():
        name, version, arch, status, source, source_version = (line.split("\t") + [""] * 6)[:6]
        if status.startswith("ii"):
            pkg = {"name": name, "version": version, "arch": arch, "source": source or name}
            if source_version and source_version != version:
                pkg["source_version"] = source_version
            pkgs.append(pkg)
    return pkgs


def dpkg_status_packages(status: str) -> list[dict[str, str]]:
    """The installed packages a dpkg status file lists (name, version, architecture,
    source), as the image stage records them."""
    pkgs = []
    for para in status.split("\n\n"):
        fields: dict[str, str] = {}
        for line in para.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            k, v = line.split(":", 1)
            fields[k] = v.strip()
        if fields.get("Package") and fields.get("Status", "").endswith(" installed"):
            src = fields.get("Source", fields["Package"])
            m = re.fullmatch(r"(\S+)(?: \((\S+)\))?", src)
            pkg = {"name": fields["Package"], "version": fields.get("Version", ""),
                   "arch": fields.get("Architecture", ""), "source": m.group(1) if m else src}
            if m and m.group(2) and m.group(2) != pkg["version"]:
                pkg["source_version"] = m.group(2)
            pkgs.append(pkg)
    return sorted(pkgs, key=lambda p: p["name"])


def source_kernel_of(root: Path) -> tuple[Path, Path] | None:
    """The source's own kernel and ramdisk carried in the tree (`kernel: from-source`)."""
    keep = root / SOURCE_BOOT
    if (keep / "kernel").is_file() and (keep / "ramdisk").is_file():
        return keep / "kernel", keep / "ramdisk"
    return None


def take_source_boot(root: Path, dest: Path) -> tuple[Path, Path, str] | None:
    """The kernel and ramdisk a base image came with (`base.kernel: from-source`), moved
    out of the tree into `dest`: (kernel, ramdisk, version), else None."""
    found = source_kernel_of(root)
    if found is None:
        remove_tree(root / SOURCE_BOOT, ignore_errors=True)
        return None
    version = kernel_version(found[0]) or "source"
    kernel, ramdisk = dest / f"vmlinuz-{version}", dest / f"initrd.img-{version}"
    shutil.move(str(found[0]), kernel)
    shutil.move(str(found[1]), ramdisk)
    remove_tree(root / SOURCE_BOOT)
    return kernel, ramdisk, version
