"""libguestfs for bake: an image opened in its appliance, and what bake reads out of it.

Every handle is opened by `opened`, which chooses the accelerator as the verification
does (TCG where KVM does not really boot kernels here), puts the appliance's QEMU in a
process group of its own that bake's journal lists (and its environment carries the
session's cookie, so a killed bake's watchdog ends it), and shuts it down on any exit.
Each libguestfs call runs on a worker thread while the main thread waits in short steps,
so Ctrl-C is handled during a 20-second launch or a two-minute `tar_out` too: the call
is cancelled and the appliance stopped. libguestfs's errors come out as BakeErrors that
say what bake was doing (`doing`).

What bake reads out of an image: `inspect` (distribution, release, kernels, filesystem),
`extract_tree` (the root tree, exactly) and `boot_files` (a kernel and its initrd).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import guestfs

from builder.core import lifetime, sh
from builder.core.cache import TAR_FLAGS
from builder.core.errors import BakeError
from builder.core.interrupts import deferred
from ..vm import accel as vm_accel
from builder.base.holes import data_layout, restore_holes

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

def _version_key(version: str) -> list:
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
    _, kernel, initrd = max(found, key=lambda f: _version_key(f[0]))
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


class Handle(guestfs.GuestFS):
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


# --- inspection -----------------------------------------------------------------------

def _key_values(text: str) -> dict[str, str]:
    """KEY=value lines (os-release, lsb-release), quotes removed."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            out[key] = value
    return out


def _read_release(g: guestfs.GuestFS) -> dict[str, str]:
    """/etc/os-release (or /usr/lib/os-release) with /etc/lsb-release's DISTRIB_* beside it."""
    facts: dict[str, str] = {}
    for path in ("/etc/lsb-release", "/usr/lib/os-release", "/etc/os-release"):
        if g.is_file(path, followsymlinks=True):
            facts.update(_key_values(g.cat(path)))
    return facts


def _init_system(g: guestfs.GuestFS) -> str | None:
    """As the chroot path tells it (`customize.detect_init_system`), None for neither."""
    if g.exists("/sbin/initctl") or g.exists("/sbin/initctl.distrib"):
        return "upstart"
    if g.exists("/lib/systemd/systemd") or g.exists("/usr/lib/systemd/systemd"):
        return "systemd"
    return None


def _kernels(g: guestfs.GuestFS) -> list[str]:
    if not g.is_dir("/boot", followsymlinks=True):
        return []
    versions = [n.removeprefix("vmlinuz-") for n in g.ls("/boot") if n.startswith("vmlinuz-")]
    return sorted(versions, key=_version_key)


def inspect(image: Path) -> dict:
    """What the bare filesystem image `image` holds, by libguestfs's inspection and its
    superblock: distro, version ("12", "10.04"), codename, product, package_format,
    package_management, kernels (the versions of /boot/vmlinuz-*, oldest first), fs_type,
    label, uuid, init_system ("systemd", "upstart" or None) and arch. An image that
    inspection does not take for a root (it looks for /etc/fstab or /etc/hosts) is
    described from its os-release alone; one with neither is a BakeError."""
    image = Path(image)
    with opened([image], mount=False) as g, doing(f"inspecting {image.name}"):
        device = g.list_devices()[0]
        roots = g.inspect_os()
        facts: dict[str, Any] = {"distro": None, "version": None, "codename": None, "product": None,
                                 "package_format": None, "package_management": None, "arch": None}
        major = minor = None
        if roots:
            root = roots[0]
            unknown = lambda v: None if v in ("unknown", "") else v  # noqa: E731
            facts.update(distro=unknown(g.inspect_get_distro(root)),
                         product=unknown(g.inspect_get_product_name(root)),
                         package_format=unknown(g.inspect_get_package_format(root)),
                         package_management=unknown(g.inspect_get_package_management(root)),
                         arch=unknown(g.inspect_get_arch(root)))
            major, minor = g.inspect_get_major_version(root), g.inspect_get_minor_version(root)
            g.mount_ro(root, "/")
        else:
            g.mount_ro(device, "/")
        release = _read_release(g)
        if not roots and not release:
            raise BakeError(f"{image}: no operating system found in it (no /etc/os-release, no /etc/lsb-release)")
        facts["distro"] = facts["distro"] or (release.get("ID") or release.get("DISTRIB_ID", "")).lower() or None
        facts["product"] = facts["product"] or release.get("PRETTY_NAME") or release.get("DISTRIB_DESCRIPTION")
        facts["version"] = release.get("VERSION_ID") or release.get("DISTRIB_RELEASE") or _version(
            facts["distro"], major, minor)
        in_version = re.search(r"\(([a-z]+)\)", release.get("VERSION", ""))
        facts["codename"] = (release.get("VERSION_CODENAME") or release.get("UBUNTU_CODENAME")
                             or release.get("DISTRIB_CODENAME") or (in_version.group(1) if in_version else None))
        facts["kernels"] = _kernels(g)
        facts["init_system"] = _init_system(g)
        facts["fs_type"] = g.vfs_type(device)
        facts["label"] = g.vfs_label(device)
        facts["uuid"] = g.vfs_uuid(device)
    return facts


def _version(distro: str | None, major: int | None, minor: int | None) -> str | None:
    if not major:
        return None
    if distro == "ubuntu":
        return f"{major}.{minor or 0:02d}"
    return f"{major}.{minor}" if minor else str(major)


# --- the root tree --------------------------------------------------------------------

