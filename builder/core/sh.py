"""The one way bake runs a command, mounts a filesystem, enters a chroot or keeps a process.

Every child is started in its own session so that an interrupted build can stop the
whole process tree it started; every mount, loop device and background process is a
context manager whose exit undoes it, on success, on failure and on Ctrl-C (the undoing
runs with interrupts held, so a second Ctrl-C cannot cut it short). Each of them is also
written in this process's journal while it lives, and every child carries its cookie,
so that when bake is killed outright its watchdog ends the processes and the next bake
undoes the rest (see `lifetime`). Nothing here uses a shell.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping, Sequence

from builder.core import confine, lifetime, mountinfo, removal
from builder.core.errors import BakeError
from builder.core.interrupts import deferred

log = logging.getLogger("bake.sh")

TAIL_LINES = 40


class CommandError(BakeError):
    """A command exited non-zero (or could not start); carries its output tail."""

    def __init__(self, argv: Sequence[str], returncode: int | None, tail: str, what: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.tail = tail
        head = what or "command failed"
        status = "could not start" if returncode is None else f"exit {returncode}"
        msg = f"{head}: {_show(argv)} ({status})"
        if tail.strip():
            msg += "\n--- last lines of its output ---\n" + tail.rstrip()
        super().__init__(msg)


@dataclass
class Result:
    argv: list[str]
    returncode: int
    output: str
    seconds: float


def _show(argv: Sequence[str]) -> str:
    return " ".join(str(a) if str(a) and " " not in str(a) else repr(str(a)) for a in argv)


# After a timeout, how long the output of an ended command is still read.
OUTPUT_LINGER = 2.0


def _stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End a child's whole process group: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# The longest a wait of the main thread blocks in one call: Python runs a signal handler
# only when the main thread runs Python code (see `interrupts`).
WAKE = 0.5


def _wait(proc: subprocess.Popen, timeout: float | None) -> int:
    """`proc.wait(timeout)`, never blocking in one system call for longer than WAKE."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = WAKE if deadline is None else min(WAKE, deadline - time.monotonic())
        try:
            return proc.wait(max(step, 0.0))
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() >= deadline:
                raise


def _join(thread: threading.Thread, timeout: float | None) -> None:
    """`thread.join(timeout)` in steps of at most WAKE."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while thread.is_alive():
        left = WAKE if deadline is None else deadline - time.monotonic()
        if left <= 0:
            return
        thread.join(min(WAKE, left))


def _program(argv: list[str]) -> str | None:
    """The program `argv` runs, found as `which` finds it (None: as Popen finds it). An
    unprivileged user's PATH usually lacks the sbin directories, where e2fsprogs and
    other tools live that need no root for work on files."""
    if argv and "/" not in argv[0]:
        return which(argv[0])
    return None


def pass_on(line: str, *, logfile: IO[str] | None, on_line: Callable[[str], None] | None, quiet: bool) -> None:
    """Hand one line of a command's output to where run() sends it: the log file, the
    caller's line callback, and the debug log unless quiet."""
    if logfile is not None:
        logfile.write(line)
    if on_line is not None:
        on_line(line)
    if not quiet:
        log.debug("  | %s", line.rstrip("\n"))


