"""What a bake was made from, by digest, as its record keeps it (`build.json` "inputs"):
the recipe file, each file or folder it copies into the image, bake's own version and
the versions of the build host's tools that shape the bytes. A release's provenance
statement names them (builder/operations/attest.py)."""

from __future__ import annotations

import hashlib
import os
import stat
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from builder.core import sh
from builder.core.record import sha256_file
from builder.recipe.recipe import Recipe

# Debian packages of the build host whose versions are recorded: they make the tree,
# the filesystem, the initramfs and the bundles.
HOST_TOOLS = ("debootstrap", "e2fsprogs", "qemu-utils", "dpkg", "initramfs-tools-core", "openssl", "libguestfs0")


def bake_version() -> str:
    try:
        return version("bake")
    except PackageNotFoundError:
        return "unknown"


def tree_digest(folder: Path) -> str:
    """A digest of a folder's contents: every entry below it, in sorted order, by its
    path, type, mode and content (a file's sha256, a link's target)."""
    h = hashlib.sha256()
    for here, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted([*dirs, *files]):
            p = Path(here) / name
            st = p.lstat()
            rel = p.relative_to(folder).as_posix()
            if stat.S_ISREG(st.st_mode):
                what = sha256_file(p)
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            else:
                what = ""
            h.update(f"{rel}\0{stat.S_IFMT(st.st_mode):o}\0{stat.S_IMODE(st.st_mode):o}\0{what}\n".encode())
    return h.hexdigest()


def host_tools() -> dict[str, str]:
    """The installed version of each of HOST_TOOLS that is installed."""
    r = sh.run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n", *HOST_TOOLS],
               check=False, quiet=True)
    found = {}
    for line in r.output.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[2].startswith("ii"):
            found[parts[0]] = parts[1]
    return found


def record_inputs(recipe: Recipe) -> dict[str, Any]:
    """The "inputs" section of a build's record for `recipe`."""
    files = []
    for f in recipe.data.get("files") or []:
        src = (recipe.path.parent / f["source"]).resolve()
        entry: dict[str, Any] = {"source": str(src), "dest": f["dest"]}
        if src.is_dir():
            entry["tree_sha256"] = tree_digest(src)
        else:
            entry["sha256"] = sha256_file(src)
        files.append(entry)
    return {"recipe": {"path": str(recipe.path), "sha256": sha256_file(recipe.path)}, "files": files,
            "bake": bake_version(), "host_tools": host_tools()}
