"""The chroot backend: a root tree on the build host, entered with chroot(8).

bake runs as root on the host, outside the chroot, so a path in the image must be
resolved as the image sees it: an absolute symlink there (/etc/localtime ->
/usr/share/zoneinfo/UTC) would otherwise be followed to the host's own file. Every verb
here goes through `path_in_root`, and refuses what lies on a filesystem mounted into the
chroot (/proc, /sys, /dev). Commands run in it confined (`core.confine`: namespaces of
their own, the tree's own /proc, /sys and /dev), inside `sh.chroot_mounts`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from builder.core import confine, sh
from builder.core.errors import BakeError
from builder.core.removal import remove_tree
from builder.customize.backend import IMAGE_ENV, resolve_in_image, split_leaf

RESOLVED_STUB = "../run/systemd/resolve/stub-resolv.conf"


def path_in_root(root: Path, dest: str, *, what: str | None = None) -> Path:
    """The host path of `dest` (an absolute path in the image whose root is `root`),
    resolved as a process chrooted into `root` would resolve it: an absolute symlink
    starts again at `root`, and `..` inside a symlink's target stops at `root`. The
    returned path has no symlink in it below `root` (what exists of it is real
    directories and, last, a non-link), so writing to it cannot leave the tree.

    A BakeError (prefixed with `what`, default `dest`) when `dest`'s own `..` climbs above
    the root, or the image's symlinks loop."""
    root = Path(root)
    inside = resolve_in_image(dest, lambda p: root.joinpath(p.lstrip("/")).is_symlink(),
                              lambda p: os.readlink(root.joinpath(p.lstrip("/"))), what=what)
    return root.joinpath(inside.lstrip("/"))


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
    writer = _ImageWriter.of(root, what)
    root = writer.root
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

    @classmethod
    def of(cls, root: Path, what: str) -> _ImageWriter:
        """A writer for the tree at `root` as it is mounted now."""
        root = Path(os.path.realpath(root))
        return cls(root, [Path(m) for m in sh.mounts_under(root) if Path(m) != root], what)

    def in_image(self, path: Path) -> str:
        return "/" + path.relative_to(self.root).as_posix() if path != self.root else "/"

    def check(self, path: Path, *, below: bool = False) -> None:
        """Refuse `path` on a mount (with `below`, also a path with a mount under it)."""
        for m in self.mounted:
            if path == m or m in path.parents or (below and path in m.parents):
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

    def _open_regular(self, target: Path) -> int:
        self.check(target)
        self.makedirs(target.parent)
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise BakeError(f"{self.what}: {self.in_image(target)} exists in the image and is not a regular file")
        # O_NOFOLLOW: a link that appeared there since it was resolved fails the open instead of leading out
        return os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def file(self, source: Path, target: Path) -> None:
        fd = self._open_regular(target)
        with open(fd, "wb") as out, open(source, "rb") as inp:
            shutil.copyfileobj(inp, out)
        shutil.copystat(source, target, follow_symlinks=False)

    def data(self, data: bytes, target: Path, mode: int) -> None:
        fd = self._open_regular(target)
        with open(fd, "wb") as out:
            out.write(data)
            os.fchmod(out.fileno(), mode)
            if os.geteuid() == 0:
                os.fchown(out.fileno(), 0, 0)

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