def run(
    argv: Sequence[str | os.PathLike],
    *,
    check: bool = True,
    input: bytes | str | None = None,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = None,
    what: str = "",
    logfile: IO[str] | None = None,
    quiet: bool = False,
    on_line: Callable[[str], None] | None = None,
    redact: Sequence[str] = (),
) -> Result:
    """Run `argv` to completion and return its combined output.

    Output is logged line by line at debug level (copied to `logfile`, and each line
    handed to `on_line`, on the reader's thread, e.g. to count progress), and the last
    lines are kept for the error raised when the command fails and `check` is true.
    An exception (Ctrl-C included) while it runs ends the command's whole process group
    before propagating. Every string in `redact` is replaced by `***` in each line before
    it is logged, kept or handed on (a secret a command may print, as shell tracing does).
    """
    command: list[str] = [os.fspath(a) for a in argv]
    secrets = sorted((s for s in redact if s), key=len, reverse=True)
    full_env = dict(os.environ if env is None else env)
    if extra_env:
        full_env.update(extra_env)
    full_env.setdefault("LC_ALL", "C")
    session = lifetime.session()
    full_env[lifetime.COOKIE] = session.token
    if not quiet:
        log.debug("run: %s", _show(command))
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            command,
            executable=_program(command),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as e:
        raise CommandError(command, None, str(e), what) from None
    session.add("pgid", proc.pid)
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=TAIL_LINES)

    def feed() -> None:
        if input is not None:
            data = input.encode() if isinstance(input, str) else input
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(data)  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            for secret in secrets:
                line = line.replace(secret, "***")
            lines.append(line)
            tail.append(line)
            pass_on(line, logfile=logfile, on_line=on_line, quiet=quiet)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    # The output is read on a thread of its own and the deadline kept by waiting for the
    # process: a silent hang prints nothing, and a process outside the group may hold the
    # pipe open after the command is gone (an SSH master connection, to which the client
    # handed its output, keeps it until the remote command ends).
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        try:
            _wait(proc, timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(proc, grace=2.0)
        # What the command wrote before it ended is read to the end: without a deadline,
        # until the pipe closes; with one, until the deadline (a process it left behind
        # may hold the pipe), and after a timeout, what is already in the pipe.
        if timed_out:
            _join(reader, OUTPUT_LINGER)
        elif timeout is None:
            _join(reader, None)
        else:
            _join(reader, max(OUTPUT_LINGER, timeout - (time.monotonic() - start)))
    except BaseException:
        with deferred():
            _stop_group(proc)
        raise
    finally:
        feeder.join(timeout=1)
        session.remove("pgid", proc.pid)
    if timed_out:
        raise CommandError(command, proc.returncode, "".join(tail),
                           (what or "command") + f" timed out after {timeout:.0f} s")
    seconds = time.monotonic() - start
    result = Result(command, proc.returncode, "".join(lines), seconds)
    if check and proc.returncode != 0:
        raise CommandError(command, proc.returncode, "".join(tail), what)
    return result


def output(argv: Sequence[str | os.PathLike], **kw) -> str:
    """Run `argv` (checked) and return its output, stripped."""
    return run(argv, quiet=kw.pop("quiet", True), **kw).output.strip()


def which(name: str) -> str | None:
    """The full path of program `name` on PATH (sbin directories included), or None."""
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    for d in path.split(":"):
        p = Path(d or ".") / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def require(*programs: str) -> None:
    """Raise a BakeError naming every program in `programs` that is not installed."""
    missing = [p for p in programs if which(p) is None]
    if missing:
        raise BakeError(
            "missing program(s): " + ", ".join(missing) + " — run scripts/setup to install what bake needs"
        )


# --- mounts ---------------------------------------------------------------------------

# The mount points and chroot roots (real paths) this process mounted on and has not yet
# undone, with how many times: what bake may unmount of a tree is what it mounted there.
_own: dict[str, int] = {}
_own_lock = threading.Lock()


@contextlib.contextmanager
def _owning(kind: str, path: str | os.PathLike) -> Iterator[str]:
    """Record `path` as bake's own ("mount" point or "chroot" root) for the block, in this
    process and in its journal (for the next bake, should this one be killed)."""
    real = os.path.realpath(path)
    with lifetime.tracked(kind, real):
        with _own_lock:
            _own[real] = _own.get(real, 0) + 1
        try:
            yield real
        finally:
            with _own_lock:
                _own[real] -= 1
                if not _own[real]:
                    del _own[real]


def mounts_under(path: str | os.PathLike) -> list[str]:
    """Mount points at or below `path`, deepest first (read from mountinfo)."""
    return [m.target for m in mountinfo.under(path)]


def _unmount(targets: list[str]) -> None:
    """Unmount `targets` in their order (lazily as a last resort)."""
    for target in targets:
        r = run(["umount", target], check=False, quiet=True)
        if r.returncode != 0:
            run(["umount", "-l", target], check=False, quiet=True)


def unmount_all_under(path: str | os.PathLike) -> list[str]:
    """Unmount everything mounted at or below `path`, deepest first (lazily as a last
    resort); returns the mount points still there after."""
    _unmount(mounts_under(path))
    return mounts_under(path)


def own_mounts_under(path: str | os.PathLike) -> list[str]:
    """The mount points at or below `path` that lie in what this process mounted on or
    made a chroot of (its record, checked against mountinfo), deepest first."""
    with _own_lock:
        roots = list(_own)
    return [t for t in mounts_under(path) if any(t == r or t.startswith(r.rstrip("/") + "/") for r in roots)]


def discard_tree(path: str | os.PathLike, *, ignore_errors: bool = False) -> None:
    """Remove the tree `path` that bake made: first unmount, deepest first, what bake
    mounted in it; then remove it, never across a mount (one bake did not make, or could
    not undo, stops the removal with `removal.MountBoundaryError`, naming it)."""
    _unmount(own_mounts_under(path))
    removal.remove_tree(path, ignore_errors=ignore_errors)


@contextlib.contextmanager
def mount(source: str, target: str | os.PathLike, *, fstype: str | None = None,
          options: str | None = None, bind: bool = False) -> Iterator[Path]:
    """Mount `source` on `target` for the duration of the block; unmounted on any exit."""
    target = Path(target)
    argv = ["mount"]
    if bind:
        argv.append("--bind")
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", options]
    argv += [source, str(target)]
    with _owning("mount", target):
        try:
            run(argv, what=f"mounting {source} on {target}", quiet=True)
            yield target
        finally:
            with deferred():
                unmount_all_under(target)


@contextlib.contextmanager
def loop_device(image: str | os.PathLike, *, read_only: bool = False) -> Iterator[str]:
    """Attach `image` to a free loop device; detached on any exit."""
    argv = ["losetup", "--find", "--show"]
    if read_only:
        argv.append("--read-only")
    # journalled by its file before it is attached: a kill in between still leaves a trace
    with lifetime.tracked("loop", os.path.realpath(image)):
        dev = output(argv + [os.fspath(image)], what=f"attaching {image} to a loop device")
        try:
            yield dev
        finally:
            with deferred():
                run(["losetup", "-d", dev], check=False, quiet=True)


# --- chroots --------------------------------------------------------------------------

def chroot_processes(root: str | os.PathLike) -> list[int]:
    """PIDs of processes whose root directory is `root` (or below it). A process in a
    mount namespace of its own (a confined command) whose root the kernel cannot name
    from here (on a build box that is itself a chroot, it names it from the real root) is
    found by the root folder itself: the same device and inode."""
    real = os.path.realpath(root)
    try:
        st = os.stat(real)
        same = (st.st_dev, st.st_ino)
    except OSError:
        same = None
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            r = os.readlink(f"/proc/{entry}/root")
            if r == real or r.startswith(real.rstrip("/") + "/"):
                pids.append(int(entry))
            elif same is not None:
                s = os.stat(f"/proc/{entry}/root")
                if (s.st_dev, s.st_ino) == same:
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def kill_chroot_processes(root: str | os.PathLike) -> list[int]:
    """End every process running inside `root`; returns the PIDs that had to be ended."""
    pids = chroot_processes(root)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and chroot_processes(root):
            time.sleep(0.1)
        if not chroot_processes(root):
            break
    if pids:
        log.warning("ended %d process(es) left running in %s", len(pids), root)
    return pids


@contextlib.contextmanager
def chroot_guard(root: str | os.PathLike) -> Iterator[Path]:
    """For a tree that processes chroot into (and mount things in) during the block: on
    exit, end any process left in it and undo every mount under it; while it lasts, it
    is in the journal, so that a killed bake's watchdog ends its processes and the next
    bake its mounts."""
    root = Path(root)
    with _owning("chroot", root):
        try:
            yield root
        finally:
            with deferred():
                kill_chroot_processes(root)
                unmount_all_under(root)


@contextlib.contextmanager
def chroot_mounts(root: str | os.PathLike) -> Iterator[Path]:
    """Mount in `root` what a command run in it sees outside its own namespaces (see
    `confine`, through which every such command runs): proc with its kernel-changing files
    read-only, a read-only sysfs and a minimal /dev of the tree's own, none of the build
    host's devices. On exit, end any process left in the chroot and undo every mount under
    it. A BakeError, with nothing mounted, for a tree whose /proc, /sys or /dev is a symlink
    or no folder."""
    with chroot_guard(root) as root:
        try:
            confine.mount_tree(root)
        except OSError as e:
            raise BakeError(f"mounting /proc, /sys and /dev in the chroot {root}: {e.strerror or e}") from None
        yield root


# What a command run in an image's root starts from (nothing of the build host's environment),
# in a chroot and in the appliance alike.
IMAGE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C",
    "LANG": "C",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "TERM": "dumb",
}


# --- long-lived processes -------------------------------------------------------------

@contextlib.contextmanager
def background(argv: Sequence[str | os.PathLike], *, stdout: IO | int | None = None,
               stderr: IO | int | None = None, stdin: IO | int | None = None,
               env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
               grace: float = 5.0, pass_fds: Sequence[int] = ()) -> Iterator[subprocess.Popen]:
    """Start `argv` and yield its Popen; on any exit its whole process group is ended."""
    command: list[str] = [os.fspath(a) for a in argv]
    log.debug("start: %s", _show(command))
    session = lifetime.session()
    full_env = dict(os.environ if env is None else env)
    full_env[lifetime.COOKIE] = session.token
    try:
        proc = subprocess.Popen(
            command,
            executable=_program(command),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.DEVNULL if stdout is None else stdout,
            stderr=subprocess.STDOUT if stderr is None and stdout is not None else (stderr or subprocess.DEVNULL),
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
    except OSError as e:
        raise CommandError(command, None, str(e)) from None
    session.add("pgid", proc.pid)
    try:
        yield proc
    finally:
        with deferred():
            _stop_group(proc, grace)
        session.remove("pgid", proc.pid)
