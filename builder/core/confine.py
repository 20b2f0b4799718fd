"""Run a command in an image's tree, confined: the image's own code (package scripts,
hooks, a recipe's commands) runs there as root, and must not reach the build host's
processes, kernel settings, devices or hostname.

Every command bake runs in a tree goes through `argv(root, command)`:

    unshare --mount --uts --ipc --pid --fork --kill-child --propagation unchanged -- \\
        python (this module) ROOT -- COMMAND...

This module is then the first process of a new PID namespace, in mount, UTS and IPC
namespaces of its own. It

- makes every mount it can name private (`mountns.make_private`: in a chroot whose root is
  no mount, each one; it mounts only where that keeps its mounts from the build host:
  anywhere when no mount was shared, otherwise on a mount it can name, such as those that
  `sh.chroot_mounts` made in the tree);
- mounts, in the tree: a proc of the new PID namespace (its files that change the running
  kernel, /proc/sys, sysrq-trigger, irq, bus and fs, read-only), a read-only sysfs, and a
  /dev of its own (a tmpfs holding null, zero, full, random, urandom, tty, a devpts
  instance of its own with ptmx, shm, and the fd, stdin, stdout and stderr links);
- starts the command chrooted into the tree and stays as the namespace's first process:
  it passes SIGTERM, SIGINT, SIGHUP and SIGQUIT on to every process of the namespace (the
  kernel gives the first process of a PID namespace no signal it has no handler for), and
  exits with the command's status, whereupon the kernel ends every process the command
  left. Its own root is the tree's /proc: /proc/1/root leads nowhere outside the tree, and
  a package script that compares / with /proc/1/root still learns it runs in a chroot.

The tree's /proc, /sys and /dev must be folders of the image's own: a symlink there (or
anything but a folder) is refused before anything is mounted (`check_tree`). Every mount
on them is made through a descriptor opened without following links.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

from builder.core import mountns
from builder.core.errors import BakeError
from builder.core.mountns import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT

SUBTREES = ("proc", "sys", "dev")
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
DEV_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}
DEV_OPTIONS = "mode=0755,size=256m"
DEVPTS_OPTIONS = "newinstance,ptmxmode=0666,mode=0620,gid=5"

UNSHARE = ["unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--kill-child", "--propagation", "unchanged",
           "--"]
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
# where this copy of bake lives, handed to the programs it starts (see `program`)
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def program(module: str) -> list[str]:
    """The argv that runs `main(argv)` of bake's `module`, from this very copy of bake,
    whatever the environment given (-I: no PYTHONPATH of a recipe's reaches bake's code).

    -S as well: these programs need the standard library and bake alone, and the site
    module's work (the installed packages' .pth files) was two thirds of every confined
    command's start, about 70 ms of 100, measured here with `true` in a small tree."""
    boot = f"import sys; sys.path.insert(0, sys.argv.pop(1)); from {module} import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-I", "-S", "-c", boot, PACKAGE_PARENT]


def entry(root: str | os.PathLike, command: list[str]) -> list[str]:
    """This module's own argv for `command` in `root`, to be run inside the namespaces of
    UNSHARE (after a program that prepares them, such as DIB's sandbox, execs it)."""
    return [*program("builder.core.confine"), os.fspath(root), "--", *command]


def argv(root: str | os.PathLike, command: list[str]) -> list[str]:
    """The argv that runs `command` in the tree at `root`, confined (see the module's
    docstring); a BakeError, before anything runs, for a tree `check_tree` refuses."""
    check_tree(root)
    return [*UNSHARE, *entry(root, command)]


# --- the tree ---------------------------------------------------------------------------

def check_tree(root: str | os.PathLike) -> None:
    """A BakeError naming the first of the tree's /proc, /sys and /dev that is a symlink
    or something other than a folder (a missing one is made when it is mounted)."""
    for name in SUBTREES:
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise BakeError(f"refusing the image at {root}: its /{name} is a symlink (to {os.readlink(path)}); "
                            f"bake mounts /{name} only on a folder of the image's own")
        if not stat.S_ISDIR(st.st_mode):
            raise BakeError(f"refusing the image at {root}: its /{name} is not a folder; "
                            f"bake mounts /{name} only on a folder of the image's own")


def _folder(dir_fd: int, name: str) -> int:
    """A descriptor (O_PATH) of the folder `name` right in `dir_fd`, made when missing;
    never a link's target."""
    try:
        os.mkdir(name, 0o755, dir_fd=dir_fd)
    except FileExistsError:
        pass
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)


def _at(fd: int, name: str = "") -> str:
    return f"/proc/self/fd/{fd}" + (f"/{name}" if name else "")


def _mounted(dir_fd: int, name: str) -> int:
    """A descriptor of what is now mounted at `name` in `dir_fd` (a descriptor opened before
    the mount still names the folder under it)."""
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)


