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
  ROOT/tmp/in_target.d, as DIB does, and the host's kernel settings the chroot can see
  (ROOT/proc/sys, ROOT/sys) are read-only;
- both: /proc/sys read-only, and a hostname change stays in the namespace.

Usage: unshare --mount --uts --ipc --propagation private -- python -m builder.dib.sandbox
       (--outside | --chroot ROOT --hooks TREE) [--write PATH]... -- ARGV...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

PSEUDO = {"proc", "devtmpfs", "devpts", "mqueue", "hugetlbfs", "binfmt_misc", "autofs", "cgroup", "cgroup2",
          "bpf", "tracefs", "debugfs", "securityfs", "pstore", "configfs", "fusectl", "efivarfs", "nsfs",
          "rpc_pipefs"}


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of this namespace's mounts."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            out.append((_unescape(fields[4]), right.split()[0]))
    return out


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {r.stderr.strip()}")


MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384


def bind_fd(fd: int, target: str) -> None:
    """Bind the folder open as `fd` at `target`, writable (mount(2) itself: mount(8) would
    resolve /proc/self/fd/N to a path name, which may now lead elsewhere)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    # recursive, so the image's own /proc, /sys and /dev mounts come along
    for src, flags in ((f"/proc/self/fd/{fd}".encode(), MS_BIND | MS_REC), (None, MS_REMOUNT | MS_BIND)):
        if libc.mount(src, target.encode(), None, flags, None) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount {target}: {os.strerror(e)}")


def read_only(path: str, *, bind_first: bool = False) -> None:
    if bind_first:
        _mount("--bind", path, path)
    _mount("-o", "remount,bind,ro", path)


def host_read_only(keep: list[str]) -> None:
    """Every mount of the host read-only (pseudo filesystems under /proc and /dev aside)."""
    for target, fstype in mounts():
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


def hide_ssh() -> None:
    homes = ["/root"] + [os.path.join("/home", h) for h in (os.listdir("/home") if os.path.isdir("/home") else [])]
    for h in homes:
        d = os.path.join(h, ".ssh")
        if os.path.isdir(d) and not os.path.islink(d):
            _mount("-t", "tmpfs", "-o", "ro,size=4k,mode=0700", "tmpfs", d)


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
    if os.readlink("/proc/self/ns/mnt") == os.readlink(f"/proc/{os.getppid()}/ns/mnt"):
        # never change the host's own mounts: this runs in a mount namespace of its own
        print("bake-sandbox: run it through unshare --mount", file=sys.stderr)
        return 2
    _mount("--make-rprivate", "/")
    if a.outside:
        keep = [os.path.realpath(w) for w in a.write]
        fds = {w: os.open(w, os.O_PATH | os.O_DIRECTORY) for w in keep}
        host_read_only(keep)
        hide_ssh()
        for w, fd in fds.items():
            # the writable paths again, with what is mounted under them
            bind_fd(fd, w)
            os.close(fd)
        for w in keep:
            for target, fstype in mounts():
                if target.startswith(w.rstrip("/") + "/") and fstype == "sysfs":
                    read_only(target)
    if a.chroot:
        root = os.path.realpath(a.chroot)
        where = os.path.join(root, "tmp/in_target.d")
        os.makedirs(where, exist_ok=True)
        read_only_bind(a.hooks, where)
        for sub in ("proc/sys", "sys"):
            t = os.path.join(root, sub)
            if os.path.ismount(t) or sub == "proc/sys" and os.path.isdir(t):
                read_only(t, bind_first=(sub == "proc/sys"))
    read_only("/proc/sys", bind_first=True)
    os.execvp(cmd[0], cmd)
    return 127


def read_only_bind(source: str, target: str) -> None:
    _mount("--bind", source, target)
    _mount("-o", "remount,bind,ro", target)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
