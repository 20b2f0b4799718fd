"""The host path out of a base image: its root tree copied by a read-only loop mount and tar.

Fast (the kernel reads the filesystem) and exact (tar keeps numeric owners, every xattr
namespace, ACLs, hard links, device nodes and holes), but it needs root. The image is
attached read-only and mounted without replaying its journal, so the base is never
written; the mount and the loop device are undone on any exit.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path

from builder.core import sh
from builder.core.cache import TAR_FLAGS
from builder.core.errors import BakeError
from builder.core.interrupts import deferred
from builder.base.extfs import fs_facts

# How long one wait for the two tars blocks at most, so that a signal's handler runs.
WAKE = 0.5
ERROR_TAIL = 4000


def copy_tree(image: Path, tree: Path) -> None:
    """Copy the root tree of the bare ext filesystem `image` into folder `tree` (made; it
    must be absent or empty) exactly: owners by number, modes, xattrs of every
    namespace (file capabilities too), ACLs, hard links, device nodes, fifos and holes.
    The filesystem's own lost+found is left out. Needs root."""
    image, tree = Path(image), Path(tree)
    if os.geteuid() != 0:
        raise BakeError("copying a base image's tree on the host needs root (it mounts the image)")
    facts = fs_facts(image)
    if tree.exists() and (not tree.is_dir() or any(tree.iterdir())):
        raise BakeError(f"{tree}: the base's tree goes into a new or empty folder, and this is not one")
    tree.mkdir(parents=True, exist_ok=True)
    # noload: an ext3/4 journal left dirty is not replayed, which would write to the device
    options = "ro" if facts.type == "ext2" else "ro,noload"
    with tempfile.TemporaryDirectory(prefix="bake-base-mnt-") as mnt, \
            sh.loop_device(image, read_only=True) as dev, \
            sh.mount(dev, mnt, fstype=facts.type, options=options):
        _tar_pipe(Path(mnt), tree)


def _tar_pipe(src: Path, dest: Path) -> None:
    """`tar -c` of `src` piped into `tar -x` in `dest`; a CommandError with the failing
    side's own words when either fails."""
    create = ["tar", *TAR_FLAGS, "--anchored", "--exclude=./lost+found", "-C", str(src), "-cf", "-", "."]
    extract = ["tar", *TAR_FLAGS, "--same-owner", "--same-permissions", "-C", str(dest), "-xf", "-"]
    with tempfile.TemporaryFile() as create_err, tempfile.TemporaryFile() as extract_err:
        r, w = os.pipe()
        try:
            with sh.background(create, stdout=w, stderr=create_err) as producer:
                os.close(w)
                w = -1
                with sh.background(extract, stdin=r, stderr=extract_err) as consumer:
                    os.close(r)
                    r = -1
                    _wait_all(producer, consumer)
        finally:
            with deferred():
                for fd in (r, w):
                    if fd >= 0:
                        os.close(fd)
        # the reader's failure first: a writer that lost its reader only says "broken pipe"
        for proc, argv, err in ((consumer, extract, extract_err), (producer, create, create_err)):
            if proc.returncode != 0:
                err.seek(0)
                tail = err.read()[-ERROR_TAIL:].decode(errors="replace")
                raise sh.CommandError(argv, proc.returncode, tail, "copying the base image's tree")


def _wait_all(*procs: subprocess.Popen) -> None:
    for proc in procs:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(WAKE)
                break
