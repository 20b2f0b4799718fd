"""A local instance: a build's kernel, ramdisk and partition image booted under QEMU the
way a Eucalyptus KVM node controller boots them.

    -machine pc (PCI hot-plug goes through ACPI, as on the node), virtio disk and NIC,
    -kernel/-initrd/-append "root=/dev/vda1 console=ttyS0" (plus `norandmaps` under TCG, see
    accel.Accel.kernel_args), memory and CPUs of the
    instance type, the node-style MBR disk through a per-instance qcow2 overlay,
    user-mode networking with 169.254.169.254:80 forwarded to the metadata service and
    a host port forwarded to the guest's SSH, QMP on a socket pair, the serial console
    captured to `<workdir>/<name>/console.log`.

`launch` is a context manager: on any exit (a failed check, Ctrl-C) QEMU's process group
is ended and the overlay removed; the console log, QEMU's messages, the QMP events and
the metadata requests stay in the instance's folder as evidence.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from builder.core import lifetime, sh
from builder.core.interrupts import deferred
from builder.core.errors import BakeError
from builder.core.removal import remove_tree
from . import disk, metadata
from .accel import Accel
from .console import Console
from .guest import SSH
from .qmp import Monitor, QMPFailure

NETWORK = "169.254.169.0/24"  # holds the metadata address, as user-mode forwards require
GUEST_IPV4 = "169.254.169.15"  # the first address the user-mode DHCP server hands out
# lines after which the ready line cannot come: the kernel or the initramfs gave up
BOOT_FAILED = re.compile(r"Kernel panic - not syncing|Failed to mount \S+ as root file system|"
                         r"Gave up waiting for root|Dropping to a shell|Unable to mount root fs")
# how many times its timeout a boot that keeps printing may take in all (see wait_ready)
BUSY_HOST_FACTOR = 3
READY = re.compile(r"bake-ready first_boot=(?P<first_boot>yes|no) instance_id=(?P<instance_id>\S*) "
                   r"uptime=(?P<uptime>[\d.]+)")


@dataclass(frozen=True)
class Trio:
    """The three files a paravirtual instance boots from."""

    kernel: Path
    ramdisk: Path
    image: Path

    @classmethod
    def from_build(cls, build) -> "Trio":
        return cls(build.output_path("kernel"), build.output_path("ramdisk"), build.output_path("image"))


@dataclass
class Ready:
    """What the guest's `bake-ready` line said, and when it came."""

    first_boot: bool
    instance_id: str
    uptime: float        # seconds, as the guest counts them
    seconds: float       # since QEMU was started (or since `since` for a reboot)
    line: str


@dataclass
class Volume:
    id: str
    path: Path
    serial: str
    size: int


_HOST_FORWARD = re.compile(r"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+22\b")


def _forwarded_ssh_port(qmp: Monitor) -> int:
    """The host port QEMU's user network bound for the guest's SSH. QEMU is given port 0
    and the kernel picks a free one as it binds, so that instances started at the same
    time (parallel bakes) can never be handed the same port."""
    table = qmp.execute("human-monitor-command", {"command-line": "info usernet"})
    m = _HOST_FORWARD.search(table or "")
    if not m:
        raise BakeError(f"QEMU did not report its SSH port forward; `info usernet` said: {table!r}")
    return int(m.group(1))


def _opt(value: str) -> str:
    """Escape a value for a QEMU option list (commas are doubled)."""
    return value.replace(",", ",,")


