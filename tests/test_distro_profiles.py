"""Lucid cannot be bootstrapped here (its archive is not reachable), so what differs
between Lucid and Debian is shown by these tests of the code paths that decide it:
init system, kernel, module loading, package names, filesystem features, apt sources."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from builder.core import sh
from builder.recipe.distro import profile_for, resolve_mirrors
from builder.core.errors import BakeError
from builder.pipeline.plan import collect_packages, make_plan
from builder.recipe.recipe import load_recipe
from builder.customize.chroot import detect_init_system
from conftest import BAKE, REPO

LUCID = REPO / "recipes" / "lucid-uec.yml"
ULTIMATE = REPO / "recipes" / "ultimate.yml"
DEMO = REPO / "recipes" / "debian-demo.yml"


def test_lucid_profile_is_upstart_with_the_virtual_kernel():
    p = profile_for("ubuntu/lucid")
    assert p.init_system == "upstart"
    assert p.kernel_package("x86_64") == "linux-image-virtual"
    assert p.security_suite() == "lucid-security"


def test_debian_profile_is_systemd_with_the_cloud_kernel():
    p = profile_for("debian/bookworm")
    assert p.init_system == "systemd"
    assert p.kernel_package("x86_64") == "linux-image-cloud-amd64"
    assert p.kernel_package("i386") == "linux-image-686-pae"
    assert p.security_suite() == "bookworm-security"
    assert profile_for("debian/buster").security_suite() == "buster/updates"


def test_ubuntu_switches_to_systemd_with_vivid():
    assert profile_for("ubuntu/trusty").init_system == "upstart"
    assert profile_for("ubuntu/xenial").init_system == "systemd"


def test_lucid_filesystem_has_no_feature_its_2_6_32_kernel_cannot_mount():
    lucid = set(profile_for("ubuntu/lucid").mkfs_features("ext4"))
    assert not lucid & {"64bit", "metadata_csum", "metadata_csum_seed", "orphan_file", "large_dir", "casefold"}
    assert {"extent", "uninit_bg", "has_journal"} <= lucid
    assert "metadata_csum" in profile_for("debian/bookworm").mkfs_features("ext4")
    assert "extent" not in profile_for("ubuntu/lucid").mkfs_features("ext3")


def test_lucid_features_really_make_a_filesystem_without_newer_features(tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("lucid\n")
    img = tmp_path / "fs.img"
    img.write_bytes(b"")
    os.truncate(img, 64 * 1024 * 1024)
    feats = profile_for("ubuntu/lucid").mkfs_features("ext4")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-L", "cloudimg-rootfs", "-I", "256",
                    "-O", "none," + ",".join(feats), str(img)], check=True)
    header = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True, check=True).stdout
    have = set(next(l for l in header.splitlines() if l.startswith("Filesystem features:")).split(":", 1)[1].split())
    assert have == set(feats)


def test_lucid_packages_use_lucid_names():
    pkgs = dict(collect_packages(load_recipe(LUCID)))
    assert {"dhcp3-client", "ifupdown", "module-init-tools", "iproute", "linux-image-virtual"} <= set(pkgs)
    assert not {"systemd-sysv", "systemd-resolved", "kmod", "iproute2", "isc-dhcp-client", "zstd",
                "linux-image-cloud-amd64"} & set(pkgs)


def test_debian_packages_use_debian_names():
    pkgs = dict(collect_packages(load_recipe(DEMO)))
    assert {"systemd-sysv", "systemd-resolved", "kmod", "iproute2", "zstd", "linux-image-cloud-amd64"} <= set(pkgs)
    assert not {"dhcp3-client", "isc-dhcp-client", "ifupdown", "module-init-tools", "iproute"} & set(pkgs)


def test_lucid_apt_sources_use_the_recipes_archive_for_updates_and_security():
    plan = make_plan(load_recipe(LUCID), REPO / "output")
    assert plan.mirror == "http://old-releases.ubuntu.com/ubuntu"
    assert plan.apt_sources.splitlines() == [
        "deb http://old-releases.ubuntu.com/ubuntu lucid main universe",
        "deb http://old-releases.ubuntu.com/ubuntu lucid-updates main universe",
        "deb http://old-releases.ubuntu.com/ubuntu lucid-security main universe",
    ]


def fake_host(root: Path, distro: str, sources: str) -> Path:
    (root / "etc/apt/sources.list.d").mkdir(parents=True)
    (root / "etc/os-release").write_text(f'ID={distro}\n')
    (root / "etc/apt/sources.list.d/host.sources").write_text(sources)
    return root


def test_debian_mirror_defaults_to_the_hosts_own_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("BAKE_MIRROR", raising=False)
    root = fake_host(tmp_path, "debian", "Types: deb\nURIs: http://mirror.test/debian\nSuites: bookworm bookworm-updates\n"
                     "Components: main\n\nTypes: deb\nURIs: http://mirror.test/debian-security\n"
                     "Suites: bookworm-security\nComponents: main\n")
    assert resolve_mirrors("debian", None, None, False, str(root)) == (
        "http://mirror.test/debian", "http://mirror.test/debian-security")
    monkeypatch.setenv("BAKE_MIRROR", "http://other.test/debian/")
    assert resolve_mirrors("debian", "http://recipe.test/debian", None, False, str(root)) == (
        "http://other.test/debian", "http://other.test/debian-security")
    monkeypatch.delenv("BAKE_MIRROR")
    assert resolve_mirrors("debian", "http://recipe.test/debian", None, True, str(root)) == (
        "http://recipe.test/debian", None)


def test_no_mirror_on_a_host_of_another_distribution_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BAKE_MIRROR", raising=False)
    root = fake_host(tmp_path, "debian", "Types: deb\nURIs: http://mirror.test/debian\nSuites: bookworm\nComponents: main\n")
    with pytest.raises(BakeError, match="set `mirror:` in the recipe or BAKE_MIRROR"):
        resolve_mirrors("ubuntu", None, None, False, str(root))


def test_init_system_is_detected_in_the_target(tmp_path):
    up = tmp_path / "up"
    (up / "sbin").mkdir(parents=True)
    (up / "sbin/initctl").write_text("")
    sd = tmp_path / "sd"
    (sd / "lib/systemd").mkdir(parents=True)
    (sd / "lib/systemd/systemd").write_text("")
    assert detect_init_system(up, "systemd") == "upstart"
    assert detect_init_system(sd, "upstart") == "systemd"
    assert detect_init_system(tmp_path / "none", "upstart") == "upstart"


# --- the acpiphp element's decision, run for real in a minimal chroot ----------------

TOOLS = ("sh", "grep", "find", "mkdir", "cat", "uname")


@pytest.fixture
def mini_root(tmp_path):
    """A chroot with dash and the few tools the acpiphp hook uses (and their libraries)."""
    root = tmp_path / "root"
    for d in ("bin", "etc", "lib/modules", "boot", "tmp", "dev"):
        (root / d).mkdir(parents=True)
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for tool in TOOLS:
        path = shutil.which(tool)
        real = os.path.realpath(path)
        shutil.copy2(real, root / "bin" / tool)
        libs = subprocess.run(["ldd", real], capture_output=True, text=True).stdout
        for line in libs.splitlines():
            parts = line.split()
            lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0] if parts and parts[0].startswith("/") else None
            if lib and os.path.exists(lib):
                dest = root / lib.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(lib), dest)
    hook = REPO / "builder/elements/acpiphp/install.d/30-acpiphp"
    shutil.copy2(hook, root / "tmp/30-acpiphp")
    return root


def kernel_tree(root: Path, version: str, how: str) -> None:
    mods = root / "lib/modules" / version
    (mods / "kernel/drivers/pci/hotplug").mkdir(parents=True)
    if how == "module":
        (mods / "kernel/drivers/pci/hotplug/acpiphp.ko").write_text("")
        (mods / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    elif how == "builtin":
        (mods / "modules.builtin").write_text("kernel/drivers/pci/hotplug/acpiphp.ko\n")
    else:
        (mods / "modules.builtin").write_text("")


def run_hook(root: Path, init: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/bin", "BAKE_INIT_SYSTEM": init}
    return subprocess.run([sh.which("chroot"), str(root), "/bin/sh", "/tmp/30-acpiphp"], capture_output=True, text=True, env=env)


def test_acpiphp_as_module_on_lucid_goes_to_etc_modules_and_initramfs(mini_root):
    kernel_tree(mini_root, "2.6.32-38-virtual", "module")
    r = run_hook(mini_root, "upstart")
    assert r.returncode == 0, r.stderr
    assert "acpiphp is a module in kernel 2.6.32-38-virtual" in r.stdout
    assert (mini_root / "etc/modules").read_text().splitlines() == ["acpiphp"]
    assert (mini_root / "etc/initramfs-tools/modules").read_text().splitlines() == ["acpiphp"]
    assert not (mini_root / "etc/modules-load.d").exists()
    assert run_hook(mini_root, "upstart").returncode == 0  # idempotent
    assert (mini_root / "etc/modules").read_text().splitlines() == ["acpiphp"]


def test_acpiphp_as_module_on_systemd_goes_to_modules_load_d(mini_root):
    kernel_tree(mini_root, "5.10.0-1-amd64", "module")
    r = run_hook(mini_root, "systemd")
    assert r.returncode == 0, r.stderr
    assert (mini_root / "etc/modules-load.d/acpiphp.conf").read_text() == "acpiphp\n"
    assert not (mini_root / "etc/modules").exists()


def test_acpiphp_built_in_writes_nothing_and_says_so(mini_root):
    kernel_tree(mini_root, "6.1.0-1-cloud-amd64", "builtin")
    r = run_hook(mini_root, "systemd")
    assert r.returncode == 0, r.stderr
    assert "bake-note: acpiphp is built into kernel 6.1.0-1-cloud-amd64" in r.stdout
    assert not (mini_root / "etc/modules-load.d").exists()
    assert not (mini_root / "etc/initramfs-tools").exists()


def test_acpiphp_missing_entirely_fails_the_build(mini_root):
    kernel_tree(mini_root, "2.6.32-1-custom", "none")
    r = run_hook(mini_root, "upstart")
    assert r.returncode == 1
    assert "has no ACPI PCI hot-plug driver" in r.stderr


# --- validate and plan need neither root nor network ---------------------------------

# No network (a new, empty network namespace) and no privilege: every capability is
# dropped, so mounting, chroot and reading others' files are refused, as for any user.
UNPRIVILEGED_OFFLINE = ["unshare", "--net", "setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]


def unprivileged_offline(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(UNPRIVILEGED_OFFLINE + argv, capture_output=True, text=True, cwd=REPO)


def test_the_sandbox_really_has_no_privilege_and_no_network(tmp_path):
    r = unprivileged_offline(["mount", "-t", "tmpfs", "none", str(tmp_path)])
    assert r.returncode != 0 and "permission denied" in r.stderr.lower()
    r = unprivileged_offline(["cat", "/proc/self/status"])
    assert "CapEff:\t0000000000000000" in r.stdout
    r = unprivileged_offline(["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 9), timeout=3)"])
    assert r.returncode != 0 and "unreachable" in r.stderr.lower()


def test_validate_and_plan_run_without_root_and_without_network(tmp_path):
    r = unprivileged_offline([BAKE, "validate", str(LUCID), str(ULTIMATE), str(DEMO)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": ok (") == 3
    r = unprivileged_offline([BAKE, "plan", str(LUCID), "--output", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert "init upstart, kernel linux-image-virtual" in r.stdout
    assert "debootstrap --variant=minbase lucid" in r.stdout
    hooks = [l.split()[1] for l in r.stdout.splitlines() if l.startswith("  install.d")]
    assert hooks == sorted(hooks) and "30-acpiphp" in hooks


def test_resolver_is_handed_to_resolved_only_where_it_is_enabled(tmp_path):
    """The chroot used the build host's resolver; the image gets resolved's stub where
    systemd-resolved is enabled (systemd targets), an empty file for the DHCP client
    otherwise (Lucid's ifupdown)."""
    from types import SimpleNamespace
    from builder.customize.chroot import ChrootBackend as Customizer, resolved_enabled

    def tree(name, enabled):
        root = tmp_path / name
        (root / "etc/systemd/system").mkdir(parents=True)
        (root / "etc/resolv.conf").write_text("nameserver 192.0.2.53\n")  # the host's, copied in
        if enabled:
            (root / "etc/systemd/system/dbus-org.freedesktop.resolve1.service").symlink_to(
                "/lib/systemd/system/systemd-resolved.service")
        return root

    on, off = tree("systemd", True), tree("upstart", False)
    assert resolved_enabled(on) and not resolved_enabled(off)
    for root in (on, off):
        Customizer.hand_over_resolver(SimpleNamespace(root=root))
    assert os.readlink(on / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    resolv = off / "etc/resolv.conf"
    assert not resolv.is_symlink() and resolv.read_text() == ""


def test_lucid_is_checked_with_the_2004_key_and_jammy_with_the_current_keyring():
    assert profile_for("ubuntu/lucid").keyrings[0].endswith("ubuntu-archive-removed-keys.gpg")
    assert profile_for("ubuntu/jammy").keyrings == ("/usr/share/keyrings/ubuntu-archive-keyring.gpg",)


def test_an_ubuntu_bootstrap_without_a_keyring_is_refused_naming_where_to_put_one(tmp_path):
    p = profile_for("ubuntu/lucid")
    missing = replace(p, keyrings=(str(tmp_path / "removed.gpg"), str(tmp_path / "archive.gpg")))
    with pytest.raises(BakeError) as e:
        missing.debootstrap_keyring(environ={})
    msg = str(e.value)
    assert str(tmp_path / "removed.gpg") in msg and str(tmp_path / "archive.gpg") in msg
    assert "BAKE_KEYRING" in msg


def test_bake_keyring_names_the_keyring_and_must_exist(tmp_path):
    ring = tmp_path / "ubuntu.gpg"
    ring.write_bytes(b"\x99")
    p = profile_for("ubuntu/lucid")
    assert p.debootstrap_keyring(environ={"BAKE_KEYRING": str(ring)}) == str(ring)
    with pytest.raises(BakeError, match="BAKE_KEYRING=.*no such file"):
        p.debootstrap_keyring(environ={"BAKE_KEYRING": str(tmp_path / "absent.gpg")})


def test_the_debian_keyring_of_this_host_is_found():
    assert profile_for("debian/bookworm").debootstrap_keyring(environ={}) == \
        "/usr/share/keyrings/debian-archive-keyring.gpg"


def test_a_suite_newer_than_debootstrap_is_bootstrapped_with_its_family_script(tmp_path):
    (tmp_path / "jammy").write_text("")
    assert profile_for("ubuntu/jammy").debootstrap_script(str(tmp_path)) is None
    assert profile_for("ubuntu/questing").debootstrap_script(str(tmp_path)) == "gutsy"
    assert profile_for("debian/forky").debootstrap_script(str(tmp_path)) == "sid"
    # the scripts named exist in this host's debootstrap
    for name in ("gutsy", "sid"):
        assert Path("/usr/share/debootstrap/scripts", name).exists()