def mount_tree(root: str | os.PathLike) -> None:
    """Mount proc (of this process's PID namespace, its kernel-changing files read-only),
    a read-only sysfs and the minimal /dev in the tree at `root`, through descriptors.
    A BakeError (nothing mounted) for a tree `check_tree` refuses; an OSError when a mount
    fails, after which the caller undoes what was mounted."""
    check_tree(root)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    fds = {}
    try:
        try:
            fds = {name: _folder(root_fd, name) for name in SUBTREES}
        except OSError as e:    # a link or a file put there since it was checked
            check_tree(root)
            raise BakeError(f"refusing the image at {root}: {e.strerror}: {e.filename}") from None
        quiet = MS_NOSUID | MS_NODEV | MS_NOEXEC
        mountns.sys_mount("proc", _at(fds["proc"]), "proc", quiet)
        proc = _mounted(root_fd, "proc")
        try:
            for name in PROC_READ_ONLY:
                if os.path.lexists(_at(proc, name)):
                    mountns.sys_mount(_at(proc, name), _at(proc, name), None, MS_BIND)
                    mountns.sys_mount(None, _at(proc, name), None, MS_REMOUNT | MS_BIND | MS_RDONLY | quiet)
        finally:
            os.close(proc)
        try:
            mountns.sys_mount("sysfs", _at(fds["sys"]), "sysfs", MS_RDONLY | quiet)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            # the kernel mounts no sysfs right on another (chroot_mounts' own): that one, read-only
            mountns.sys_mount(None, _at(fds["sys"]), None, MS_REMOUNT | MS_BIND | MS_RDONLY | quiet)
        # not noexec, as the host's /dev is not: a program may map what it puts in /dev/shm executable
        mountns.sys_mount("tmpfs", _at(fds["dev"]), "tmpfs", MS_NOSUID, DEV_OPTIONS)
        dev = _mounted(root_fd, "dev")
        try:
            _fill_dev(dev)
        finally:
            os.close(dev)
    finally:
        for fd in (root_fd, *fds.values()):
            os.close(fd)


def _fill_dev(dev: int) -> None:
    for name, (major, minor) in DEV_NODES.items():
        os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(major, minor), dir_fd=dev)
        os.chmod(_at(dev, name), 0o666)
    for name, mode in (("pts", 0o755), ("shm", 0o1777)):
        os.mkdir(name, dir_fd=dev)
        os.chmod(_at(dev, name), mode)
    for name, target in DEV_LINKS.items():
        os.symlink(target, name, dir_fd=dev)
    mountns.sys_mount("devpts", _at(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC, DEVPTS_OPTIONS)


# --- the first process of the namespace ----------------------------------------------------

def _fail(message: str) -> int:
    print(f"bake-confine: {message}", file=sys.stderr)
    return 125


def _keep_private(root: str) -> str | None:
    """Make this namespace's mounts private; then None when it may mount on the tree's
    /proc, /sys and /dev without the build host seeing it, otherwise the first path it may
    not (one that lies on no mount it can name, where some mount was shared)."""
    if mountns.make_private():
        return None
    targets = [t for t, _ in mountns.mounts()]
    for name in SUBTREES:
        path = os.path.join(root, name)
        if not mountns.under_a_mount(path, targets):
            return path
    return None


def main(args: list[str]) -> int:
    if "--" not in args or args.index("--") != 1 or len(args) < 3:
        return _fail("usage: confine ROOT -- COMMAND...")
    root, command = os.path.realpath(args[0]), args[2:]
    stop: list[int] = []
    child = 0

    def forward(sig: int, _frame: object) -> None:
        stop.append(sig)
        if child:
            _pass_on(sig)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    if os.getpid() != 1 or not mountns.in_own_mount_namespace():
        # never change the host's own mounts, nor leave a process the kernel would not end
        return _fail("run it through " + " ".join(UNSHARE[:-1]))
    try:
        unsafe = _keep_private(root)
        if unsafe is not None:
            return _fail(f"cannot mount on {unsafe}: it lies on no mount this namespace can name, and mounts here "
                         "may reach the build host (run the command inside sh.chroot_mounts)")
        mount_tree(root)
    except (OSError, BakeError) as e:
        return _fail(str(e))
    if stop:
        return 128 + stop[0]
    child = os.fork()
    if child == 0:
        _run(root, command)
    if stop:
        _pass_on(stop[0])
    # this process keeps no hold on the host's tree: its root becomes the tree's /proc
    os.chroot(os.path.join(root, "proc"))
    os.chdir("/")
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            sys.stderr.flush()
            os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _pass_on(sig: int) -> None:
    """`sig` to every process of the namespace but this one (none left is no error)."""
    try:
        os.kill(-1, sig)
    except ProcessLookupError:
        pass


def _run(root: str, command: list[str]) -> None:
    """In the forked child: chroot into `root` and exec `command` there (as chroot(8))."""
    try:
        for sig in (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.chroot(root)
        os.chdir("/")
        os.execvp(command[0], command)
    except OSError as e:
        print(f"bake-confine: cannot run {command[0]} in the image: {e.strerror}", file=sys.stderr)
        sys.stderr.flush()
    os._exit(127)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
