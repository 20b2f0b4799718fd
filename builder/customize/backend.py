"""The handful of verbs a customizer needs from an image's root, and what both backends share.

Paths given to a backend are absolute paths as the image names them. A backend resolves
them as a process inside the image would (`resolve_in_image`): an absolute symlink starts
again at the image's root, `..` stops there, so a write can never leave the image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from builder.core.errors import BakeError
from builder.core.sh import IMAGE_ENV, TAIL_LINES, Result

# IMAGE_ENV is core.sh's, named here too: the backends take it from the interface they implement
__all__ = ["IMAGE_ENV", "MAX_SYMLINKS", "Backend", "resolve_in_image", "split_leaf", "tail"]

MAX_SYMLINKS = 40   # as the kernel's limit before ELOOP


class Backend(Protocol):
    """An image's root that commands run in and files are written to."""

    name: str               # "chroot" | "appliance", as the route names it
    where: str              # how messages name the place commands run: "the chroot", "the image"

    @property
    def host_root(self) -> Path | None:
        """The tree's folder on the build host, if it has one (hooks that run outside the
        image work on it)."""
        ...

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, what: str = "", check: bool = False,
            quiet: bool = False, logfile: IO[str] | None = None,
            on_line: Callable[[str], None] | None = None) -> Result:
        """Run `argv` inside the image with IMAGE_ENV plus `env`; its exit status and
        output. With `check`, a non-zero exit is an sh.CommandError saying `what`."""
        ...

    def read(self, path: str) -> bytes | None:
        """The content of the regular file `path`, None when there is none."""
        ...

    def write(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Make `path` a regular file owned by root holding `data`, with `mode`; its
        missing parent folders are made. What is there and is not a regular file is an
        error."""
        ...

    def mkdir(self, path: str) -> None:
        """Make the folder `path` and its missing parents (0755, root's); nothing when it is one."""
        ...

    def copy_in(self, source: Path, dest: str, *, mode: int | None = None, what: str | None = None) -> str:
        """Copy the build host's `source` (file or folder) to `dest` as `cp -a
        --no-preserve=ownership` run inside the image would: a folder's contents merge
        into `dest`, a file given a folder goes into it, everything owned by root.
        `mode` is then set on what `dest` became. Returns that path as the image names
        it. Errors are BakeErrors prefixed with `what` (default `dest`)."""
        ...

    def exists(self, path: str) -> bool:
        """Whether `path` exists in the image (a symlink counts by its target's)."""
        ...

    def is_dir(self, path: str) -> bool:
        """Whether `path` is a folder in the image (through symlinks)."""
        ...

    def is_symlink(self, path: str) -> bool:
        """Whether `path` itself is a symlink."""
        ...

    def listdir(self, path: str) -> list[str]:
        """The names in folder `path`, sorted; empty when it is no folder."""
        ...

    def rename(self, path: str, new: str) -> None:
        """Rename `path` itself (a symlink stays one) to `new`, in the same folder or another."""
        ...

    def symlink(self, target: str, path: str) -> None:
        """Make `path` a symlink to `target` (it must not exist)."""
        ...

    def remove(self, path: str) -> None:
        """Remove `path` and what is below it, never following `path` itself when it
        is a symlink; nothing when it does not exist."""
        ...


def resolve_in_image(dest: str, is_symlink: Callable[[str], bool], readlink: Callable[[str], str], *,
                     what: str | None = None) -> str:
    """`dest` (an absolute path in an image) resolved as a process whose root is the
    image's would resolve it, asking the image `is_symlink` and `readlink` of paths
    that are themselves free of symlinks: an absolute symlink starts again at the root,
    `..` stops there. The result has no symlink in it (what exists of it is folders and,
    last, a non-link).

    A BakeError (prefixed with `what`, default `dest`) when `dest`'s own `..` climbs
    above the root, or the image's symlinks loop."""
    what = what or dest
    parts = PurePosixPath("/", dest).parts[1:]
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            raise BakeError(f"{what}: '..' climbs above the image's root; give an absolute path inside the image")
    done: list[str] = []
    todo = list(reversed(parts))
    links = 0
    while todo:
        name = todo.pop()
        if name == "..":
            if done:
                done.pop()
            continue
        here = "/" + "/".join([*done, name])
        if not is_symlink(here):
            done.append(name)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise BakeError(f"{what}: too many levels of symbolic links in the image resolving {dest}")
        target = PurePosixPath(readlink(here))
        if target.is_absolute():
            done = []
        todo.extend(reversed([p for p in target.parts if p != "/"]))
    return "/" + "/".join(done)


def split_leaf(path: str, what: str | None = None) -> tuple[str, str]:
    """(parent, name) of image path `path`, for a verb that works on `path` itself and not
    on where it leads; a BakeError for the root or a path ending in `..`."""
    pure = PurePosixPath("/", path)
    if pure.name in ("", "..", "."):
        raise BakeError(f"{what or path}: names no entry of a folder in the image")
    return str(pure.parent), pure.name


def tail(output: str, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a command's output, as an error shows them."""
    return "\n".join(output.rstrip().splitlines()[-lines:])