def extract_tree(image: Path, tree: Path) -> None:
    """Copy the root tree of the bare filesystem image `image` into `tree` (made; it must
    be absent or empty) through libguestfs, exactly: numeric owners, modes, xattrs of
    every namespace (file capabilities too), ACLs, hard links, device nodes, fifos and
    holes. The filesystem's own lost+found is left out. Needs root (owners and device
    nodes are made on the host), but not a loop device or a mount.

    The tree comes out through `tar_out`, which writes sparse files in full; where an
    ext2/3/4 image has holes (debugfs reads its extent maps, no mount needed) they are
    punched again on the host, so the tree's files hold data exactly where the image's
    do. For another filesystem the holes are lost (a warning says so)."""
    image, tree = Path(image), Path(tree)
    if os.geteuid() != 0:
        raise BakeError("copying a base image's tree out needs root: its owners and device nodes are made on the host")
    if tree.exists() and (not tree.is_dir() or any(tree.iterdir())):
        raise BakeError(f"{tree}: the base's tree goes into a new or empty folder, and this is not one")
    layout = data_layout(image)
    tree.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with opened([image]) as g, doing(f"copying the root tree of {image.name} out of the appliance"):
        _tar_out(g, tree)
    holes = restore_holes(tree, layout) if layout is not None else 0
    log.info("root tree of %s copied out in %.1f s (%d file(s) with holes)", image.name, time.monotonic() - start,
             holes)


def _tar_out(g: guestfs.GuestFS, tree: Path) -> None:
    """`tar_out` of the image's / streamed through a pipe into `tar -x` in `tree`."""
    extract = ["tar", *TAR_FLAGS, "--same-owner", "--same-permissions", "-C", str(tree), "-xf", "-"]
    with tempfile.TemporaryFile() as err:
        r, w = os.pipe()
        try:
            with sh.background(extract, stdin=r, stderr=err) as tar:
                os.close(r)
                r = -1
                failure: ApplianceError | None = None
                try:
                    g.tar_out("/", f"/dev/fd/{w}", numericowner=True, xattrs=True, acls=True,
                              excludes=["./lost+found"])
                except ApplianceError as e:
                    failure = e
                os.close(w)
                w = -1
                while True:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        tar.wait(WAKE)
                        break
        finally:
            with deferred():
                for fd in (r, w):
                    if fd >= 0:
                        os.close(fd)
        # tar's own words first: libguestfs only says the pipe broke
        if tar.returncode != 0:
            err.seek(0)
            tail = err.read()[-ERROR_TAIL:].decode(errors="replace")
            raise sh.CommandError(extract, tar.returncode, tail, "unpacking the tree that libguestfs's tar_out sent")
        if failure is not None:
            raise failure


# --- boot files -----------------------------------------------------------------------

def boot_files(image: Path, dest: Path, version: str | None = None) -> tuple[Path, Path | None, str]:
    """Copy /boot/vmlinuz-VERSION and /boot/initrd.img-VERSION out of the bare filesystem
    image `image` into folder `dest` (made) under those names. Without `version`: the
    newest kernel that has an initrd (the newest kernel when none has). Returns (kernel,
    ramdisk or None, version); a BakeError when there is no such kernel."""
    image, dest = Path(image), Path(dest)
    with opened([image]) as g, doing(f"copying the kernel out of {image.name}"):
        names = g.ls("/boot") if g.is_dir("/boot", followsymlinks=True) else []
        kernels = [n.removeprefix("vmlinuz-") for n in names if n.startswith("vmlinuz-")]
        initrds = {n.removeprefix("initrd.img-") for n in names if n.startswith("initrd.img-")}
        if version is None:
            if not kernels:
                raise BakeError(f"{image}: no kernel in its /boot (no /boot/vmlinuz-*)")
            version = max([v for v in kernels if v in initrds] or kernels, key=_version_key)
        elif version not in kernels:
            raise BakeError(f"{image}: no /boot/vmlinuz-{version} in it (kernels there: "
                            f"{', '.join(sorted(kernels, key=_version_key)) or 'none'})")
        dest.mkdir(parents=True, exist_ok=True)
        kernel = dest / f"vmlinuz-{version}"
        g.download(f"/boot/vmlinuz-{version}", str(kernel))
        ramdisk = None
        if version in initrds:
            ramdisk = dest / f"initrd.img-{version}"
            g.download(f"/boot/initrd.img-{version}", str(ramdisk))
    return kernel, ramdisk, version


# --- layouts the host cannot read -----------------------------------------------------

def root_filesystem(disk: Path, fmt: str, dest: Path) -> str:
    """The root filesystem of `disk` (QEMU format `fmt`) where the host cannot reach it
    (a root on LVM: no device-mapper is needed here), found by libguestfs's inspection
    and copied to `dest`; returns its device in the appliance (e.g. /dev/vg0/root).
    `dest` is then made sparse on the host (`fallocate --dig-holes`)."""
    with opened([Path(disk)], readonly=True, mount=False, fmt=fmt) as g:
        with doing(f"looking for the root filesystem of {Path(disk).name}"):
            roots = g.inspect_os()
        if len(roots) != 1:
            found = ", ".join(roots) or "none"
            raise BakeError(f"{disk}: libguestfs's inspection finds {len(roots)} operating system roots ({found}); "
                            "bake takes a base with exactly one")
        root = roots[0]
        with doing(f"copying {root} out of {Path(disk).name}"):
            g.download(root, str(dest))
    sh.run(["fallocate", "--dig-holes", str(dest)], what="making the copied filesystem sparse")
    return root