class Instance:
    """A running local instance (made by `launch`)."""

    def __init__(self, name: str, folder: Path, proc: subprocess.Popen, console: Console, qmp: Monitor,
                 ssh: SSH | None, instance_id: str, accel: Accel, itype: disk.InstanceType,
                 metadata_file: Path, started: float, scratch: Path, kernel_command_line: str = "",
                 user_data: str | None = None):
        self.name = name
        self.folder = folder
        self.proc = proc
        self.console = console
        self.qmp = qmp
        self.ssh = ssh
        self.instance_id = instance_id
        self.accel = accel
        self.type = itype
        self.metadata_file = metadata_file
        self.started = started
        self.scratch = scratch
        self.volumes: dict[str, Volume] = {}
        self.kernel_command_line = kernel_command_line
        self.user_data = user_data

    # --- boot ---------------------------------------------------------------------

    def wait_ready(self, *, timeout: float, since: int = 0, since_time: float | None = None) -> Ready:
        """Wait for the image's end-of-boot line (`bake-ready ...`) on the console: until
        the guest has printed nothing for `timeout` seconds, or for BUSY_HOST_FACTOR times
        `timeout` in all (an emulated guest on a busy build box boots slowly, and says so
        line by line; a hung one goes silent)."""
        m = self.console.wait_for(READY, timeout=timeout * BUSY_HOST_FACTOR, quiet=timeout, since=since,
                                  fail=BOOT_FAILED, what=f"the end-of-boot line 'bake-ready' from instance {self.name}")
        t0 = self.started if since_time is None else since_time
        return Ready(m["first_boot"] == "yes", m["instance_id"], float(m["uptime"]),
                     round(time.monotonic() - t0, 2), m.string.strip())

    def update_metadata(self, *, ssh_public_key: str | None) -> None:
        """Change the key the metadata service serves this instance from now on (its
        user data stays what the instance was launched with)."""
        tree = metadata.metadata_tree(instance_id=self.instance_id, local_ipv4=GUEST_IPV4,
                                      hostname=self.instance_id, ssh_public_key=ssh_public_key,
                                      instance_type=self.type.name)
        metadata.write_metadata(self.metadata_file, tree, self.user_data)

    def metadata_requests(self) -> list[dict]:
        """Requests the guest made to the metadata service so far."""
        return metadata.request_log(self.metadata_file)

    # --- volumes --------------------------------------------------------------------

    def attach_volume(self, path: Path, *, volume_id: str | None = None, serial: str | None = None) -> Volume:
        """Hot-plug the raw file `path` as a virtio-blk disk (QMP blockdev-add + device_add),
        as the node does for AttachVolume."""
        volume_id = volume_id or f"vol-{secrets.token_hex(4)}"
        serial = (serial or volume_id)[:20]
        node = f"{volume_id}-file"
        # no host flushes (cache.no-flush): the guest's syncs would cost a disk flush each
        # under emulation; writes still reach the file before QEMU exits, even on QMP quit
        self.qmp.execute("blockdev-add", {"node-name": node, "driver": "raw",
                                          "cache": {"direct": False, "no-flush": True},
                                          "file": {"driver": "file", "filename": os.fspath(path)}})
        try:
            self.qmp.execute("device_add", {"driver": "virtio-blk-pci", "id": volume_id, "drive": node,
                                            "serial": serial})
        except QMPFailure:
            with contextlib.suppress(QMPFailure):
                self.qmp.execute("blockdev-del", {"node-name": node})
            raise
        vol = Volume(volume_id, Path(path), serial, Path(path).stat().st_size)
        self.volumes[volume_id] = vol
        return vol

    def detach_volume(self, volume_id: str, *, timeout: float = 30) -> None:
        """Unplug a volume (device_del) and wait until the guest released it (the
        DEVICE_DELETED event, which needs the guest's ACPI hot-plug driver)."""
        self.qmp.execute("device_del", {"id": volume_id})
        self.qmp.wait_event("DEVICE_DELETED", timeout=timeout, match={"device": volume_id},
                            what=f"the guest to release volume {volume_id}")
        self.qmp.execute("blockdev-del", {"node-name": f"{volume_id}-file"})
        self.volumes.pop(volume_id, None)

    # --- power ----------------------------------------------------------------------

    def kill(self, timeout: float = 15) -> int | None:
        """Power off at once through QMP `quit` (no guest shutdown) and wait for QEMU to end."""
        self.qmp.quit()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BakeError(f"QEMU of instance {self.name} did not exit within {timeout:.0f} s of QMP quit") from None

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def launch(trio: Trio, base_disk: Path, workdir: Path, *, name: str = "a", accel: Accel,
           instance_type: str = "m1.small", ssh_public_key: str | None = None, ssh_key: Path | None = None,
           ssh_user: str | None = None, append: str = "", instance_id: str | None = None,
           user_data: str | None = None) -> Iterator[Instance]:
    """Boot an instance of `trio` (whose node-style disk is `base_disk`, see disk.node_disk).

    `user_data`, when given, is what the metadata service serves at `user-data` (as
    `euca-run-instances -f` passes it); without it that path is a 404, as for an
    instance run without user data.

    Yields as soon as QEMU runs; wait for the guest with `Instance.wait_ready`. Its files
    go to `workdir/name/` (emptied first). On exit QEMU is ended and the overlay removed.
    """
    sh.require("qemu-system-x86_64", "qemu-img")
    itype = disk.instance_type(instance_type)
    folder = Path(workdir) / name
    if folder.exists():
        remove_tree(folder)
    folder.mkdir(parents=True)
    instance_id = instance_id or f"i-{secrets.token_hex(4)}"
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=workdir))
    qmp_host, qmp_guest = socket.socketpair()
    session = lifetime.session()
    session.add("path", scratch, what="instance overlay folder")
    try:
        root = disk.overlay(base_disk, scratch / "root.qcow2")
        md_file = folder / "metadata.json"
        metadata.write_metadata(md_file, metadata.metadata_tree(
            instance_id=instance_id, local_ipv4=GUEST_IPV4, hostname=instance_id,
            ssh_public_key=ssh_public_key, instance_type=itype.name), user_data)
        server = " ".join(shlex.quote(a) for a in (sys.executable, "-I", os.path.abspath(metadata.__file__),
                                                    str(md_file)))
        netdev = (f"user,id=net0,net={NETWORK},hostname={instance_id},"
                  "hostfwd=tcp:127.0.0.1:0-:22,"
                  f"guestfwd=tcp:169.254.169.254:80-cmd:{_opt(server)}")
        cmdline = " ".join(["root=/dev/vda1 console=ttyS0", *accel.kernel_args(), append]).strip()
        argv = [
            "qemu-system-x86_64", "-name", f"bake-{name},debug-threads=off",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "pc", *accel.qemu_args(),
            "-m", str(itype.memory_mib), "-smp", str(itype.cpus),
            "-chardev", "stdio,id=ttyS0,signal=off", "-serial", "chardev:ttyS0",
            "-chardev", f"socket,id=qmp,fd={qmp_guest.fileno()}", "-mon", "chardev=qmp,mode=control",
            "-kernel", str(trio.kernel), "-initrd", str(trio.ramdisk),
            "-append", cmdline,
            "-drive", f"file={_opt(str(root))},if=none,id=root,format=qcow2,cache=unsafe",
            "-device", "virtio-blk-pci,drive=root,id=root-disk",
            "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0",
        ]
        (folder / "qemu.argv").write_text(" ".join(shlex.quote(a) for a in argv) + "\n")
        with open(folder / "qemu.log", "wb") as qemu_log, \
                sh.background(argv, stdout=subprocess.PIPE, stderr=qemu_log, pass_fds=[qmp_guest.fileno()],
                              grace=2) as proc:
            started = time.monotonic()
            qmp_guest.close()
            assert proc.stdout is not None  # stdout=PIPE
            console = Console(proc.stdout, folder / "console.log", proc)
            qmp = ssh = None
            try:
                try:
                    qmp = Monitor(qmp_host, folder / "qmp-events.jsonl", name=name)
                except QMPFailure:
                    try:  # a QEMU that refused its arguments is exiting as the greeting fails
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        raise QMPFailure(f"QEMU of instance {name} runs but did not greet on QMP") from None
                    said = (folder / "qemu.log").read_text(errors="replace").strip().splitlines()[-5:]
                    raise BakeError(f"QEMU of instance {name} exited at start (status {proc.returncode}): "
                                    + (" / ".join(said) or "it printed nothing")) from None
                if ssh_key and ssh_user:
                    # a short path: a socket's name must fit in 108 bytes
                    control_dir = Path(tempfile.mkdtemp(prefix="bake-ssh-"))
                    session.add("path", control_dir, what="SSH control folder")
                    ssh = SSH(_forwarded_ssh_port(qmp), ssh_user, ssh_key, control=control_dir / "c")
                yield Instance(name, folder, proc, console, qmp, ssh, instance_id, accel, itype, md_file,
                               started, scratch, kernel_command_line=cmdline, user_data=user_data)
            finally:
                with deferred():
                    if ssh is not None:
                        ssh.close()
                        if ssh.control is not None:  # always: it was made with one above
                            shutil.rmtree(ssh.control.parent, ignore_errors=True)
                            session.remove("path", ssh.control.parent)
                    if qmp is not None:
                        qmp.close()
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, 9)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(10)
                    console.close()
    finally:
        with deferred():
            qmp_host.close()
            qmp_guest.close()
            shutil.rmtree(scratch, ignore_errors=True)
            session.remove("path", scratch)