class ChrootBackend:
    """The tree at `root` on the build host (see the module's docstring)."""

    name = "chroot"
    where = "the chroot"

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def host_root(self) -> Path:
        return self.root

    def path(self, path: str, *, what: str | None = None) -> Path:
        """The host path of image path `path`, free of symlinks (`path_in_root`)."""
        return path_in_root(self.root, path, what=what)

    def _entry(self, path: str) -> tuple[Path, _ImageWriter]:
        """`path` itself on the host (its folder resolved, not its last name), and a writer."""
        parent, name = split_leaf(path)
        writer = _ImageWriter.of(self.root, path)
        return path_in_root(writer.root, parent, what=path) / name, writer

    # --- the verbs (see backend.Backend) ----------------------------------------------------
    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, what: str = "", check: bool = False,
            quiet: bool = False, logfile: IO[str] | None = None,
            on_line: Callable[[str], None] | None = None) -> sh.Result:
        return sh.run(confine.argv(self.root, list(argv)), env={**IMAGE_ENV, **(env or {})}, what=what, check=check,
                      quiet=quiet, logfile=logfile, on_line=on_line)

    def read(self, path: str) -> bytes | None:
        p = self.path(path)
        return p.read_bytes() if p.is_file() else None

    def write(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        writer = _ImageWriter.of(self.root, path)
        try:
            writer.data(data, path_in_root(writer.root, path), mode)
        except OSError as e:
            raise BakeError(f"{path}: cannot write it in the image: {e.strerror}") from None

    def mkdir(self, path: str) -> None:
        writer = _ImageWriter.of(self.root, path)
        target = path_in_root(writer.root, path)
        try:
            writer.makedirs(target)
        except OSError as e:
            raise BakeError(f"{path}: cannot make the folder in the image: {e.strerror}") from None
        if not target.is_dir():
            raise BakeError(f"{path}: exists in the image and is not a folder")

    def copy_in(self, source: Path, dest: str, *, mode: int | None = None, what: str | None = None) -> str:
        return copy_into_image(self.root, source, dest, mode=mode, what=what)

    def exists(self, path: str) -> bool:
        return self.path(path).exists()

    def is_dir(self, path: str) -> bool:
        return self.path(path).is_dir()

    def is_symlink(self, path: str) -> bool:
        if path.strip("/") == "":
            return False
        return self._entry(path)[0].is_symlink()

    def listdir(self, path: str) -> list[str]:
        p = self.path(path)
        return sorted(os.listdir(p)) if p.is_dir() else []

    def rename(self, path: str, new: str) -> None:
        entry, writer = self._entry(path)
        dest, _ = self._entry(new)
        writer.check(entry, below=True)
        writer.check(dest)
        try:
            os.rename(entry, dest)
        except OSError as e:
            raise BakeError(f"{path}: cannot rename it to {new} in the image: {e.strerror}") from None

    def symlink(self, target: str, path: str) -> None:
        entry, writer = self._entry(path)
        writer.check(entry)
        entry.symlink_to(target)

    def remove(self, path: str) -> None:
        entry, writer = self._entry(path)
        if not entry.is_symlink() and not entry.exists():
            return
        writer.check(entry, below=True)
        try:
            if entry.is_symlink() or not entry.is_dir():
                entry.unlink()
            else:
                remove_tree(entry)
        except OSError as e:
            raise BakeError(f"{path}: cannot remove it from the image: {e.strerror}") from None

    # --- the network: the chroot's is the build host's ------------------------------------
    def use_host_resolver(self) -> None:
        """Name resolution in the chroot through the build host's resolver."""
        resolv = path_in_root(self.root, "/etc") / "resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)

    def hand_over_resolver(self) -> None:
        """Give /etc/resolv.conf back to the image (it held the build host's resolver):
        resolved's stub where systemd-resolved is enabled, otherwise an empty file that
        the instance's DHCP client fills in."""
        resolv = path_in_root(self.root, "/etc") / "resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        if resolved_enabled(self.root):
            resolv.symlink_to(RESOLVED_STUB)
        else:
            resolv.write_text("")


def resolved_enabled(root: Path) -> bool:
    """Whether the tree's systemd starts systemd-resolved at boot (enabled through its
    D-Bus alias or a target's wants)."""
    etc = "/etc/systemd/system"
    if (path_in_root(root, etc) / "dbus-org.freedesktop.resolve1.service").is_symlink():
        return True
    folder = path_in_root(root, etc)
    wants = [n for n in (sorted(os.listdir(folder)) if folder.is_dir() else []) if n.endswith(".wants")]
    return any(os.path.lexists(path_in_root(root, f"{etc}/{w}") / "systemd-resolved.service") for w in wants)


def detect_init_system(root: Path, default: str) -> str:
    """systemd or upstart, from what the tree at `root` has installed (`default` when it has neither yet)."""
    if any(path_in_root(root, p).exists() for p in ("/sbin/initctl", "/sbin/initctl.distrib")):
        return "upstart"
    if any(path_in_root(root, p).exists() for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")):
        return "systemd"
    return default
