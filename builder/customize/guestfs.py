"""The appliance backend: a filesystem image changed in place inside libguestfs's appliance.

Nothing on the build host is mounted, attached or chrooted into, so an unprivileged user
can run it; what it writes belongs to root. Commands run in the image's root (libguestfs
chroots into it inside the appliance); their output comes back through a file in a
scratch folder of bake's in the image (SCRATCH), removed when the backend closes. Paths
given to the libguestfs API are resolved first as the image resolves them
(`backend.resolve_in_image`): the appliance's kernel would follow an absolute symlink
of the image to the appliance's own root.
"""

from __future__ import annotations

import contextlib
import logging
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any

from builder.base import appliance
from builder.core import sh
from builder.core.errors import BakeError
from builder.core.log import step
from builder.customize.backend import IMAGE_ENV, resolve_in_image, split_leaf, tail

log = logging.getLogger("bake.customize")

# Under /tmp/bake, which the scrub's tmp-files leaves to the customizer's remove_elements
SCRATCH = "/tmp/bake/.appliance"

# Runs "$@" with its output in the file $1 and prints its exit status: the output comes
# back as bytes (whatever its encoding), and the status even when it fails.
RUN = 'out=$1; shift; "$@" >"$out" 2>&1; echo "$?"'

# cp -a inside the image, as `chroot.copy_into_image` copies from the host: a folder's
# contents merge into dest, a file given a folder goes into it, and the image's own
# symlinks are followed as the image resolves them. Says last what dest became.
COPY = """set -e
src=$1 dest=$2 mode=$3
if [ -d "$src" ]; then
    if [ -e "$dest" ] && [ ! -d "$dest" ]; then echo "$dest exists in the image and is not a folder" >&2; exit 1; fi
    mkdir -p "$dest"
    cp -a "$src/." "$dest/"
    target=$dest
else
    if [ -d "$dest" ]; then target=${dest%/}/${src##*/}; else target=$dest; mkdir -p "$(dirname "$dest")"; fi
    if [ -L "$target" ] || { [ -e "$target" ] && [ ! -f "$target" ]; }; then
        echo "$target exists in the image and is not a regular file" >&2; exit 1
    fi
    cp -a "$src" "$target"
fi
if [ -n "$mode" ]; then chmod "$mode" "$target"; fi
echo "written: $target"
"""


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


