"""Who may read what bake makes. A build holds the image of a whole system (its keys,
its users' hashes, whatever a recipe's files put there), so build folders, caches and
images are the owner's alone: folders 0700, images, kernels and ramdisks 0600. A shop
whose team reads builds without root names a group (`bake --group NAME` or BAKE_GROUP):
then folders are 2750 (new entries inherit the group) and images 0640, owned by it.

Only the folders bake creates are set so (a build folder, always; an output root, a
recipe's folder or a cache folder when bake makes it); one the operator made keeps the
mode it was given. What is built inside an image keeps the modes its packages and
recipe give it: bake's own process umask is not changed.
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

from .errors import BakeError

GROUP_ENV = "BAKE_GROUP"


def group() -> int | None:
    """The gid of the group named by BAKE_GROUP (a name or a number), or None."""
    name = os.environ.get(GROUP_ENV, "").strip()
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise BakeError(f"{GROUP_ENV}={name}: no such group on this host (`getent group {name}` finds none)") from None


def dir_mode() -> int:
    return 0o700 if group() is None else 0o2750


def file_mode() -> int:
    return 0o600 if group() is None else 0o640


def _own(path: Path, mode: int) -> None:
    gid = group()
    if gid is not None:
        os.chown(path, -1, gid, follow_symlinks=False)
    os.chmod(path, mode, follow_symlinks=False)


def private_file(path: Path) -> None:
    """`path` readable by its owner alone (and the group, when one is named)."""
    _own(Path(path), file_mode())


def private_dir(path: Path, *, parents: bool = True) -> Path:
    """Make the folder `path` (and, with `parents`, the folders above it that are
    missing) for its owner alone (and the group, when one is named). A folder that
    already exists is left as it is."""
    path = Path(path)
    dir_mode()                  # an unknown group is refused before anything is made
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        if not parents:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue            # made meanwhile by another bake: theirs, as it is
        _own(d, dir_mode())
    if not path.is_dir():
        raise BakeError(f"{path} exists and is not a folder")
    return path


def new_private_dir(path: Path) -> None:
    """Make the new folder `path` (FileExistsError when it exists) for its owner alone
    (and the group, when one is named)."""
    path = Path(path)
    dir_mode()
    path.mkdir(mode=0o700)
    _own(path, dir_mode())
