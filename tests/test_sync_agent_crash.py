"""Crash safety of the sync agent: a backup killed with SIGKILL at any point, or
stopped by a full volume, leaves the last complete generation restorable, and the
next backup cleans up after it.  Each restore is compared by full listing with the
state before the backup and the state it was taking; it must be exactly one of them."""

from __future__ import annotations

import os
import shutil

import pytest

from syncagent_helpers import (EX_FAIL, PATIENCE, attach, backup, content, label_for, listing, make_rich_root,
                               mounted_volume, move_volume, needs_root_and_tools, new_instance, run_agent,
                               running_agent, status, wait_for, wait_paused)

pytestmark = [pytest.mark.usefixtures("needs_root_and_tools"), pytest.mark.slow]


def snapshot(root):
    return listing(root), content(root)


def change_to_state_b(root) -> None:
    """Changes of every sort, with enough new data that a throttled copy takes seconds."""
    (root / "etc/hostname").write_text("state-b\n")
    (root / "etc/passwd").unlink()
    shutil.rmtree(root / "home/user/.config")
    os.chmod(root / "usr/bin/tool3", 0o700)
    (root / "srv/new").mkdir()
    for i in range(12):
        (root / f"srv/new/blob{i:02}").write_bytes(os.urandom(100_000))
    (root / "etc/added-link").symlink_to("hostname")


def restore_elsewhere(tmp_path, dev, owner, name):
    """Move the volume to a fresh instance, restore there, return its root; then give
    the volume back to its owner."""
    fresh = new_instance(tmp_path / name, owner.label)
    (fresh.root / "etc").mkdir(parents=True, exist_ok=True)
    (fresh.root / "etc/only-on-fresh").write_text("x\n")
    move_volume(dev, owner, fresh)
    try:
        r = run_agent(fresh, "restore")
        assert r.returncode == 0, r.output
        assert "restore complete generation=" in r.output
    finally:
        move_volume(dev, fresh, owner)
    return fresh.root


def assert_is_state(root, expected, name) -> None:
    got_listing, got_content = snapshot(root)
    exp_listing, exp_content = expected
    differ = sorted(k for k in set(got_listing) | set(exp_listing) if got_listing.get(k) != exp_listing.get(k))
    assert not differ, f"restored tree is not exactly state {name}; differing paths: {differ[:12]}"
    assert got_content == exp_content, f"restored contents are not those of state {name}"


# Where the backup is killed, and which state a restore must give afterwards.
STAGES = [
    ("before-copy", "A"),      # lock taken, partial generation created, no file copied yet
    ("mid-tree", "A"),         # rsync is copying (throttled), some files are in the partial tree
    ("copied", "A"),           # tree complete, info not yet written
    ("before-rename", "A"),    # info written and flushed, still in work/
    ("before-switch", "A"),    # in generations/, "current" still on the old one
    ("after-switch", "B"),     # "current" switched, old generations not yet pruned
]


@pytest.mark.parametrize("stage,expected", STAGES, ids=[s for s, _ in STAGES])
def test_backup_killed_at_any_point_leaves_a_complete_restorable_generation(tmp_path, stage, expected):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    make_rich_root(a.root)
    with mounted_volume(a) as dev:
        attach(a)
        state_a = snapshot(a.root)
        gen_a = a.current().name
        change_to_state_b(a.root)
        state_b = snapshot(a.root)
        env = {"ROOTSYNC_TEST_PAUSE_AT": stage}
        if stage == "mid-tree":
            env = {"ROOTSYNC_TEST_RSYNC_ARGS": "--bwlimit=150"}
        with running_agent(a, "backup", env_extra=env) as proc:
            if stage == "mid-tree":
                work = a.volume_dir / "work"

                def some_new_blobs_copied():
                    assert proc.poll() is None, "the throttled backup finished before it could be killed"
                    return any(p.name.startswith("blob") and p.stat().st_size > 0
                               for p in work.glob("*/tree/srv/new/*"))

                wait_for(some_new_blobs_copied, PATIENCE, "the copy to be under way")
                partial = list(work.glob("*/tree/srv/new/blob*"))
                assert 0 < len(partial) < 12 or any(p.name.startswith(".") for p in partial)
            else:
                wait_paused(a, stage, proc)
        assert proc.returncode == -9
        restored = restore_elsewhere(tmp_path, dev, a, "fresh1")
        assert_is_state(restored, state_a if expected == "A" else state_b, expected)
        assert (a.current().name == gen_a) == (expected == "A")
        # The next backup removes what the killed one left and completes state B.
        r = run_agent(a, "backup")
        assert r.returncode == 0, r.output
        if expected == "A":
            assert "removing unfinished" in r.output or stage == "before-switch", r.output
        assert list((a.volume_dir / "work").iterdir()) == []
        restored = restore_elsewhere(tmp_path, dev, a, "fresh2")
        assert_is_state(restored, state_b, "B")


