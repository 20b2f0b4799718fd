"""libguestfs for bake: an image opened in its appliance, and what bake reads out of it.

Every handle is opened by `opened`, which chooses the accelerator as the verification
does (TCG where KVM does not really boot kernels here), puts the appliance's QEMU in a
process group of its own that bake's journal lists (and its environment carries the
session's cookie, so a killed bake's watchdog ends it), and shuts it down on any exit.
Each libguestfs call runs on a worker thread while the main thread waits in short steps,
so Ctrl-C is handled during a 20-second launch or a two-minute `tar_out` too: the call
is cancelled and the appliance stopped. libguestfs's errors come out as BakeErrors that
say what bake was doing (`doing`).

What bake reads out of an image through these handles is `readout`'s.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import guestfs
except ImportError:  # Debian's python3-guestfs, not on PyPI: only what opens an image needs it
    guestfs = None

from builder.core import lifetime
from builder.core.errors import BakeError
from builder.core.interrupts import deferred
from ..vm import accel as vm_accel

log = logging.getLogger("bake.base")

WAKE = 0.5               # the longest the main thread blocks in one wait
CANCEL_WAIT = 20.0       # how long an interrupted call may take to give up
ERROR_TAIL = 4000


class ApplianceError(BakeError):
    """A libguestfs call failed; the message says what bake was doing, the call and
    libguestfs's own words (`detail`)."""

    def __init__(self, message: str, call: str, detail: str):
        super().__init__(message)
        self.call, self.detail = call, detail


# --- the accelerator ------------------------------------------------------------------

def version_key(version: str) -> list:
    """Sort key for kernel versions: numbers compare as numbers (6.1.0-10 after 6.1.0-9)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", version) if p]


def _host_kernel() -> tuple[Path, Path] | None:
    """The host's newest /boot/vmlinuz-V that has an /boot/initrd.img-V: what supermin
    builds libguestfs's appliance from."""
    found = []
    for k in Path("/boot").glob("vmlinuz-*"):
        v = k.name.removeprefix("vmlinuz-")
        initrd = k.with_name(f"initrd.img-{v}")
        if initrd.is_file() and os.access(k, os.R_OK):
            found.append((v, k, initrd))
    if not found:
        return None
    _, kernel, initrd = max(found, key=lambda f: version_key(f[0]))
    return kernel, initrd


_chosen: dict[tuple[Path, Path], vm_accel.Accel] = {}


def settings() -> tuple[str, list[str], str]:
    """(backend, backend settings, why) for libguestfs: the direct backend, with
    `force_tcg` unless KVM really boots kernels here. LIBGUESTFS_BACKEND_SETTINGS in the
    environment wins; without a usable /dev/kvm it is TCG; otherwise the verification's
    probe (`vm.accel.choose`, which also honours BAKE_ACCEL) boots the kernel the
    appliance boots, and TCG is forced where it says so."""
    given = os.environ.get("LIBGUESTFS_BACKEND_SETTINGS")
    if given is not None:
        return "direct", [s for s in given.split(":") if s], f"LIBGUESTFS_BACKEND_SETTINGS={given}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "direct", ["force_tcg"], "no usable /dev/kvm"
    boot = _host_kernel()
    if boot is None:
        return "direct", ["force_tcg"], "no /boot/vmlinuz-* with its initrd.img to probe KVM with"
    if boot not in _chosen:     # choose() asks QEMU its version each time: once per process is enough
        _chosen[boot] = vm_accel.choose(*boot)
    chosen = _chosen[boot]
    return "direct", ["force_tcg"] if chosen.name == "tcg" else [], f"{chosen.name}: {chosen.reason}"


# --- handles --------------------------------------------------------------------------

_doing = threading.local()


@contextlib.contextmanager
def doing(what: str) -> Iterator[None]:
    """Say, in the errors of the libguestfs calls made in the block, what they were for."""
    stack = _doing.__dict__.setdefault("stack", [])
    stack.append(what)
    try:
        yield
    finally:
        stack.pop()


def _what() -> str:
    stack = getattr(_doing, "stack", None)
    return stack[-1] if stack else "using libguestfs"


def _show_call(name: str, args: tuple) -> str:
    shown = []
    for a in args:
        s = repr(a)
        shown.append(s if len(s) <= 60 else s[:57] + "...")
    return f"{name}({', '.join(shown)})"


# Called on the handle itself, never on a worker thread: closing, and cancelling a call.
_DIRECT = frozenset({"close", "user_cancel", "set_event_callback", "delete_event_callback"})


class Handle(guestfs.GuestFS if guestfs is not None else object):  # type: ignore[misc]
    """A guestfs.GuestFS whose calls raise ApplianceError instead of RuntimeError and
    can be interrupted (see the module's docstring)."""

    qemu_pid: int | None = None

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or name in _DIRECT or not callable(attr):
            return attr

        def call(*args, **kw):
            return _call(self, name, attr, args, kw)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = attr.__doc__
        return call


