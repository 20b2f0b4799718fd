"""The sync agent, run for real: an ext4 volume on a loop device, fake root trees with
every kind of file, the real `rootsync` script.  Nothing is mocked; nothing touches
this machine's own root (see syncagent_helpers)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import time
from pathlib import Path

import pytest

from builder.core import sh
from syncagent_helpers import (EX_BUSY, EX_REFUSED, TOOLS_PATH, assert_same_tree, attach, backup, label_for,
                               loop_image, make_rich_root, mounted_volume, move_volume, needs_root_and_tools,
                               new_instance, run_agent, running_agent, status, wait_paused)

pytestmark = pytest.mark.usefixtures("needs_root_and_tools")


def gen_dirs(inst) -> list[Path]:
    return sorted(p for p in (inst.volume_dir / "generations").iterdir())


def test_first_backup_keeps_every_kind_of_file_identically(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    make_rich_root(a.root)
    with mounted_volume(a):
        attach(a)
        st = status(a)
        assert st["paired"] and st["current"] and st["last_backup"]["result"] == "ok"
        tree = a.current() / "tree"
        assert_same_tree(a.root, tree)
        # Sparse files stay sparse on the volume.
        sparse = tree / "var/lib/app/sparse.img"
        assert os.lstat(sparse).st_blocks * 512 < 1024 * 1024
        # Excluded places are not on the volume at all.
        for rel in ("proc", "sys", "dev", "run", "tmp", "mnt", "media", "var/run", "var/lock",
                    "var/lib/rootsync/volume", "var/lib/rootsync/state"):
            assert not (tree / rel).exists() and not (tree / rel).is_symlink(), rel
        assert (tree / "var/lib/rootsync/volume-id").read_text() == st["volume_id"] + "\n"


def test_backup_copies_only_changed_files_and_hard_links_the_rest(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    make_rich_root(a.root)
    with mounted_volume(a):
        attach(a)
        first = a.current()
        (a.root / "etc/hostname").write_text("renamed\n")
        out = backup(a)
        second = a.current()
        assert first != second
        assert " files=1 " in out, out
        st = status(a)
        assert st["last_backup"]["files"] == 1
        assert [g["name"] for g in st["generations"]] == [first.name, second.name]
        # Unchanged files share their inode with the previous generation...
        for rel in ("etc/passwd", "usr/bin/tool7", "var/lib/app/sparse.img", "usr/bin/perl"):
            assert os.lstat(first / "tree" / rel).st_ino == os.lstat(second / "tree" / rel).st_ino, rel
        # ...the changed one does not, and the previous generation still has the old content.
        assert os.lstat(first / "tree/etc/hostname").st_ino != os.lstat(second / "tree/etc/hostname").st_ino
        assert (first / "tree/etc/hostname").read_text() == "instance-a\n"
        assert (second / "tree/etc/hostname").read_text() == "renamed\n"
        assert_same_tree(a.root, second / "tree")


def test_deletions_propagate_and_restore_never_resurrects_deleted_files(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    b = new_instance(tmp_path / "b", a.label)
    make_rich_root(a.root)
    with mounted_volume(a) as dev:
        attach(a)
        (a.root / "etc/hostname").unlink()
        shutil.rmtree(a.root / "home/user/.config")
        backup(a)
        assert not (a.current() / "tree/etc/hostname").exists()
        assert not (a.current() / "tree/home/user/.config").exists()
        # A fresh instance that happens to have those paths loses them on restore.
        (b.root / "etc").mkdir(parents=True)
        (b.root / "etc/hostname").write_text("fresh\n")
        (b.root / "home/user/.config").mkdir(parents=True)
        move_volume(dev, a, b)
        r = run_agent(b, "restore")
        assert r.returncode == 0, r.output
        assert "restore complete generation=" in r.output
        assert not (b.root / "etc/hostname").exists()
        assert not (b.root / "home/user/.config").exists()
        assert_same_tree(a.root, b.root)


def test_restore_on_a_fresh_instance_gives_the_identical_tree_and_leaves_excluded_paths_alone(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    a.excludes = ("/var/cache", "/srv/data/*.tmp")
    b = new_instance(tmp_path / "b", a.label)
    b.excludes = a.excludes
    make_rich_root(a.root)
    (a.root / "var/cache/apt.bin").write_text("cache\n")
    (a.root / "srv/data/x.tmp").write_text("temporary\n")
    with mounted_volume(a) as dev:
        attach(a)
        tree = a.current() / "tree"
        assert not (tree / "var/cache").exists() and not (tree / "srv/data/x.tmp").exists()
        # Instance B: its own excluded content, which restore must not touch.
        for rel, text in (("proc/cpuinfo", "b proc"), ("tmp/b-scratch", "b tmp"), ("var/cache/b", "b cache"),
                          ("srv/data/b.tmp", "b temporary"), ("mnt/b", "b mnt"), ("etc/stale", "stale")):
            (b.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (b.root / rel).write_text(text)
        move_volume(dev, a, b)
        r = run_agent(b, "restore")
        assert r.returncode == 0, r.output
        for rel, text in (("proc/cpuinfo", "b proc"), ("tmp/b-scratch", "b tmp"), ("var/cache/b", "b cache"),
                          ("srv/data/b.tmp", "b temporary"), ("mnt/b", "b mnt")):
            assert (b.root / rel).read_text() == text, rel
        assert not (b.root / "etc/stale").exists()
        assert not (b.root / "proc/1").exists()
        assert_same_tree(a.root, b.root, extra_excludes=("var/cache", "srv/data/x.tmp", "srv/data/b.tmp"))
        # B is now paired with the volume: the volume's ID came back with the tree.
        st = status(b)
        assert st["paired"] and st["instance_volume_id"] == st["volume_id"]


def test_restore_is_refused_without_a_complete_generation(tmp_path):
    b = new_instance(tmp_path / "b", label_for(tmp_path))
    (b.root / "etc").mkdir(parents=True)
    (b.root / "etc/keep").write_text("keep\n")
    with mounted_volume(b):
        # An empty volume.
        r = run_agent(b, "restore")
        assert r.returncode == EX_REFUSED
        assert "no complete generation" in r.output
        # A volume with only an unfinished generation (what a crash in the first backup leaves).
        partial = b.volume_dir / "work/20260101T000000.000000000Z/tree/etc"
        partial.mkdir(parents=True)
        (partial / "half").write_text("half\n")
        r = run_agent(b, "restore")
        assert r.returncode == EX_REFUSED
        assert "no complete generation" in r.output
        # A current pointer to an incremental generation whose base is gone.
        g = b.volume_dir / "generations/20260101T000001.000000000Z"
        (g / "tree").mkdir(parents=True)
        (g / "info").write_text("kind=incremental\nbase=20200101T000000.000000000Z\n")
        (g / "deleted").write_text("")
        (b.volume_dir / "current").symlink_to("generations/" + g.name)
        r = run_agent(b, "restore")
        assert r.returncode == EX_REFUSED
        assert "not complete" in r.output
        assert (b.root / "etc/keep").read_text() == "keep\n"
        assert sorted(p.name for p in (b.root / "etc").iterdir()) == ["keep"]


def test_a_paired_instance_is_never_restored_over_without_force(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    make_rich_root(a.root)
    with mounted_volume(a):
        attach(a)
        (a.root / "etc/newer").write_text("newer than the backup\n")
        r = run_agent(a, "restore")
        assert r.returncode == EX_REFUSED and "paired" in r.output
        assert (a.root / "etc/newer").exists()
        # The attach logic of a paired instance resumes backups and restores nothing.
        r = run_agent(a, "attach")
        assert r.returncode == 0 and "backups resume" in r.output, r.output
        assert (a.root / "etc/newer").exists()
        # An explicit roll-back is possible.
        r = run_agent(a, "restore", "--force")
        assert r.returncode == 0, r.output
        assert not (a.root / "etc/newer").exists()


def test_an_instance_paired_with_another_volume_is_never_restored_over_without_force(tmp_path):
    # B backs up to a volume of its own; A's volume is attached to it.  A restore would
    # make B's root A's and move B's pairing to A's volume, orphaning B's backups.
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    b = new_instance(tmp_path / "b", a.label)
    make_rich_root(a.root)
    b_pair = b.root / "var/lib/rootsync/volume-id"
    b_pair.write_text("b-own-volume\n")
    (b.root / "etc").mkdir(parents=True)
    (b.root / "etc/mine").write_text("mine\n")
    with mounted_volume(a) as dev:
        attach(a)
        gen = a.current().name
        move_volume(dev, a, b)
        for args in ((), ("--generation", gen)):
            r = run_agent(b, "restore", *args)
            assert r.returncode == EX_REFUSED and "paired with another volume (b-own-volume)" in r.output, r.output
            assert "restore complete" not in r.output
        assert sorted(p.name for p in (b.root / "etc").iterdir()) == ["mine"]
        assert b_pair.read_text() == "b-own-volume\n"
        st = status(b)
        assert not st["paired"] and st["instance_volume_id"] == "b-own-volume"
        # Adopting the volume anyway is possible, explicitly.
        r = run_agent(b, "restore", "--force")
        assert r.returncode == 0 and "restore complete generation=" in r.output, r.output
        assert_same_tree(a.root, b.root)
        st = status(b)
        assert st["paired"] and st["instance_volume_id"] == st["volume_id"]


def test_two_backups_never_overlap_and_restore_waits_for_none(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    make_rich_root(a.root)
    with mounted_volume(a):
        attach(a)
        with running_agent(a, "backup", env_extra={"ROOTSYNC_TEST_PAUSE_AT": "before-copy"}) as proc:
            wait_paused(a, "before-copy", proc)
            r = run_agent(a, "backup")
            assert r.returncode == EX_BUSY and "running" in r.output, r.output
            r = run_agent(a, "restore", "--force")
            assert r.returncode == EX_BUSY, r.output
            # The timer's backup quietly gives way.
            r = run_agent(a, "backup", "--if-attached")
            assert r.returncode == 0 and "backup complete" not in r.output
        backup(a)


def test_backup_refuses_an_unpaired_volume(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    make_rich_root(a.root)
    with mounted_volume(a):
        r = run_agent(a, "backup")
        assert r.returncode == EX_REFUSED and "not paired" in r.output
        r = run_agent(a, "backup", "--if-attached")
        assert r.returncode == 0 and not (a.volume_dir / "generations").exists()


def test_timer_backup_runs_only_when_due(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path), interval="1")
    make_rich_root(a.root)
    with mounted_volume(a):
        attach(a)
        n = len(gen_dirs(a))
        r = run_agent(a, "backup", "--if-due")
        assert r.returncode == 0 and len(gen_dirs(a)) == n
        last_full = a.root / "var/lib/rootsync/state/last-full"
        last_full.write_text(str(int(time.time()) - 61) + "\n")
        r = run_agent(a, "backup", "--if-due")
        assert r.returncode == 0 and "backup complete" in r.output, r.output
        assert len(gen_dirs(a)) == n + 1


def test_old_generations_are_pruned_but_never_the_current_one(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path), generations="3")
    (a.root / "etc").mkdir(parents=True)
    with mounted_volume(a):
        attach(a)
        for i in range(4):
            (a.root / "etc/counter").write_text(str(i) * (i + 1))
            backup(a)
        names = [p.name for p in gen_dirs(a)]
        assert len(names) == 3
        assert a.current().name == names[-1]
        assert (a.current() / "tree/etc/counter").read_text() == "3333"
        assert list((a.volume_dir / "work").iterdir()) == []


def test_status_reports_generations_last_result_and_watcher(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    (a.root / "etc").mkdir(parents=True)
    with mounted_volume(a) as dev:
        st = status(a)
        assert st["mounted"] and st["device"] == dev and st["generations"] == [] and st["current"] is None
        assert st["last_backup"] is None and st["watcher"]["running"] is False
        # The agent runs the rsync and inotifywait its PATH names first (Lucid's, when
        # SYNC_AGENT_TEST_TOOLS points at them).
        for name, flag in (("rsync", "--version"), ("inotifywait", "--help")):
            out = sh.run([name, flag], env={"PATH": TOOLS_PATH + "/usr/bin:/bin"}, check=False, quiet=True).output
            assert st[f"{name}_version"] and st[f"{name}_version"] in out.splitlines()[0], (name, st)
        t0 = time.time()
        console = tmp_path / "console"
        r = run_agent(a, "attach", env_extra={"ROOTSYNC_CONSOLE": str(console)})
        assert r.returncode == 0, r.output
        # Every log line also goes to the console (upstart and cron set /dev/console).
        assert re.search(r"^rootsync: backup complete generation=\S+ kind=full files=\d+ bytes=\d+ seconds=[\d.]+$",
                         console.read_text(), re.M), console.read_text()
        st = status(a)
        (g,) = st["generations"]
        assert g["kind"] == "full" and g["current"] and g["restorable"]
        assert g["started"] >= t0 - 1 and g["finished"] >= g["started"] and g["covers_until"] >= t0 - 1
        assert st["last_backup"]["result"] == "ok" and st["last_backup"]["generation"] == g["name"]
        text = run_agent(a, "status")
        assert text.returncode == 0 and g["name"] in text.output and "paired" in text.output


def test_memory_filesystems_mounted_below_the_root_are_neither_copied_nor_touched(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    b = new_instance(tmp_path / "b", a.label)
    (a.root / "etc").mkdir(parents=True)
    (a.root / "lib/init/rw").mkdir(parents=True)
    (b.root / "lib/init/rw").mkdir(parents=True)
    with mounted_volume(a) as dev, sh.mount("tmpfs", a.root / "lib/init/rw", fstype="tmpfs"):
        (a.root / "lib/init/rw/volatile").write_text("in memory\n")
        attach(a)
        assert not (a.current() / "tree/lib/init/rw").exists()
        assert (a.current() / "tree/lib/init").is_dir()
        with sh.mount("tmpfs", b.root / "lib/init/rw", fstype="tmpfs"):
            (b.root / "lib/init/rw/b-only").write_text("b\n")
            move_volume(dev, a, b)
            r = run_agent(b, "restore")
            assert r.returncode == 0, r.output
            assert (b.root / "lib/init/rw/b-only").read_text() == "b\n"


def test_other_filesystems_mounted_below_the_root_are_neither_copied_nor_touched(tmp_path):
    # The instance's ephemeral disk or a data volume is not its root filesystem: no
    # backup copies it, no restore writes to it or deletes in it.  A disk filesystem at
    # /data, and a bind mount (on the root's own device, where rsync -x alone would
    # not stop) at a path with a blank, which /proc/mounts writes as \040.
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    b = new_instance(tmp_path / "b", a.label)
    make_rich_root(a.root)
    others = ("data", "srv/with space")
    for inst in (a, b):
        for rel in others:
            (inst.root / rel).mkdir(parents=True, exist_ok=True)
        (inst.base / "outside").mkdir()
    with contextlib.ExitStack() as stack:
        dev = stack.enter_context(mounted_volume(a))
        a_data = stack.enter_context(loop_image(tmp_path / "a-data.img", 32, "rtdata-a"))
        stack.enter_context(sh.mount(a_data, a.root / "data"))
        stack.enter_context(sh.mount(str(a.base / "outside"), a.root / "srv/with space", bind=True))
        (a.root / "data/payload").write_text("on the data disk\n")
        (a.root / "srv/with space/bound").write_text("bound\n")
        attach(a)
        tree = a.current() / "tree"
        # The directories they are mounted on are kept, empty: a restored instance
        # needs them to mount on.
        for rel in others:
            assert (tree / rel).is_dir() and os.listdir(tree / rel) == [], rel
        assert_same_tree(a.root, tree, extra_excludes=others)
        # Incremental: named changes there are left out as well.
        (a.root / "data/later").write_text("later\n")
        (a.root / "data/newdir").mkdir()
        (a.root / "data/newdir/f").write_text("f\n")
        (a.root / "srv/with space/later").write_text("later\n")
        (a.root / "etc/hostname").write_text("changed\n")
        events = tmp_path / "events"
        events.write_text(f"CLOSE_WRITE,CLOSE {a.root}/data/later\n"
                          f"CREATE,ISDIR {a.root}/data/newdir\n"
                          f"CLOSE_WRITE,CLOSE {a.root}/srv/with space/later\n"
                          f"CLOSE_WRITE,CLOSE {a.root}/etc/hostname\n")
        assert "kind=incremental" in backup(a, "--changes", str(events))
        tree = a.current() / "tree"
        assert (tree / "etc/hostname").read_text() == "changed\n"
        for rel in others:
            # (Every incremental tree holds the top directory's entries, a directory
            # there without what is below it.)
            assert not (tree / rel).exists() or os.listdir(tree / rel) == [], rel
        # What a generation made without this rule would hold: files for those
        # directories, in the base and in the incremental tree, and deletions there.
        base = a.volume_dir / "generations" / status(a)["generations"][-1]["base"] / "tree"
        (base / "data/from-base").write_text("base\n")
        (tree / "data").mkdir(exist_ok=True)
        (tree / "data/from-incremental").write_text("incremental\n")
        with open(a.current() / "deleted", "a") as f:
            f.write("data/b-only\nsrv/with space\n")
        # Instance B has the same kinds of mounts, with its own content.
        b_data = stack.enter_context(loop_image(tmp_path / "b-data.img", 32, "rtdata-b"))
        stack.enter_context(sh.mount(b_data, b.root / "data"))
        stack.enter_context(sh.mount(str(b.base / "outside"), b.root / "srv/with space", bind=True))
        (b.root / "data/b-only").write_text("b\n")
        (b.root / "srv/with space/b-bound").write_text("b bound\n")
        os.chmod(b.root / "data", 0o750)
        os.utime(b.root / "data", ns=(1_200_000_000_000_000_000,) * 2)
        before = {rel: (sorted(os.listdir(b.root / rel)), os.stat(b.root / rel)) for rel in others}
        move_volume(dev, a, b)
        r = run_agent(b, "restore")
        assert r.returncode == 0, r.output
        for rel in others:
            names, st = before[rel]
            now = os.stat(b.root / rel)
            assert sorted(os.listdir(b.root / rel)) == names, rel
            assert (now.st_mode, now.st_uid, now.st_gid, now.st_mtime_ns) == \
                (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns), rel
        assert (b.root / "data/b-only").read_text() == "b\n"
        assert (b.base / "outside/b-bound").read_text() == "b bound\n"
        assert_same_tree(a.root, b.root, extra_excludes=others)


def test_pruning_keeps_the_base_of_a_kept_incremental_generation(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path), generations="2")
    b = new_instance(tmp_path / "b", a.label)
    make_rich_root(a.root)
    with mounted_volume(a) as dev:
        attach(a)
        base = a.current().name
        events = tmp_path / "events"
        for i in range(3):
            (a.root / "etc/hostname").write_text(f"incremental {i}\n")
            events.write_text(f"CLOSE_WRITE,CLOSE {a.root}/etc/hostname\n")
            out = backup(a, "--changes", str(events))
            assert "kind=incremental" in out
        names = [p.name for p in gen_dirs(a)]
        # Two generations kept: the current incremental one and the base it needs.
        assert names == [base, a.current().name], names
        move_volume(dev, a, b)
        r = run_agent(b, "restore")
        assert r.returncode == 0, r.output
        assert_same_tree(a.root, b.root)


def test_restore_never_deletes_a_directory_that_holds_an_excluded_path(tmp_path):
    # A deleted-list entry naming the directory the volume is mounted in must not
    # take the volume (or anything excluded) with it.
    a = new_instance(tmp_path / "a", label_for(tmp_path))
    b = new_instance(tmp_path / "b", a.label)
    make_rich_root(a.root)
    with mounted_volume(a) as dev:
        attach(a)
        events = tmp_path / "events"
        (a.root / "etc/hostname").write_text("changed\n")
        events.write_text(f"CLOSE_WRITE,CLOSE {a.root}/etc/hostname\n")
        backup(a, "--changes", str(events))
        deleted = a.current() / "deleted"
        deleted.write_text("var/lib\nvar/lib/rootsync\nvar/lib/app\n")
        (b.root / "tmp").mkdir(parents=True)
        (b.root / "tmp/keep").write_text("b\n")
        move_volume(dev, a, b)
        r = run_agent(b, "restore")
        assert r.returncode == 0, r.output
        assert not (b.root / "var/lib/app").exists()  # an ordinary entry is applied
        assert (b.root / "var/lib/rootsync/volume-id").exists()
        assert (b.volume_dir / "current").resolve().is_dir(), "the volume lost its generations"
        assert (b.root / "tmp/keep").read_text() == "b\n"
