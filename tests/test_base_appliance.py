"""libguestfs for bake, with real appliances: the accelerator it picks here, what
inspection says of a small bookworm-like image, the root tree copied out of an image
exactly (holes included), kernels copied out of /boot, launch failures as BakeErrors,
and no QEMU of libguestfs left once `opened` is done, however it ends."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from base_fixtures import fs_image, pattern, scratch, special_tree
from builder.core import lifetime, watchdog
from builder.base import appliance, readout
from builder.base.extfs import fs_facts
from builder.core.errors import BakeError
from fulllisting import image_listing, listing

OLD, NEW = "6.1.0-99-amd64", "6.1.0-100-amd64"      # special_tree's kernel, and a newer one without an initrd


@pytest.fixture(scope="module")
def images():
    """A special-file tree as ext4 (`special`), and the same tree as libguestfs's
    inspection takes for a root, with /etc/fstab, and a second, newer kernel that has no
    initrd (`rooted`). Both labelled uec-rootfs."""
    with scratch() as d:
        special = special_tree(d / "special")
        rooted = special_tree(d / "rooted")
        (rooted / "etc/fstab").write_text("LABEL=uec-rootfs / ext4 defaults 0 1\n")
        (rooted / f"boot/vmlinuz-{NEW}").write_bytes(pattern(4000, 20))
        yield {"special": fs_image(special, d / "special.img"), "rooted": fs_image(rooted, d / "rooted.img"),
               "dir": d}


@pytest.fixture
def work():
    with scratch("bake-test-work-") as d:
        yield d


def appliances(token: str) -> list[int]:
    """QEMU processes of libguestfs's appliance whose environment carries this bake's
    cookie (not the QEMU that says its version for the KVM probe's cache key)."""
    found = []
    for pid in watchdog.processes_with_cookie(token):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if comm.startswith("qemu") and any(b"appliance" in arg for arg in cmdline):
            found.append(pid)
    return found


def test_settings_choose_tcg_here_and_say_why(monkeypatch):
    monkeypatch.delenv("LIBGUESTFS_BACKEND_SETTINGS", raising=False)
    backend, backend_settings, why = appliance.settings()
    assert backend == "direct"
    assert backend_settings == ["force_tcg"], why
    assert why


def test_settings_from_the_environment_win(monkeypatch):
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg:gdb")
    assert appliance.settings() == ("direct", ["force_tcg", "gdb"], "LIBGUESTFS_BACKEND_SETTINGS=force_tcg:gdb")


@pytest.mark.boots
def test_inspect_says_what_a_bookworm_image_is(images):
    facts = readout.inspect(images["rooted"])
    sb = fs_facts(images["rooted"])
    assert facts["distro"] == "debian"
    assert facts["version"] == "12"
    assert facts["codename"] == "bookworm"
    assert facts["product"] == "Debian GNU/Linux 12 (bookworm)"
    assert (facts["package_format"], facts["package_management"]) == ("deb", "apt")
    assert facts["kernels"] == [OLD, NEW]
    assert facts["init_system"] == "systemd"
    assert (facts["fs_type"], facts["label"], facts["uuid"]) == ("ext4", "uec-rootfs", sb.uuid)


@pytest.mark.boots
def test_inspect_reads_os_release_where_inspection_finds_no_root(images):
    """special_tree has no /etc/fstab (nor /etc/hosts), which libguestfs looks for."""
    facts = readout.inspect(images["special"])
    assert (facts["distro"], facts["version"], facts["codename"]) == ("debian", "12", "bookworm")
    assert facts["kernels"] == [OLD]
    assert facts["label"] == "uec-rootfs"


@pytest.mark.boots
def test_extract_tree_copies_every_special_file_and_the_holes(images, work):
    expected = image_listing(images["special"])
    sparse = [line for line in expected if line.startswith("var/sparse\t")]
    assert "sparse=yes" in sparse[0]
    readout.extract_tree(images["special"], work / "tree")
    assert listing(work / "tree") == expected


@pytest.mark.boots
def test_extract_tree_refuses_a_folder_that_is_not_empty(images, work):
    (work / "tree").mkdir()
    (work / "tree/something").write_text("x")
    with pytest.raises(BakeError, match="new or empty folder"):
        readout.extract_tree(images["special"], work / "tree")


@pytest.mark.boots
def test_boot_files_take_the_newest_kernel_with_an_initrd_or_the_one_asked_for(images, work):
    kernel, ramdisk, version = readout.boot_files(images["rooted"], work / "boot")
    assert version == OLD            # NEW is newer, but has no initrd
    assert kernel == work / f"boot/vmlinuz-{OLD}" and kernel.read_bytes() == pattern(3000, 2)
    assert ramdisk == work / f"boot/initrd.img-{OLD}" and ramdisk.read_bytes() == pattern(2000, 3)
    kernel, ramdisk, version = readout.boot_files(images["rooted"], work / "new", NEW)
    assert (version, ramdisk) == (NEW, None)
    assert kernel.read_bytes() == pattern(4000, 20)


@pytest.mark.boots
def test_a_launch_that_fails_is_a_bake_error_naming_the_drive(work):
    with pytest.raises(BakeError, match=r"starting libguestfs for missing\.img: .*No such file"):
        with appliance.opened([work / "missing.img"]):
            pass


class Boom(Exception):
    pass


@pytest.mark.boots
def test_no_qemu_outlives_opened_when_the_block_raises(images):
    token = lifetime.session().token
    seen = {}
    with pytest.raises(Boom):
        with appliance.opened([images["special"]], lucid=True) as g:
            pid = seen["pid"] = g.get_pid()
            seen["environ"] = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            seen["cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            seen["pgid"] = os.getpgid(pid)
            _, live = watchdog.read_journal(str(lifetime.session().journal_path))
            seen["journalled"] = ("pgid", str(pid)) in live
            raise Boom
    # the watchdog finds QEMU by the cookie, and by its process group in the journal
    assert f"{lifetime.COOKIE}={token}".encode() in seen["environ"]
    assert seen["pgid"] == seen["pid"] and seen["journalled"]
    assert "vsyscall=xonly" in seen["cmdline"]
    assert not Path(f"/proc/{seen['pid']}").exists()
    assert appliances(token) == []
    _, live = watchdog.read_journal(str(lifetime.session().journal_path))
    assert ("pgid", str(seen["pid"])) not in live


@pytest.mark.boots
def test_ctrl_c_during_the_launch_stops_the_appliance_at_once(images):
    """SIGINT comes as soon as QEMU runs, while the launch still waits for the appliance."""
    token = lifetime.session().token
    appliance.settings()        # a KVM probe, if one is due, runs now: its QEMU is not the appliance's
    started = threading.Event()
    stop = threading.Event()

    def interrupt_when_qemu_runs() -> None:
        while not stop.is_set():
            if appliances(token):
                started.set()
                os.kill(os.getpid(), signal.SIGINT)
                return
            stop.wait(0.05)

    watcher = threading.Thread(target=interrupt_when_qemu_runs, daemon=True)
    start = time.monotonic()
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            with appliance.opened([images["special"]]):
                pytest.fail("the launch was not interrupted")
    finally:
        stop.set()
        watcher.join()
    assert started.is_set()
    assert time.monotonic() - start < 60
    assert appliances(token) == []
