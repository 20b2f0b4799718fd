"""The acpiphp check's probe, run for real in a minimal chroot whose /proc/modules and
/sys/module are plain files standing for what a guest's kernel shows: loaded module,
built-in driver (with and without modules.builtin, which kernels before 2.6.33 lack),
disabled, absent."""

from __future__ import annotations

import subprocess

import pytest

from builder.core import sh
from builder.verify.checks import ACPIPHP_PROBE
from test_distro_profiles import mini_root  # noqa: F401  (the fixture)


def probe(root, *, proc_modules: str, sysfs: bool, disable: str = "N", builtin: str | None = None) -> dict:
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/modules").write_text(proc_modules)
    if sysfs:
        (root / "sys/module/acpiphp/parameters").mkdir(parents=True)
        (root / "sys/module/acpiphp/parameters/disable").write_text(disable + "\n")
    release = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    if builtin is not None:
        (root / "lib/modules" / release).mkdir(parents=True)
        (root / "lib/modules" / release / "modules.builtin").write_text(builtin)
    out = subprocess.run([sh.which("chroot"), str(root), "/bin/sh", "-c", ACPIPHP_PROBE],
                         capture_output=True, text=True, env={"PATH": "/bin"})
    assert out.returncode == 0, out.stderr
    return dict(kv.split("=", 1) for kv in out.stdout.strip().splitlines()[-1].split())


def test_a_loaded_module_is_a_module(mini_root):
    facts = probe(mini_root, proc_modules="acpiphp 20480 0 - Live 0x0\n", sysfs=True)
    assert (facts["present"], facts["how"], facts["disabled"]) == ("yes", "module", "N")


def test_a_built_in_driver_on_a_kernel_without_modules_builtin_is_built_in(mini_root):
    # Lucid's 2.6.32: no modules.builtin, the driver's parameters in /sys/module
    facts = probe(mini_root, proc_modules="ext4 1 0 - Live 0x0\n", sysfs=True)
    assert (facts["present"], facts["how"]) == ("yes", "built-in")


def test_a_built_in_driver_listed_in_modules_builtin_is_built_in(mini_root):
    facts = probe(mini_root, proc_modules="", sysfs=True, builtin="kernel/drivers/pci/hotplug/acpiphp.ko\n")
    assert (facts["present"], facts["how"]) == ("yes", "built-in")


def test_a_disabled_driver_says_so(mini_root):
    facts = probe(mini_root, proc_modules="", sysfs=True, disable="Y")
    assert facts["disabled"] == "Y"


@pytest.mark.parametrize("builtin", [None, "kernel/fs/ext4/ext4.ko\n"])
def test_no_driver_at_all_is_none(mini_root, builtin):
    facts = probe(mini_root, proc_modules="ext4 1 0 - Live 0x0\n", sysfs=False, builtin=builtin)
    assert (facts["present"], facts["how"]) == ("no", "none")
