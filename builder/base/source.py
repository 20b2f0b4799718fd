"""A recipe's base image: where it comes from, what it holds, what bake says of it.

The digest of the source is what keys the cache of its root tree. Hashing a gigabyte
takes seconds, and a bake plans twice, so digests are remembered for the process by the
file's identity (device, inode, size, modification time).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from builder.core.record import sha256_file
from builder.recipe.distro import distro_of_suite
from builder.core.errors import BakeError
from builder.recipe.recipe import Recipe
from .formats import identify, sha256_of

_digests: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file, remembered for the process while the file is unchanged."""
    st = os.stat(path)
    ident = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if ident not in _digests:
        _digests[ident] = sha256_file(path)
    return _digests[ident]


def source_digest(recipe: Recipe) -> str:
    """What identifies the recipe's base: the pinned SHA-256, else the image's own (a
    build folder's partition image), else `emi:<id>` for an image in the cloud."""
    b = recipe.base or {}
    if b.get("emi"):
        return f"emi:{b['emi']}"
    if b.get("sha256"):
        return b["sha256"]
    path = recipe.base_image
    if path is None:
        raise BakeError("the recipe's base names no image, emi or sha256")
    if path.is_dir():
        return sha256_of(identify(path))
    return file_digest(path)


# --- what release an image is -----------------------------------------------------------

DEBIAN_MAJOR = {"8": "jessie", "9": "stretch", "10": "buster", "11": "bullseye", "12": "bookworm",
                "13": "trixie", "14": "forky"}
UBUNTU_VERSION = {"10.04": "lucid", "10.10": "maverick", "11.04": "natty", "11.10": "oneiric",
                  "12.04": "precise", "12.10": "quantal", "13.04": "raring", "13.10": "saucy",
                  "14.04": "trusty", "14.10": "utopic", "15.04": "vivid", "15.10": "wily",
                  "16.04": "xenial", "18.04": "bionic", "20.04": "focal", "22.04": "jammy",
                  "24.04": "noble"}


def _keyvals(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Z_]+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip().strip('"').strip("'")
    return out


def release_of(os_release: str | None, lsb_release: str | None, debian_version: str | None) -> tuple[str, str] | None:
    """(distro, code name) from an image's /etc/os-release, /etc/lsb-release (Lucid has
    no os-release) and /etc/debian_version, in that order of trust; None when they do
    not say. Debian's testing and sid say only 'trixie/sid'-style names in
    debian_version: the first name is taken."""
    if os_release:
        kv = _keyvals(os_release)
        distro = kv.get("ID", "").lower()
        code = kv.get("VERSION_CODENAME") or kv.get("UBUNTU_CODENAME")
        if not code:
            m = re.search(r"\(([a-z]+)\)", kv.get("VERSION", ""))
            code = m.group(1) if m else None
        if not code and distro == "debian":
            code = DEBIAN_MAJOR.get(kv.get("VERSION_ID", ""))
        if distro in ("debian", "ubuntu") and code:
            return distro, code.lower()
    if lsb_release:
        kv = _keyvals(lsb_release)
        code = kv.get("DISTRIB_CODENAME") or UBUNTU_VERSION.get(kv.get("DISTRIB_RELEASE", ""))
        if kv.get("DISTRIB_ID", "").lower() in ("ubuntu", "debian") and code:
            return kv["DISTRIB_ID"].lower(), code.lower()
    if debian_version:
        v = debian_version.strip()
        major = v.split(".")[0]
        if major in DEBIAN_MAJOR:
            return "debian", DEBIAN_MAJOR[major]
        name = v.split("/")[0]
        if distro_of_suite(name) == "debian":
            return "debian", name
    return None


def check_release(recipe: Recipe, found: tuple[str, str] | None, what: str) -> None:
    """A BakeError when the image at `what` is not the release the recipe names."""
    want = (recipe.release.distro, recipe.release.suite)
    if found is None:
        raise BakeError(f"{what}: cannot tell which release it is (no /etc/os-release, /etc/lsb-release or "
                        f"/etc/debian_version naming one); the recipe says {recipe.data['release']}")
    if found != want and not (want[0] == "debian" and want[1] in ("sid", "unstable", "testing")
                              and found[0] == "debian"):
        raise BakeError(f"{what} is {found[0]}/{found[1]}, but the recipe says release: {recipe.data['release']}; "
                        f"set release: {found[0]}/{found[1]} (the image's own release) or start from another image")


def kernel_version(path: Path) -> str | None:
    """The version a Linux bzImage announces in its setup header (as `file` shows it),
    None for anything else."""
    with open(path, "rb") as f:
        head = f.read(0x10000)   # the setup code (and the version string in it) is at most 32 KiB
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    off = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    if off >= len(head):
        return None
    raw = head[off:off + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    return raw.split(" ", 1)[0] or None
