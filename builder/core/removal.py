"""The one way bake removes a tree: never across a mount.

A build's work tree holds a chroot, and a chroot has the host's /dev, /proc and /sys
mounted in it while it is used; a removal that descended through such a mount would
empty the host's own. `remove_tree` removes a folder and everything in it but refuses
to enter anything that is not the same mount as the folder itself:

- before it removes anything, it looks in the mount table (`mountinfo`) for a mount
  point at or below the folder, and refuses when there is one;
- while it walks (by file descriptors, never following a symbolic link: a link is
  removed, never its target), every folder it opens must be on the folder's device
  (`st_dev`) and on its very mount (the mount id the kernel gives an open file, which
  also tells apart a bind mount of a folder of the same filesystem), else it stops.

Refusing is a `MountBoundaryError` naming the mount point; nothing under that mount
point was removed. Unmounting is for the caller, who knows what it mounted (`sh`).
"""

from __future__ import annotations

import os
import stat

from builder.core import mountinfo
from builder.core.errors import BakeError


class MountBoundaryError(BakeError):
    """A tree to remove has a mount in it; nothing under that mount was removed."""

    def __init__(self, root: str, mount_point: str):
        self.root = root
        self.mount_point = mount_point
        super().__init__(f"refusing to remove {root}: {mount_point} is a mount point in it "
                         "(nothing under it was removed; unmount it first)")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def mount_id(fd: int) -> int | None:
    """The id of the mount that open file `fd` is on (as mountinfo numbers mounts)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def remove_tree(path: str | os.PathLike, *, missing_ok: bool = True, ignore_errors: bool = False) -> None:
    """Remove `path` and all it holds, on its own mount only (see the module's docstring).

    A symbolic link (at `path` too) is removed, not followed. Raises MountBoundaryError,
    ignore_errors or not, when a mount lies in the tree (or `path` is one); with
    `ignore_errors`, other errors are passed over and the rest removed. A missing `path`
    is nothing to do unless `missing_ok` is false.
    """
    root = os.path.abspath(path)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        if missing_ok or ignore_errors:
            return
        raise
    if not stat.S_ISDIR(st.st_mode):
        _unlink(root, ignore_errors)
        return
    real = os.path.realpath(root)
    inside = mountinfo.under(real)
    if inside:
        raise MountBoundaryError(root, _shown(root, real, inside[-1].target))
    fd = os.open(root, _DIR_FLAGS)
    try:
        if not os.path.samestat(os.fstat(fd), st):
            raise BakeError(f"refusing to remove {root}: it changed while it was being removed")
        _empty(fd, root, root, st.st_dev, mount_id(fd), ignore_errors)
    finally:
        os.close(fd)
    try:
        os.rmdir(root)
    except OSError:
        if not ignore_errors:
            raise


def _shown(root: str, real: str, target: str) -> str:
    """`target` (a real path) as a path under `root` as the caller named it."""
    rel = os.path.relpath(target, real)
    return root if rel == "." else os.path.join(root, rel)


def _unlink(path: str, ignore_errors: bool, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        if not ignore_errors:
            raise


def _empty(fd: int, shown: str, root: str, dev: int, mnt: int | None, ignore_errors: bool) -> None:
    """Remove what open folder `fd` (`shown` to a person) holds, for `remove_tree(root)`."""
    try:
        with os.scandir(fd) as it:
            names = [e.name for e in it]
    except OSError:
        if not ignore_errors:
            raise
        return
    for name in names:
        child = os.path.join(shown, name)
        try:
            st = os.lstat(name, dir_fd=fd)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            _unlink(name, ignore_errors, dir_fd=fd)
            continue
        if st.st_dev != dev:
            raise MountBoundaryError(root, child)
        sub = _open_dir(name, fd, ignore_errors)
        if sub is None:
            continue
        try:
            if not os.path.samestat(os.fstat(sub), st) or (mnt is not None and mount_id(sub) != mnt):
                raise MountBoundaryError(root, child)
            _empty(sub, child, root, dev, mnt, ignore_errors)
        finally:
            os.close(sub)
        try:
            os.rmdir(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError:
            if not ignore_errors:
                raise


def _open_dir(name: str, fd: int, ignore_errors: bool) -> int | None:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        return None
    except OSError:
        if ignore_errors:
            return None
        raise