@pytest.mark.parametrize("stage,expected", [("before-copy", "A"), ("before-switch", "A"), ("after-switch", "B")])
def test_incremental_backup_killed_leaves_a_complete_restorable_generation(tmp_path, stage, expected):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    make_rich_root(a.root)
    with mounted_volume(a) as dev:
        attach(a)
        state_a = snapshot(a.root)
        (a.root / "etc/hostname").write_text("incremental\n")
        (a.root / "etc/passwd").unlink()
        changes = tmp_path / "changes"
        changes.write_text(f"CLOSE_WRITE,CLOSE {a.root}/etc/hostname\nDELETE {a.root}/etc/passwd\n")
        state_b = snapshot(a.root)
        with running_agent(a, "backup", "--changes", str(changes), env_extra={"ROOTSYNC_TEST_PAUSE_AT": stage}) as proc:
            wait_paused(a, stage, proc)
        restored = restore_elsewhere(tmp_path, dev, a, "fresh1")
        assert_is_state(restored, state_a if expected == "A" else state_b, expected)
        r = run_agent(a, "backup", "--changes", str(changes))
        assert r.returncode == 0 and "kind=incremental" in r.output, r.output
        assert list((a.volume_dir / "work").iterdir()) == []
        restored = restore_elsewhere(tmp_path, dev, a, "fresh2")
        assert_is_state(restored, state_b, "B")


def test_a_full_volume_fails_the_backup_and_keeps_the_last_generation(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    make_rich_root(a.root)
    with mounted_volume(a, size_mb=24) as dev:
        attach(a)
        state_a = snapshot(a.root)
        gen_a = a.current().name
        (a.root / "srv/huge").write_bytes(os.urandom(40 * 1024 * 1024))
        (a.root / "etc/hostname").write_text("after the full volume\n")
        r = run_agent(a, "backup")
        assert r.returncode == EX_FAIL, r.output
        assert "backup failed" in r.output and f"generation {gen_a} is still the current one" in r.output
        st = status(a)
        assert st["last_backup"]["result"] == "failed" and st["current"] == gen_a
        assert list((a.volume_dir / "work").iterdir()) == []
        restored = restore_elsewhere(tmp_path, dev, a, "fresh1")
        assert_is_state(restored, state_a, "A")
        # Once there is room again, backups succeed.
        (a.root / "srv/huge").unlink()
        backup(a)
        assert status(a)["last_backup"]["result"] == "ok"
        assert (a.current() / "tree/etc/hostname").read_text() == "after the full volume\n"


def test_a_backup_killed_when_the_volume_filled_up_is_cleaned_by_the_next(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    make_rich_root(a.root)
    with mounted_volume(a, size_mb=24) as dev:
        attach(a)
        state_a = snapshot(a.root)
        (a.root / "srv/huge").write_bytes(os.urandom(40 * 1024 * 1024))
        # Stopped after rsync failed on the full volume, before its own clean-up.
        with running_agent(a, "backup", env_extra={"ROOTSYNC_TEST_RSYNC_ARGS": "--bwlimit=4000"}) as proc:
            def volume_full():
                assert proc.poll() is None or proc.returncode == EX_FAIL
                free = os.statvfs(a.mount_point)
                return free.f_bavail * free.f_frsize < 2 * 1024 * 1024 or proc.poll() is not None
            wait_for(volume_full, PATIENCE, "the volume to fill up")
        restored = restore_elsewhere(tmp_path, dev, a, "fresh1")
        assert_is_state(restored, state_a, "A")
        (a.root / "srv/huge").unlink()
        r = run_agent(a, "backup")
        assert r.returncode == 0, r.output
        assert list((a.volume_dir / "work").iterdir()) == []


def test_a_backup_killed_while_pruning_leaves_the_new_generation_current(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path), generations="2")
    make_rich_root(a.root)
    with mounted_volume(a) as dev:
        attach(a)
        oldest = a.current().name
        (a.root / "etc/hostname").write_text("second\n")
        backup(a)
        change_to_state_b(a.root)
        state_b = snapshot(a.root)
        with running_agent(a, "backup", env_extra={"ROOTSYNC_TEST_PAUSE_AT": "pruning"}) as proc:
            wait_paused(a, "pruning", proc)
        # The pruned generation is out of generations/ before any of it is deleted.
        assert not (a.volume_dir / "generations" / oldest).exists()
        assert (a.volume_dir / "work" / f"pruning-{oldest}").exists()
        restored = restore_elsewhere(tmp_path, dev, a, "fresh1")
        assert_is_state(restored, state_b, "B")
        r = run_agent(a, "backup")
        assert r.returncode == 0 and "removing unfinished" in r.output, r.output
        assert list((a.volume_dir / "work").iterdir()) == []