def _new_handle() -> Handle:
    """A handle whose warnings are logged (see `_silence` for its errors)."""
    if guestfs is None:
        raise BakeError("opening an image needs libguestfs's Python binding (Debian's python3-guestfs), which this "
                        "Python cannot import: install it, and make bake's virtualenv with --system-site-packages")
    g = Handle(python_return_dict=True, close_on_exit=False)
    g.set_event_callback(lambda event, handle, buf, array: log.warning("libguestfs: %s", buf.strip()),
                         guestfs.EVENT_WARNING)
    _silence(g)         # for the calls made on this thread: configuration, close
    return g


def _error_handler_setter() -> Callable[[Handle], None] | None:
    try:
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        lib = ctypes.CDLL("libguestfs.so.0")
        lib.guestfs_set_error_handler.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.guestfs_set_error_handler.restype = None
    except (OSError, AttributeError):
        return None
    return lambda g: lib.guestfs_set_error_handler(get_pointer(g._o, b"guestfs_h"), None, None)


_set_no_error_handler = _error_handler_setter()


def _silence(g: Handle) -> None:
    """Keep libguestfs from writing its errors to stderr as well (they come out as
    exceptions): its error handler is per thread, so each worker sets it."""
    if _set_no_error_handler is not None and g._o:
        _set_no_error_handler(g)


def _call(g: Handle, name: str, fn: Callable, args: tuple, kw: dict) -> Any:
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            _silence(g)
            outcome["value"] = fn(*args, **kw)
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=work, name=f"libguestfs {name}", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(WAKE)
    except BaseException:
        with deferred():
            _cancel(g)
            worker.join(CANCEL_WAIT)
        raise
    if "error" in outcome:
        e = outcome["error"]
        if isinstance(e, RuntimeError):
            detail = str(e).strip()
            call = _show_call(name, args)
            raise ApplianceError(f"{_what()}: libguestfs {call} failed: {detail}", call, detail) from None
        raise e
    return outcome.get("value")


def _cancel(g: Handle) -> None:
    """Make the call under way return at once: cancel a transfer and stop the appliance
    (found among this process's children while it is still being launched)."""
    with contextlib.suppress(Exception):
        g.user_cancel()
    pids = [g.qemu_pid] if g.qemu_pid else _qemu_children()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _qemu_children() -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if int(fields[1]) == me and comm.startswith(("qemu", "supermin")):
            found.append(int(entry))
    return found


@contextlib.contextmanager
def opened(drives: list[Path], *, readonly: bool = True, lucid: bool = False,
           mount: bool = True, fmt: str = "raw") -> Iterator[guestfs.GuestFS]:
    """A launched libguestfs handle with `drives` added (in format `fmt`), the first drive's
    filesystem mounted at / when `mount` is true. `lucid` gives the appliance's kernel
    the vsyscall page Lucid-era glibc needs for `command` and `sh`. The appliance is
    shut down and the handle closed on any exit (a failed shutdown of a writable handle
    is an error: what was written may not be on the drive); the launch is logged with its
    time."""
    drives = [Path(d) for d in drives]
    names = ", ".join(d.name for d in drives)
    session = lifetime.session()        # the cookie is in os.environ before QEMU inherits it
    backend, backend_settings, why = settings()
    g = _new_handle()
    closed = False
    try:
        with doing(f"starting libguestfs for {names}"):
            g.set_backend(backend)
            g.set_backend_settings(backend_settings)
            # Its own process group: Ctrl-C at the terminal reaches bake, which stops the
            # appliance itself, and the journal can name the group.
            g.set_pgroup(True)
            if lucid:
                g.set_append(" ".join(filter(None, [g.get_append(), "vsyscall=xonly"])))
            for d in drives:
                g.add_drive_opts(str(d), format=fmt, readonly=readonly)
            start = time.monotonic()
            g.launch()
            g.qemu_pid = g.get_pid()
            session.add("pgid", g.qemu_pid, what="libguestfs appliance")
            log.info("libguestfs appliance for %s up in %.1f s (%s%s; %s)", names, time.monotonic() - start,
                     backend, "".join(f", {s}" for s in backend_settings), why)
        if mount:
            with doing(f"mounting the filesystem of {drives[0].name} in the appliance"):
                device = g.list_devices()[0]
                (g.mount_ro if readonly else g.mount)(device, "/")
        yield g
        with doing(f"shutting down the libguestfs appliance for {names}"):
            g.shutdown()
        g.close()
        closed = True
    finally:
        if not closed:
            with deferred():
                with contextlib.suppress(Exception):
                    g.close()       # kills QEMU and waits for it
        if g.qemu_pid:
            session.remove("pgid", g.qemu_pid)
