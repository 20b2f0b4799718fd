"""Mounts inside a mount namespace of bake's own: reading this process's mount table,
keeping the namespace's mount events to itself, read-only and bind mounts.

What is mounted here must never reach the build host's mount table. In a chroot whose
root is no mount (a build box that is itself a chroot), `mount --make-rprivate /` cannot
work: `make_private` then makes each mount it can name private and tells whether the
one it cannot name may still propagate, and a caller mounts only on a mount it can name
(`under_a_mount`) unless it may mount anywhere.
"""

from __future__ import annotations

import ctypes
import os
import subprocess

from builder.core import mountinfo


def mounts(*, shared: bool = False) -> list[tuple]:
    """(mount point, filesystem type) of the mounts this process can name, with whether
    each propagates to other namespaces when `shared`."""
    return [(m.target, m.fstype, m.shared) if shared else (m.target, m.fstype) for m in mountinfo.read()]


def make_private() -> bool:
    """Keep this namespace's mount events to itself. In a chroot whose root is no mount
    (the mount holding it lies outside and cannot be named), each mount it can name is
    made private; then False when one of them was shared, a sign that the unnamed one may
    be too, so that no mount may be made on it. True otherwise."""
    # mount(2) itself: mount(8) as a program was a tenth of every confined command's start
    try:
        sys_mount(None, "/", None, MS_REC | MS_PRIVATE)
        return True
    except OSError:
        pass
    was_shared = False
    for target, _fstype, shared in mounts(shared=True):
        was_shared |= shared
        sys_mount(None, target, None, MS_PRIVATE)
    return not was_shared


def under_a_mount(path: str, targets: list[str]) -> bool:
    """Whether `path` lies on a mount this process can name."""
    return any(t == "/" or path == t or path.startswith(t.rstrip("/") + "/") for t in targets)


def mount(*args: str) -> None:
    """mount(8) with `args`; an OSError carrying its message when it fails."""
    r = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {r.stderr.strip()}")


MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18


def bind_fd(fd: int, target: str) -> None:
    """Bind the folder open as `fd` at `target`, writable (mount(2) itself: mount(8) would
    resolve /proc/self/fd/N to a path name, which may now lead elsewhere)."""
    libc = ctypes.CDLL(None, use_errno=True)
    # recursive, so the image's own /proc, /sys and /dev mounts come along
    for src, flags in ((f"/proc/self/fd/{fd}".encode(), MS_BIND | MS_REC), (None, MS_REMOUNT | MS_BIND)):
        if libc.mount(src, target.encode(), None, flags, None) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount {target}: {os.strerror(e)}")


def read_only(path: str, *, bind_first: bool = False) -> None:
    if bind_first:
        mount("--bind", path, path)
    mount("-o", "remount,bind,ro", path)


def read_only_bind(source: str, target: str) -> None:
    mount("--bind", source, target)
    mount("-o", "remount,bind,ro", target)


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8


def sys_mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2) itself, for a `target` that is a /proc/self/fd/N link to a folder held
    open (mount(8) would turn it into a path name, which an image may have changed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    if libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype or source or ''} on {target}: {os.strerror(e)}")


def parent_pid(pid: str = "self") -> int:
    """The parent of process `pid` as the /proc this process sees numbers it: the first
    process of a new PID namespace has no parent in it (getppid() is 0), but the build
    host's /proc still names it. 0 when there is none."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    return 0


def in_own_mount_namespace() -> bool:
    """Whether this process's mount namespace is not that of the process that started it
    (its parent, or the parent's parent, when the parent is `unshare --fork` in the new
    namespaces itself), so that no mount it makes can be the build host's own. False when
    that cannot be told."""
    try:
        mine = os.readlink("/proc/self/ns/mnt")
        parent = parent_pid()
        return any(os.readlink(f"/proc/{pid}/ns/mnt") != mine for pid in (parent, parent_pid(str(parent))))
    except (OSError, ValueError):
        return False