class GuestfsBackend:
    """The image open in the libguestfs handle `g` (read-write, mounted at /)."""

    name = "appliance"
    where = "the image"

    def __init__(self, g: Any):
        self.g = g
        self._copies = 0
        self._scratch = ""      # SCRATCH as the appliance reaches it, once made

    @property
    def host_root(self) -> None:
        return None         # the image is a file the host never mounts

    def start(self) -> None:
        """Make the scratch folder (empty)."""
        with appliance.doing("making bake's scratch folder in the image"):
            self.remove(SCRATCH)
            self._scratch = self.resolve(SCRATCH)
            self.g.mkdir_p(self._scratch)

    def stop(self) -> None:
        """Remove the scratch folder."""
        self.remove(SCRATCH)

    def resolve(self, path: str, *, what: str | None = None) -> str:
        """`path` free of symlinks, as the image resolves it."""
        return resolve_in_image(path, self.g.is_symlink, self.g.readlink, what=what)

    def _entry(self, path: str) -> str:
        parent, name = split_leaf(path)
        return str(PurePosixPath(self.resolve(parent, what=path)) / name)

    # --- the verbs (see backend.Backend) ----------------------------------------------------
    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, what: str = "", check: bool = False,
            quiet: bool = False, logfile: IO[str] | None = None,
            on_line: Callable[[str], None] | None = None) -> sh.Result:
        full = {**IMAGE_ENV, **(env or {})}
        start = time.monotonic()
        with appliance.doing(what or f"running {argv[0]} in the image"):
            self.g.mkdir_p(self._scratch)       # a hook may have emptied /tmp/bake too
            status = self.g.command(["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in full.items()),
                                     "/bin/sh", "-c", RUN, "sh", f"{SCRATCH}/output", *argv]).strip()
            output = self._download(f"{self._scratch}/output").decode(errors="replace")
        for line in output.splitlines(keepends=True):
            sh.pass_on(line, logfile=logfile, on_line=on_line, quiet=quiet)
        try:
            rc = int(status.splitlines()[-1])
        except (ValueError, IndexError):
            raise BakeError(f"running {argv[0]} in the image gave no exit status (output: {status!r})") from None
        if check and rc != 0:
            raise sh.CommandError(argv, rc, tail(output), what)
        return sh.Result(list(argv), rc, output, time.monotonic() - start)

    def _download(self, path: str) -> bytes:
        try:
            return bytes(self.g.read_file(path))     # one call, for all but outputs of megabytes
        except appliance.ApplianceError:
            pass
        with tempfile.TemporaryDirectory(prefix="bake-appliance-") as tmp:
            local = Path(tmp) / "file"
            self.g.download(path, str(local))
            return local.read_bytes()

    def read(self, path: str) -> bytes | None:
        with appliance.doing(f"reading {path} in the image"):
            p = self.resolve(path)
            return self._download(p) if self.g.is_file(p) else None

    def write(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        with appliance.doing(f"writing {path} in the image"):
            p = self.resolve(path)
            if self.g.exists(p) and not self.g.is_file(p):
                raise BakeError(f"{path}: exists in the image and is not a regular file")
            self.g.mkdir_p(str(PurePosixPath(p).parent))
            self.g.write(p, data)
            self.g.chown(0, 0, p)
            self.g.chmod(mode, p)

    def mkdir(self, path: str) -> None:
        with appliance.doing(f"making the folder {path} in the image"):
            self.g.mkdir_p(self.resolve(path))

    def copy_in(self, source: Path, dest: str, *, mode: int | None = None, what: str | None = None) -> str:
        what = what or dest
        target = self.resolve(dest, what=what)
        with appliance.doing(f"{what}: copying {source} into the image"):
            if not self.g.exists(target):
                # nothing there to merge with: the tar goes straight in (no process in the appliance)
                top = PurePosixPath(target)
                into = str(top) if source.is_dir() else str(top.parent)
                self.g.mkdir_p(into)
                self._tar_in(source, into, "." if source.is_dir() else top.name)
                if mode is not None:
                    self.g.chmod(mode, target)
                return target
            self._copies += 1
            staged = f"{SCRATCH}/copy-{self._copies}"
            self.g.mkdir_p(f"{self._scratch}/copy-{self._copies}")
            self._tar_in(source, f"{self._scratch}/copy-{self._copies}", source.name)
        try:
            r = self.run(["/bin/sh", "-c", COPY, "sh", f"{staged}/{source.name}", target,
                          f"{mode:o}" if mode is not None else ""], what=what)
        finally:
            self.remove(staged)
        if r.returncode != 0:
            raise BakeError(f"{what}: cannot copy {source} into the image (exit {r.returncode})\n"
                            f"--- last lines of its output ---\n{tail(r.output)}")
        return r.output.rstrip().splitlines()[-1].removeprefix("written: ")

    def _tar_in(self, source: Path, folder: str, name: str) -> None:
        """`source` into the image's `folder` (as the appliance reaches it) under `name`, owned by root."""
        with tempfile.TemporaryDirectory(prefix="bake-appliance-") as tmp:
            bundle = Path(tmp) / "copy.tar"
            with tarfile.open(bundle, "w", format=tarfile.GNU_FORMAT) as tar:
                tar.add(source, arcname=name, filter=_owned_by_root)
            self.g.tar_in(str(bundle), folder)

    def exists(self, path: str) -> bool:
        with appliance.doing(f"looking for {path} in the image"):
            return bool(self.g.exists(self.resolve(path)))

    def is_dir(self, path: str) -> bool:
        with appliance.doing(f"looking for {path} in the image"):
            return bool(self.g.is_dir(self.resolve(path)))

    def is_symlink(self, path: str) -> bool:
        if path.strip("/") == "":
            return False
        with appliance.doing(f"looking for {path} in the image"):
            return bool(self.g.is_symlink(self._entry(path)))

    def listdir(self, path: str) -> list[str]:
        with appliance.doing(f"listing {path} in the image"):
            p = self.resolve(path)
            return sorted(self.g.ls(p)) if self.g.is_dir(p) else []

    def rename(self, path: str, new: str) -> None:
        with appliance.doing(f"renaming {path} to {new} in the image"):
            self.g.rename(self._entry(path), self._entry(new))

    def symlink(self, target: str, path: str) -> None:
        with appliance.doing(f"making the symlink {path} in the image"):
            self.g.ln_s(target, self._entry(path))

    def remove(self, path: str) -> None:
        with appliance.doing(f"removing {path} from the image"):
            self.g.rm_rf(self._entry(path))


@contextlib.contextmanager
def opened(image: Path, *, lucid: bool = False) -> Iterator[GuestfsBackend]:
    """The bare filesystem image `image` open read-write in libguestfs's appliance, as a
    backend; its scratch folder is removed and the appliance shut down (what was
    written flushed to `image`) when the block ends. `lucid` gives the appliance the
    vsyscall page Lucid's glibc needs."""
    with contextlib.ExitStack() as stack:
        with step("Starting libguestfs on the image"):
            g = stack.enter_context(appliance.opened([Path(image)], readonly=False, lucid=lucid))
        backend = GuestfsBackend(g)
        backend.start()
        yield backend
        backend.stop()
        with step("Closing the image"):
            stack.close()
