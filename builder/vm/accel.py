"""Which accelerator really boots kernels here: KVM where a probe boot shows it, else TCG.

On some hosts /dev/kvm exists but a stock kernel hangs early under it (a PVM flavour of
KVM). So the decision is made by booting the build's own kernel and ramdisk under KVM
for a few seconds: if the kernel gets as far as starting init, KVM is used; if not,
TCG (software emulation). The answer is remembered for the process and, per host boot,
QEMU version and kernel, in a small cache file, so a machine probes once.
`BAKE_ACCEL=kvm|tcg` overrides the probe.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from builder.core import sh
from builder.core.record import sha256_file
from .console import Console, GuestTimeout

log = logging.getLogger("bake.vm")

PROBE_SECONDS = 12.0
_cache: dict[str, "Accel"] = {}


@dataclass(frozen=True)
class Accel:
    name: str    # "kvm" or "tcg"
    reason: str  # why: the probe's outcome, an override, no /dev/kvm

    def qemu_args(self) -> list[str]:
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        # not "max": under TCG it offers SVM, the guest loads kvm_amd, and a guest reboot
        # (the sync agent's restore) then spent ~150 s before the kernel ran again
        # (measured here; ~17 s with qemu64). Without SVM (qemu64 has it too) the guest
        # does not load kvm and kvm_amd at boot: nested virtualization under emulation
        # is of no use to a verification instance. With RDRAND, as the node's CPU has
        # (-cpu host passes it), the guest's random pool is ready at once: without it,
        # under emulation, it took about 10 s and first-boot work waited for it.
        return ["-accel", "tcg", "-cpu", "qemu64,-svm,+rdrand"]

    def kernel_args(self) -> list[str]:
        """What the accelerator adds to the node's kernel command line.

        Under TCG: `norandmaps`. TCG keys the code it translates by virtual address, so
        with address-space randomization every process of the guest maps its shared
        libraries at new addresses and has them translated again; with fixed addresses
        the translations are shared. Measured on the demo image here: boot-to-ready
        25 s -> 19 s. It only changes where the guest's processes map their code, not
        what the image does; under KVM the node's command line is used unchanged."""
        return ["norandmaps"] if self.name == "tcg" else []


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bake" / "accel-probe.json"


def _key(kernel: Path) -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    version = sh.output(["qemu-system-x86_64", "--version"]).splitlines()[0]
    return f"{boot_id}|{version}|{sha256_file(kernel)}"


def probe_kvm(kernel: Path, ramdisk: Path, timeout: float = PROBE_SECONDS) -> tuple[bool, str]:
    """Boot `kernel`+`ramdisk` under KVM until the kernel starts init; (booted?, how it went)."""
    with tempfile.TemporaryDirectory(prefix="bake-kvm-probe-") as tmp:
        argv: list[str | Path] = [
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-machine", "pc",
            "-accel", "kvm", "-cpu", "host", "-m", "256", "-serial", "stdio",
            "-kernel", kernel, "-initrd", ramdisk, "-append", "console=ttyS0 panic=-1 root=/dev/null"]
        with sh.background(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, grace=1) as proc:
            assert proc.stdout is not None  # stdout=PIPE
            console = Console(proc.stdout, Path(tmp) / "console.log", proc)
            try:
                console.wait_for(r"Run /init as init process|Freeing unused kernel", timeout=timeout,
                                 what="the kernel to start init under KVM")
                return True, "a probe boot under KVM reached init"
            except GuestTimeout as e:
                first = str(e).splitlines()[0]
                return False, f"a probe boot under KVM did not reach init ({first})"
            finally:
                proc.kill()
                console.close()


def choose(kernel: Path, ramdisk: Path) -> Accel:
    """KVM if it really boots `kernel` here, TCG otherwise (see the module's docstring)."""
    forced = os.environ.get("BAKE_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return Accel(forced, "BAKE_ACCEL=" + forced)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "no usable /dev/kvm")
    key = _key(Path(kernel))
    if key in _cache:
        return _cache[key]
    cf = _cache_file()
    try:
        stored = json.loads(cf.read_text())
        if stored.get("key") == key:
            _cache[key] = Accel(**stored["accel"])
            return _cache[key]
    except (OSError, ValueError, TypeError, KeyError):
        pass
    ok, how = probe_kvm(Path(kernel), Path(ramdisk))
    accel = Accel("kvm" if ok else "tcg", how)
    log.info("accelerator: %s (%s)", accel.name, accel.reason)
    _cache[key] = accel
    try:
        cf.parent.mkdir(parents=True, exist_ok=True)
        cf.write_text(json.dumps({"key": key, "accel": asdict(accel)}))
    except OSError:
        pass
    return accel
