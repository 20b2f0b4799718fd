"""The chroot backend's ground: writing into a root tree on the build host from outside it.

bake runs as root on the host, outside the chroot, so a path in the image must be
resolved as the image sees it: an absolute symlink there (/etc/localtime ->
/usr/share/zoneinfo/UTC) would otherwise be followed to the host's own file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from builder.core import sh
from builder.core.errors import BakeError

MAX_SYMLINKS = 40   # as the kernel's limit before ELOOP


def path_in_root(root: Path, dest: str, *, what: str | None = None) -> Path:
    """The host path of `dest` (an absolute path in the image whose root is `root`),
    resolved as a process chrooted into `root` would resolve it: an absolute symlink
    starts again at `root`, and `..` inside a symlink's target stops at `root`. The
    returned path has no symlink in it below `root` (what exists of it is real
    directories and, last, a non-link), so writing to it cannot leave the tree.

    A BakeError (prefixed with `what`, default `dest`) when `dest`'s own `..` climbs above
    the root, or the image's symlinks loop."""
    what = what or dest
    parts = PurePosixPath("/", dest).parts[1:]
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            raise BakeError(f"{what}: '..' climbs above the image's root; give an absolute path inside the image")
    root = Path(root)
    done: list[str] = []
    todo = list(reversed(parts))
    links = 0
    while todo:
        name = todo.pop()
        if name == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, name)
        if not here.is_symlink():
            done.append(name)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise BakeError(f"{what}: too many levels of symbolic links in the image resolving {dest}")
        target = PurePosixPath(os.readlink(here))
        if target.is_absolute():
            done = []
        todo.extend(reversed([p for p in target.parts if p != "/"]))
    return root.joinpath(*done)


def copy_into_image(root: Path, source: Path, dest: str, *, mode: int | None = None,
                    what: str | None = None) -> str:
    """Copy `source` to `dest` in the image at `root` as `cp -a --no-preserve=ownership`
    run inside the image would (a folder's contents merge into `dest`; a file given a
    folder goes into it), without ever writing outside the image: every path is
    resolved by `path_in_root`, and a destination on a filesystem mounted into the
    chroot (/proc, /sys, /dev: the build host's own) is refused. `mode` is then set on
    `dest`. Returns the path written, as the image names it (for a chown in the chroot).
    Errors are BakeErrors prefixed with `what` (default `dest`)."""
    what = what or dest
    root = Path(os.path.realpath(root))
    mounted = [Path(m) for m in sh.mounts_under(root) if Path(m) != root]
    writer = _ImageWriter(root, mounted, what)
    try:
        target = path_in_root(root, dest, what=what)
        if source.is_dir():
            writer.tree(source, target)
        else:
            if target.is_dir():
                target = path_in_root(root, writer.in_image(target) + "/" + source.name, what=what)
            writer.file(source, target)
        if mode is not None:
            os.chmod(target, mode)
    except OSError as e:
        where = e.filename if e.filename else dest
        raise BakeError(f"{what}: cannot copy {source} into the image at {where}: {e.strerror}") from None
    return writer.in_image(target)


class _ImageWriter:
    """Creates files, folders and symlinks at resolved paths in one image tree, refusing
    any that lie on a mount under it."""

    def __init__(self, root: Path, mounted: list[Path], what: str):
        self.root, self.mounted, self.what = root, mounted, what

    def in_image(self, path: Path) -> str:
        return "/" + path.relative_to(self.root).as_posix() if path != self.root else "/"

    def check(self, path: Path) -> None:
        for m in self.mounted:
            if path == m or m in path.parents:
                raise BakeError(f"{self.what}: {self.in_image(path)} is on {self.in_image(m)}, a filesystem mounted "
                                "into the build chroot from the build host, not part of the image")

    def makedirs(self, path: Path) -> None:
        self.check(path)
        missing = []
        p = path
        while not p.exists() and not p.is_symlink():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()

    def file(self, source: Path, target: Path) -> None:
        self.check(target)
        self.makedirs(target.parent)
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise BakeError(f"{self.what}: {self.in_image(target)} exists in the image and is not a regular file")
        # O_NOFOLLOW: a link that appeared there since it was resolved fails the open instead of leading out
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as out, open(source, "rb") as inp:
            shutil.copyfileobj(inp, out)
        shutil.copystat(source, target, follow_symlinks=False)

    def symlink(self, source: Path, target: Path) -> None:
        self.check(target)
        self.makedirs(target.parent)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            raise BakeError(f"{self.what}: {self.in_image(target)} exists in the image and is not a symlink or file")
        target.symlink_to(os.readlink(source))

    def tree(self, source: Path, top: Path) -> None:
        self.makedirs(top)
        if not top.is_dir():
            raise BakeError(f"{self.what}: {self.in_image(top)} exists in the image and is not a folder")
        # folders are listed before their contents; their attributes are set after them,
        # so that a read-only folder can still be filled and keeps its own times
        made: list[tuple[Path, Path]] = [(source, top)]
        for dirpath, dirnames, filenames in os.walk(source):
            src_dir = Path(dirpath)
            rel_dir = src_dir.relative_to(source).as_posix()
            base = self.in_image(top) if rel_dir == "." else f"{self.in_image(top)}/{rel_dir}"
            here = path_in_root(self.root, base, what=self.what)
            for name in sorted(dirnames + filenames):
                src = src_dir / name
                if src.is_symlink():
                    self.symlink(src, here / name)
                elif src.is_dir():
                    target = path_in_root(self.root, f"{self.in_image(here)}/{name}", what=self.what)
                    self.makedirs(target)
                    if not target.is_dir():
                        raise BakeError(f"{self.what}: {self.in_image(target)} exists in the image and is not a folder")
                    made.append((src, target))
                elif src.is_file():
                    self.file(src, path_in_root(self.root, f"{self.in_image(here)}/{name}", what=self.what))
                else:
                    raise BakeError(f"{self.what}: {src} is not a regular file, folder or symlink")
        for src, target in reversed(made):
            shutil.copystat(src, target, follow_symlinks=False)
