"""Volume discovery by label, formatting of blank volumes, pairing, and adoption of a
volume by a fresh instance (restore then reboot, restore only, or report)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from builder.core import sh
from syncagent_helpers import (EX_BUSY, EX_REFUSED, PATIENCE, agents_ended, assert_same_tree, attach, backup,
                               label_for, lock_free, loop_image, make_rich_root, needs_root_and_tools, new_instance,
                               run_agent, running_agent, status, wait_for)

pytestmark = pytest.mark.usefixtures("needs_root_and_tools")


def blkid_value(dev: str, tag: str) -> str:
    return sh.run(["blkid", "-c", "/dev/null", "-o", "value", "-s", tag, dev], check=False, quiet=True).output.strip()


def mounted_at(path) -> str | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, target = line.split()[:2]
            if target == str(path):
                return dev
    return None


def sources_at(path) -> list[str]:
    """Every device mounted at `path`, bottom first."""
    with open("/proc/self/mounts") as f:
        return [ln.split()[0] for ln in f if ln.split()[1] == str(path)]


@contextlib.contextmanager
def mounted_through_node(tmp_path, inst, dev: str):
    """`dev` mounted at `inst`'s mount point through a device node of its own, which a
    test can remove: what an unplugged volume leaves, a mount whose device is gone."""
    node = tmp_path / f"node-{os.path.basename(dev)}"
    os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(dev).st_rdev)
    inst.mount_point.mkdir(parents=True, exist_ok=True)
    try:
        sh.run(["mount", str(node), str(inst.mount_point)], quiet=True)
        yield node
    finally:
        sh.unmount_all_under(inst.mount_point)
        node.unlink(missing_ok=True)


def backed_up_volume(tmp_path, **conf):
    """Instance A with a rich root, attached by label to a fresh volume, backed up, then
    the volume detached again (A 'died'). Returns (A, loop_image context)."""
    a = new_instance(tmp_path / "a", label_for(tmp_path), **conf)
    make_rich_root(a.root)
    return a


def test_a_labelled_volume_is_found_mounted_paired_and_adopted_by_a_fresh_instance(tmp_path):
    a = backed_up_volume(tmp_path)
    b = new_instance(tmp_path / "b", a.label, on_attach="restore")
    (b.root / "etc").mkdir(parents=True)
    (b.root / "etc/fresh-instance-only").write_text("fresh\n")
    with loop_image(tmp_path / "vol.img", 96, a.label) as dev:
        # Not mounted anywhere: attach finds it by its label.
        attach(a)
        assert mounted_at(a.mount_point) == dev
        st = status(a)
        assert st["paired"] and st["current"]
        sh.unmount_all_under(a.mount_point)
        # Instance B has never been synced to any volume: it restores, and is paired after.
        r = run_agent(b, "attach")
        assert r.returncode == 0, r.output
        assert mounted_at(b.mount_point) == dev
        assert "adopting volume" in r.output and "restore complete generation=" in r.output
        assert not (b.root / "etc/fresh-instance-only").exists()
        assert_same_tree(a.root, b.root)
        st = status(b)
        assert st["paired"] and st["volume_id"] == st["instance_volume_id"]
        # Backups resume onto the same volume, and attaching again restores nothing.
        (b.root / "etc/after-adoption").write_text("b's own change\n")
        backup(b)
        r = run_agent(b, "attach")
        assert r.returncode == 0 and "backups resume" in r.output, r.output
        assert (b.root / "etc/after-adoption").exists()


def test_restore_then_reboot_is_the_default_adoption(tmp_path):
    a = backed_up_volume(tmp_path)
    b = new_instance(tmp_path / "b", a.label, on_attach="restore-reboot")
    marker = tmp_path / "rebooted"
    with loop_image(tmp_path / "vol.img", 96, a.label):
        attach(a)
        sh.unmount_all_under(a.mount_point)
        r = run_agent(b, "attach", env_extra={"ROOTSYNC_REBOOT_COMMAND": f"touch {marker}",
                                              "ROOTSYNC_REBOOT_WAIT": "0"})
        assert r.returncode == 0, r.output
        assert "restore complete" in r.output and "rebooting" in r.output
        assert marker.exists()
        assert_same_tree(a.root, b.root)


def test_no_backup_runs_while_the_restored_instance_goes_down_for_its_reboot(tmp_path):
    a = backed_up_volume(tmp_path)
    b = new_instance(tmp_path / "b", a.label, on_attach="restore-reboot")
    with loop_image(tmp_path / "vol.img", 96, a.label):
        attach(a)
        sh.unmount_all_under(a.mount_point)
        # The attach keeps the lock for as long as the reboot may take: far longer than
        # the checks below need on any machine, and it is killed once they are done.
        with running_agent(b, "attach", env_extra={"ROOTSYNC_REBOOT_COMMAND": "true",
                                                   "ROOTSYNC_REBOOT_WAIT": str(PATIENCE)}) as proc:
            wait_for(lambda: "rebooting" in (b.base / "agent.log").read_text(), PATIENCE, "the restore to finish")
            assert status(b)["paired"]
            r = run_agent(b, "backup")
            assert r.returncode == EX_BUSY, r.output
            assert proc.poll() is None


def test_report_only_adoption_changes_nothing(tmp_path):
    a = backed_up_volume(tmp_path)
    b = new_instance(tmp_path / "b", a.label, on_attach="report")
    (b.root / "etc").mkdir(parents=True)
    (b.root / "etc/mine").write_text("mine\n")
    with loop_image(tmp_path / "vol.img", 96, a.label):
        attach(a)
        gens = status(a)["generations"]
        sh.unmount_all_under(a.mount_point)
        r = run_agent(b, "attach")
        assert r.returncode == 0, r.output
        assert "on_attach=report" in r.output and "restore complete" not in r.output
        assert sorted(p.name for p in (b.root / "etc").iterdir()) == ["mine"]
        st = status(b)
        assert not st["paired"] and st["generations"] == gens
        # Not paired: its backups do not touch the other instance's volume.
        r = run_agent(b, "backup")
        assert r.returncode == EX_REFUSED and "not paired" in r.output
        assert status(b)["generations"] == gens


def test_an_instance_paired_with_another_volume_neither_restores_nor_backs_up(tmp_path):
    a = backed_up_volume(tmp_path)
    b = new_instance(tmp_path / "b", a.label, on_attach="restore")
    (b.root / "var/lib/rootsync").mkdir(parents=True, exist_ok=True)
    (b.root / "var/lib/rootsync/volume-id").write_text("some-other-volume\n")
    (b.root / "etc").mkdir(parents=True)
    (b.root / "etc/mine").write_text("mine\n")
    with loop_image(tmp_path / "vol.img", 96, a.label):
        attach(a)
        sh.unmount_all_under(a.mount_point)
        r = run_agent(b, "attach")
        assert r.returncode == EX_REFUSED and "another instance" in r.output, r.output
        assert sorted(p.name for p in (b.root / "etc").iterdir()) == ["mine"]
        assert run_agent(b, "backup").returncode == EX_REFUSED
        assert run_agent(b, "restore").returncode == EX_REFUSED
        assert sorted(p.name for p in (b.root / "etc").iterdir()) == ["mine"]


def test_a_blank_volume_is_formatted_only_when_configured(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path), format_blank="no")
    (a.root / "etc").mkdir(parents=True)
    (a.root / "etc/x").write_text("x\n")
    with loop_image(tmp_path / "blank.img", 64, None) as dev:
        r = run_agent(a, "attach", dev)
        assert r.returncode == EX_REFUSED and "leaving it alone" in r.output
        assert blkid_value(dev, "TYPE") == ""
        a.extra_conf["format_blank"] = "yes"
        r = run_agent(a, "attach", dev)
        assert r.returncode == 0, r.output
        assert "formatting blank device" in r.output and "backup complete" in r.output
        assert blkid_value(dev, "TYPE") == "ext4" and blkid_value(dev, "LABEL") == a.label
        assert mounted_at(a.mount_point) == dev
        assert (a.current() / "tree/etc/x").read_text() == "x\n"


@pytest.mark.parametrize("make_fs", [["mkswap"], ["mkfs.ext4", "-q", "-L", "otherlabel"]], ids=["swap", "ext4-other-label"])
def test_a_volume_with_any_filesystem_is_never_formatted(tmp_path, make_fs):
    a = new_instance(tmp_path / "a", label_for(tmp_path), format_blank="yes")
    (a.root / "etc").mkdir(parents=True)
    with loop_image(tmp_path / "used.img", 64, None) as dev:
        sh.run([*make_fs, dev], quiet=True)
        before = blkid_value(dev, "TYPE")
        assert before in ("swap", "ext4")
        r = run_agent(a, "attach", dev)
        assert r.returncode == EX_REFUSED and "leaving it alone" in r.output, r.output
        assert blkid_value(dev, "TYPE") == before
        assert mounted_at(a.mount_point) is None


def test_attach_without_a_labelled_volume_reports_and_does_nothing(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    (a.root / "etc").mkdir(parents=True)
    r = run_agent(a, "attach")
    assert r.returncode == EX_REFUSED and f"no volume labelled {a.label}" in r.output
    assert mounted_at(a.mount_point) is None
    assert not (a.root / "var/lib/rootsync/volume-id").exists()


def no_init_system_here(what: str) -> None:
    """Fail loudly where systemd or upstart runs: the udev hand-off would ask it to start
    the attach or detach instead of starting it itself, which is what these tests watch."""
    if Path("/run/systemd/system").exists() or shutil.which("initctl"):
        pytest.fail(f"this machine runs systemd or upstart, which the hand-off would ask to start the {what}; "
                    f"run this test where neither runs (the hand-off then starts the {what} itself)")


def test_the_udev_hand_off_returns_at_once_and_the_attach_runs_outside_it(tmp_path):
    no_init_system_here("attach")
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    (a.root / "etc").mkdir(parents=True)
    # The attach runs in a session of its own, which agents_ended ends too.
    with loop_image(tmp_path / "vol.img", 64, a.label) as dev, agents_ended(a):
        t = time.monotonic()
        r = run_agent(a, "udev-add", dev)
        assert r.returncode == 0, r.output
        assert time.monotonic() - t < 2, "udev-add must hand over and return, not do the work"
        wait_for(lambda: mounted_at(a.mount_point) == dev and status(a)["current"], PATIENCE,
                 "the attach started by udev-add to mount and back up")
        wait_for(lambda: not (a.run_dir / "lock").exists() or lock_free(a), PATIENCE, "the attach to finish")


@pytest.mark.parametrize("old", ["device-gone", "not-the-volume"])
def test_attach_replaces_a_mount_that_is_not_the_live_volume(tmp_path, old):
    # device-gone: the volume was unplugged while mounted; its mount stayed, and would
    # answer every backup with I/O errors.  not-the-volume: another filesystem is
    # mounted at the mount point.  Either way the labelled volume is mounted instead.
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    (a.root / "etc").mkdir(parents=True)
    (a.root / "etc/x").write_text("x\n")
    old_label = a.label if old == "device-gone" else "rtother"
    with loop_image(tmp_path / "old.img", 32, old_label) as old_dev, \
            loop_image(tmp_path / "new.img", 96, a.label) as new_dev, \
            mounted_through_node(tmp_path, a, old_dev) as node:
        if old == "device-gone":
            node.unlink()
            # The old device is still labelled (only its node is gone): name the new one,
            # as the udev hand-off does.
            r = run_agent(a, "attach", new_dev)
        else:
            r = run_agent(a, "attach")
        assert r.returncode == 0, r.output
        assert f"{a.mount_point} is mounted from {node}" in r.output and "unmounting it lazily" in r.output
        assert sources_at(a.mount_point) == [new_dev], sources_at(a.mount_point)
        assert "backup complete" in r.output and (a.current() / "tree/etc/x").read_text() == "x\n"
        st = status(a)
        assert st["mounted"] and st["device"] == new_dev and st["paired"]
        # The live volume stays mounted as it is.
        r = run_agent(a, "attach")
        assert r.returncode == 0 and "backups resume" in r.output and "lazily" not in r.output, r.output
        assert sources_at(a.mount_point) == [new_dev]


def test_detach_unmounts_the_volume_only_when_its_device_is_gone(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    (a.root / "etc").mkdir(parents=True)
    with loop_image(tmp_path / "vol.img", 64, a.label) as dev, mounted_through_node(tmp_path, a, dev) as node:
        attach(a)
        r = run_agent(a, "detach", str(node))
        assert r.returncode == 0 and "stays mounted" in r.output, r.output
        assert sources_at(a.mount_point) == [str(node)]
        node.unlink()
        r = run_agent(a, "detach", str(node))
        assert r.returncode == 0 and "unmounting it lazily" in r.output, r.output
        assert sources_at(a.mount_point) == []
        assert run_agent(a, "detach").returncode == 0
        # Its backups are still there: the volume is attached again as it was.
        attach(a)
        assert sources_at(a.mount_point) == [dev] and status(a)["paired"]


def test_the_udev_remove_hand_off_returns_at_once_and_the_detach_runs_outside_it(tmp_path):
    no_init_system_here("detach")
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    (a.root / "etc").mkdir(parents=True)
    # The detach runs in a session of its own, which agents_ended ends too.
    with loop_image(tmp_path / "vol.img", 64, a.label) as dev, mounted_through_node(tmp_path, a, dev) as node, \
            agents_ended(a):
        attach(a)
        node.unlink()
        t = time.monotonic()
        r = run_agent(a, "udev-remove", str(node))
        assert r.returncode == 0, r.output
        assert time.monotonic() - t < 2, "udev-remove must hand over and return, not do the work"
        wait_for(lambda: sources_at(a.mount_point) == [], PATIENCE, "the detach started by udev-remove to unmount")
