"""Run a diskimage-builder phase where it cannot change the build host.

DIB runs its hooks as root with the builder's whole environment (`sudo -E`): an
outside hook with TMP_MOUNT_PATH unset writes into the host's /usr/share, devuser
copies the builder's ~/.ssh key, sysctl hooks change the running kernel. bake runs
every DIB phase through this module, in new mount, UTS and IPC namespaces
(`unshare`), so that what it sets up vanishes with the phase's last process, a hard
kill included:

- outside hooks (`--outside`): every mount of the host is read-only (so files the
  recipe names stay readable) but the paths the phase may write (`--write`: the image's
  root, the hooks tree, the phase's scratch folder, which is its TMPDIR); every `.ssh`
  folder under /root and /home is hidden under an empty read-only tmpfs;
- hooks in the chroot (`--chroot ROOT`): the hooks tree is bind-mounted read-only at
  ROOT/tmp/in_target.d, as DIB does, and the command is `core/confine.py`'s, which runs
  the hooks confined as every command in the tree (its own PID namespace, /proc, read-only
  /sys and kernel settings, minimal /dev) in the namespaces this one prepared;
- both: /proc/sys read-only, and a hostname change stays in the namespace.

Every mount is made private first (in a chroot whose root is no mount, where
`unshare --propagation private` cannot work, each mount it can name), so nothing made
here reaches the host's mount table.

Usage: unshare --mount --uts --ipc --propagation unchanged -- python -m builder.recipe.dib.sandbox
       --outside [--write PATH]... -- ARGV...
       unshare --mount --uts --ipc --pid --fork --kill-child --propagation unchanged -- \\
           python -m builder.recipe.dib.sandbox --chroot ROOT --hooks TREE -- (confine.entry's argv)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from builder.core.mountns import (MS_BIND, MS_RDONLY, MS_REMOUNT, bind_fd, in_own_mount_namespace, make_private,
                                  mount, mounts, read_only, sys_mount, under_a_mount)

PSEUDO = {"proc", "devtmpfs", "devpts", "mqueue", "hugetlbfs", "binfmt_misc", "autofs", "cgroup", "cgroup2",
          "bpf", "tracefs", "debugfs", "securityfs", "pstore", "configfs", "fusectl", "efivarfs", "nsfs",
          "rpc_pipefs"}


def host_read_only(keep: list[str], may_mount_on_root: bool) -> None:
    """Every mount of the host read-only (pseudo filesystems under /proc and /dev aside)."""
    targets = mounts()
    if "/" not in {t for t, _ in targets} and not may_mount_on_root:
        print("bake-sandbox: in a chroot whose root is no mount and whose mounts propagate: "
              "the files of the chroot that lie on no mount of their own stay writable", file=sys.stderr)
    elif "/" not in {t for t, _ in targets}:
        # a chroot whose root is no mount of its own (the mount holding it lies outside,
        # unseen): its top-level folders are bound onto themselves, with what is mounted
        # under them, so that they are mounts this namespace can make read-only
        seen = {t for t, _ in targets}
        for name in sorted(os.listdir("/")):
            p = "/" + name
            if name in ("proc", "sys", "dev", "run") or p in seen or os.path.islink(p) or not os.path.isdir(p):
                continue
            mount("--rbind", p, p)
        targets = mounts()
    for target, fstype in targets:
        if fstype in PSEUDO or target.startswith(("/proc/", "/dev/")) or target in ("/proc", "/dev"):
            continue
        if any(target == k or target.startswith(k.rstrip("/") + "/") for k in keep):
            continue  # the writable paths' own mounts (the image's /sys is made read-only below)
        try:
            read_only(target)
        except OSError as e:
            if target in ("/", "/usr", "/etc") or fstype not in ("sysfs", "tmpfs"):
                raise
            print(f"bake-sandbox: {e}", file=sys.stderr)


def hide_ssh(may_mount_on_root: bool) -> None:
    homes = ["/root"] + [os.path.join("/home", h) for h in (os.listdir("/home") if os.path.isdir("/home") else [])]
    targets = [t for t, _ in mounts()]
    for h in homes:
        d = os.path.join(h, ".ssh")
        if os.path.isdir(d) and not os.path.islink(d) and (may_mount_on_root or under_a_mount(d, targets)):
            mount("-t", "tmpfs", "-o", "ro,size=4k,mode=0700", "tmpfs", d)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: sandbox (--outside | --chroot ROOT --hooks TREE) [--write PATH]... -- ARGV", file=sys.stderr)
        return 2
    i = argv.index("--")
    p = argparse.ArgumentParser(prog="bake-sandbox")
    p.add_argument("--outside", action="store_true")
    p.add_argument("--chroot")
    p.add_argument("--hooks")
    p.add_argument("--write", action="append", default=[])
    a = p.parse_args(argv[:i])
    cmd = argv[i + 1:]
    if not in_own_mount_namespace():
        # never change the host's own mounts: this runs in a mount namespace of its own
        print("bake-sandbox: run it through unshare --mount", file=sys.stderr)
        return 2
    may_mount_on_root = make_private()
    if a.outside:
        keep = [os.path.realpath(w) for w in a.write]
        fds = {w: os.open(w, os.O_PATH | os.O_DIRECTORY) for w in keep}
        host_read_only(keep, may_mount_on_root)
        hide_ssh(may_mount_on_root)
        targets = [t for t, _ in mounts()]
        for w, fd in fds.items():
            # the writable paths again, with what is mounted under them
            if may_mount_on_root or under_a_mount(w, targets):
                bind_fd(fd, w)
            os.close(fd)
        for w in keep:
            for target, fstype in mounts():
                if target.startswith(w.rstrip("/") + "/") and fstype == "sysfs":
                    read_only(target)
    if a.chroot:
        hooks_in_tree(os.path.realpath(a.chroot), a.hooks)
    read_only("/proc/sys", bind_first=True)
    os.execvp(cmd[0], cmd)
    return 127


def hooks_in_tree(root: str, hooks: str) -> None:
    """The hooks tree read-only at ROOT/tmp/in_target.d, made and mounted through
    descriptors opened without following links: the image's /tmp must be a folder of its
    own, never a link a hostile image points at the build host's folders."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        tmp = os.open("tmp", flags, dir_fd=root_fd)
    except OSError as e:
        raise SystemExit(f"bake-sandbox: refusing the image at {root}: its /tmp is no folder of its own "
                         f"({e.strerror})") from None
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir("in_target.d", 0o755, dir_fd=tmp)
        point = os.open("in_target.d", flags, dir_fd=tmp)
        sys_mount(hooks, f"/proc/self/fd/{point}", None, MS_BIND)
        os.close(point)
        point = os.open("in_target.d", flags, dir_fd=tmp)      # the bind mount, now
        sys_mount(None, f"/proc/self/fd/{point}", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        os.close(point)
    finally:
        os.close(tmp)
        os.close(root_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
