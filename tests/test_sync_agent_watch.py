"""Watch mode: inotify names the changed paths, a debounced incremental backup puts
them in a complete generation within seconds, and restoring that generation gives the
tree exactly as it was."""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import pytest

from builder.core import sh
from syncagent_helpers import (PATIENCE, assert_same_tree, attach, kill_group, label_for, listing, lock_free,
                               loop_image, make_rich_root, mounted_volume, move_volume, needs_root_and_tools,
                               new_instance, run_agent, running_agent, start_agent, status, wait_for)

pytestmark = [pytest.mark.usefixtures("needs_root_and_tools"), pytest.mark.slow]

DEBOUNCE = 1


@contextlib.contextmanager
def watching(inst):
    """The watcher running on `inst`, its starting whole-tree pass complete and the agent
    idle again (a backup by hand right after is not refused as busy); ended on any exit,
    the wait for that pass included."""
    # Read before the start: on a fast machine the pass could otherwise be done first.
    first = status(inst)["current"]
    with running_agent(inst, "watch") as proc:
        def ready():
            assert proc.poll() is None, (inst.base / "agent.log").read_text()
            st = status(inst)
            return st["watcher"]["running"] and st["current"] != first and lock_free(inst) and st["current"]

        wait_for(ready, PATIENCE, "the watcher's first whole-tree pass", interval=0.2)
        yield proc


def covering_generation(inst, t: float) -> str | None:
    """The current generation if it covers every change made before time `t`.  Read from
    the volume directly, which is quicker than `status` and so adds less to a measured
    recovery point."""
    with contextlib.suppress(OSError, ValueError):
        name = os.readlink(inst.volume_dir / "current").rsplit("/", 1)[-1]
        info = dict(ln.split("=", 1) for ln in (inst.volume_dir / "generations" / name / "info").read_text().splitlines()
                    if "=" in ln)
        if info.get("covers_until") and float(info["covers_until"]) > t:
            return name
    return None


def generation(inst, name: str) -> dict:
    """`status`'s entry for generation `name`, which must be the current one."""
    (gen,) = [g for g in status(inst)["generations"] if g["name"] == name]
    assert gen["current"], gen
    return gen


def wait_covered(inst, t: float) -> dict:
    """Wait for a complete generation that covers every change made before time `t`."""
    name = wait_for(lambda: covering_generation(inst, t), PATIENCE, "a generation covering the change")
    return generation(inst, name)


def wait_idle(inst) -> None:
    """Wait for the backup that made the current generation to end (it still prunes and
    exits after publishing it): a backup by hand now is not refused as busy."""
    wait_for(lambda: lock_free(inst), PATIENCE, "the watcher's backup to end", interval=0.1)


def test_a_change_is_in_a_complete_generation_within_the_debounce_plus_sync_time(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path), debounce=str(DEBOUNCE))
    make_rich_root(a.root)
    with mounted_volume(a):
        attach(a)
        with watching(a):
            first_gen = a.current()
            before = listing(first_gen / "tree")
            t0 = time.time()
            (a.root / "etc/hostname").write_text("written while watched\n")
            name = wait_for(lambda: covering_generation(a, t0), PATIENCE, "a generation covering the change",
                            interval=0.02)
            elapsed = time.time() - t0
            gen = generation(a, name)
            assert gen["kind"] == "incremental"
            tree = a.current() / "tree"
            assert (tree / "etc/hostname").read_text() == "written while watched\n"
            # Debounce, plus the watcher's one-second poll, plus the backup itself.
            assert elapsed < DEBOUNCE + 1.0 + gen["seconds"] + 1.5, f"recovery point {elapsed:.2f} s"
            # Only the changed file was copied; the older generation is untouched.
            assert gen["files"] == 1
            assert listing(first_gen / "tree") == before
            assert (first_gen / "tree/etc/hostname").read_text() == "instance-a\n"


def test_a_series_of_watched_changes_restores_to_exactly_the_watched_tree(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path), debounce=str(DEBOUNCE))
    b = new_instance(tmp_path / "b", a.label)
    make_rich_root(a.root)
    with mounted_volume(a) as dev:
        attach(a)
        with watching(a):
            gen0 = a.current()
            before = listing(gen0 / "tree")
            r = a.root
            # Round 1: content, metadata, deletion, a new directory tree, a rename.
            (r / "etc/hostname").write_text("round one\n")
            os.chmod(r / "usr/bin/tool5", 0o750)
            os.chown(r / "usr/bin/tool6", 1000, 1000)
            os.setxattr(r / "usr/bin/tool7", "user.tag", b"watched")
            (r / "etc/empty").unlink()
            shutil.rmtree(r / "home/user/.config")
            (r / "opt/app/lib").mkdir(parents=True)
            (r / "opt/app/lib/a.so").write_bytes(os.urandom(5000))
            (r / "opt/app/run.sh").write_text("#!/bin/sh\n")
            (r / "opt/app/current").symlink_to("lib")
            os.rename(r / "usr/bin/tool8", r / "usr/bin/tool8-renamed")
            os.mkfifo(r / "var/lib/app/fifo2")
            t1 = time.time()
            g1 = wait_covered(a, t1)
            assert g1["kind"] == "incremental"
            # Round 2: on top of the incremental one — a path deleted then recreated as a
            # directory, a file replaced by a symlink, a directory moved.
            (r / "etc/hostname").unlink()
            (r / "etc/hostname").mkdir()
            (r / "etc/hostname/inner").write_text("now a directory\n")
            (r / "etc/rel-link").unlink()
            (r / "etc/rel-link").write_text("no longer a link\n")
            os.rename(r / "opt/app", r / "srv/app-moved")
            with open(r / "var/lib/app/sparse.img", "r+b") as f:
                f.seek(4 * 1024 * 1024)
                f.write(b"middle")
            t2 = time.time()
            g2 = wait_covered(a, t2)
            assert g2["kind"] == "incremental" and g2["base"] == g1["base"]
            # The whole-tree generation the incremental ones build on is unchanged.
            assert listing(gen0 / "tree") == before
        move_volume(dev, a, b)
        r2 = run_agent(b, "restore")
        assert r2.returncode == 0, r2.output
        assert_same_tree(a.root, b.root)


def test_a_new_hard_link_makes_the_watcher_take_a_whole_tree_pass(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path), debounce=str(DEBOUNCE))
    b = new_instance(tmp_path / "b", a.label)
    make_rich_root(a.root)
    with mounted_volume(a) as dev:
        attach(a)
        with watching(a):
            os.link(a.root / "etc/passwd", a.root / "srv/data/passwd-link")
            with open(a.root / "usr/bin/perl", "ab") as f:
                f.write(b"# appended through one of three names\n")
            gen = wait_covered(a, time.time())
            assert gen["kind"] == "full"
        move_volume(dev, a, b)
        r = run_agent(b, "restore")
        assert r.returncode == 0, r.output
        assert_same_tree(a.root, b.root)
        assert os.lstat(b.root / "srv/data/perl-hardlink").st_ino == os.lstat(b.root / "usr/bin/perl").st_ino


def test_a_watcher_waiting_at_attach_is_watching_before_the_first_backup_and_makes_no_pass_of_its_own(tmp_path):
    """The watcher waits for a paired volume; the attach gives it time to set its watches
    before the first backup, so that backup holds every change made before them and the
    spool every change after: a change made while the first backup copies is in the next,
    incremental generation, no second whole-tree pass is made, and a restore of that
    generation is the tree exactly."""
    a = new_instance(tmp_path / "a", label_for(tmp_path), debounce=str(DEBOUNCE))
    b = new_instance(tmp_path / "b", a.label)
    make_rich_root(a.root)
    # the first copy slowed down (a 4 MiB file at 1 MiB/s), so that a change lands during it
    (a.root / "var/lib/app/big.bin").write_bytes(os.urandom(4 << 20))
    slow = {"ROOTSYNC_TEST_RSYNC_ARGS": "--bwlimit=1024"}
    log = a.base / "agent.log"
    with running_agent(a, "watch") as watcher:
        wait_for(lambda: "waiting for a paired volume" in log.read_text(), PATIENCE,
                 "the watcher to report it is waiting")
        with mounted_volume(a) as dev:
            # Ended while the volume is still mounted (running_agent's own end comes after
            # the unmount, too late to leave it free).
            try:
                # (not running_agent, whose end kills every process of the instance: the watcher too)
                attaching = start_agent(a, "attach", env_extra=slow, log=a.base / "attach.log")
                try:
                    wait_for(lambda: "first backup starts" in (a.base / "attach.log").read_text(), PATIENCE,
                             "the attach to start the first backup")
                    during = time.time()
                    (a.root / "etc/hostname").write_text("changed while the first backup copies\n")
                    assert attaching.wait(timeout=PATIENCE) == 0, (a.base / "attach.log").read_text()
                finally:
                    kill_group(attaching)
                attached = (a.base / "attach.log").read_text()
                # the watches were set before the first backup started
                watching_at = float((a.run_dir / "watching").read_text())
                first = status(a)["generations"][0]
                assert first["kind"] == "full" and first["started"] >= watching_at, (first, watching_at)
                assert attached.index("first backup starts") < attached.index("backup complete")
                gen = wait_covered(a, during)
                assert gen["kind"] == "incremental" and gen["base"] == first["name"], gen
                wait_for(lambda: "no whole-tree pass needed" in log.read_text(), PATIENCE,
                         "the watcher to say it needs no pass of its own")
                assert watcher.poll() is None
                assert [g["kind"] for g in status(a)["generations"]] == ["full", "incremental"]
            finally:
                kill_group(watcher)
            move_volume(dev, a, b)
            r = run_agent(b, "restore")
            assert r.returncode == 0, r.output
            assert (b.root / "etc/hostname").read_text() == "changed while the first backup copies\n"
            assert_same_tree(a.root, b.root)


def test_changes_under_var_log_wait_for_the_whole_tree_pass(tmp_path):
    a = new_instance(tmp_path / "a", label_for(tmp_path), debounce=str(DEBOUNCE))
    (a.root / "etc").mkdir(parents=True)
    (a.root / "var/log").mkdir(parents=True)
    with mounted_volume(a):
        attach(a)
        with watching(a):
            gens = len(status(a)["generations"])
            (a.root / "var/log/syslog").write_text("a log line\n")
            # The watcher says nothing of a change it does not watch: this wait is no
            # proof on its own (on a slow machine a backup it started could still be
            # running), which the check after the next change gives.
            time.sleep(DEBOUNCE + 3)
            assert len(status(a)["generations"]) == gens, "a change under /var/log started a backup"
            (a.root / "etc/motd").write_text("watched\n")
            gen = wait_covered(a, time.time())
            # inotify reports in order: an event for the log line would have come before
            # this change's, so in this generation or in one before it.
            assert len(status(a)["generations"]) == gens + 1, "a change under /var/log started a backup"
            assert not (a.current() / "tree/var/log/syslog").exists()
            wait_idle(a)
            r = run_agent(a, "backup")
            assert r.returncode == 0, r.output
            assert a.current().name != gen["name"]
            assert (a.current() / "tree/var/log/syslog").read_text() == "a log line\n"


def test_changes_already_in_a_whole_tree_backup_make_no_further_generation(tmp_path):
    # The order a host-side check uses: write, back up by hand at once, expect that
    # backup's generation to stay the current one.
    a = new_instance(tmp_path / "a", label_for(tmp_path), debounce="2")
    make_rich_root(a.root)
    with mounted_volume(a):
        attach(a)
        with watching(a):
            marker = a.root / "etc/marker"
            marker.write_text("written just before a manual backup\n")
            # Once the watcher holds the change's last event the backup below starts
            # after it, however slowly the watcher's reader runs on a loaded machine.
            spool = (a.run_dir / "events", a.run_dir / "events.batch")
            wait_for(lambda: any(f"CLOSE_WRITE,CLOSE {marker}" in p.read_text() for p in spool if p.exists()),
                     PATIENCE, "the watcher to receive the change")
            r = run_agent(a, "backup")
            assert r.returncode == 0, r.output
            manual = status(a)["current"]
            # The watcher says when it finds the changes already in a generation.
            log = a.base / "agent.log"
            wait_for(lambda: f"are already in generation {manual}" in log.read_text(), PATIENCE,
                     "the watcher to handle the change", interval=0.2)
            st = status(a)
            assert st["current"] == manual, "the watcher made a generation for changes already backed up"
            assert (a.current() / "tree/etc/marker").exists()
            assert "are already in generation" in log.read_text()
            # A change after the manual backup still gets its own generation.
            t = time.time()
            (a.root / "etc/marker").write_text("after\n")
            wait_covered(a, t)
            assert (a.current() / "tree/etc/marker").read_text() == "after\n"


def test_changes_on_another_filesystem_below_the_root_are_not_watched(tmp_path):
    # inotifywait -r would follow into a data disk mounted below the root; the
    # watcher leaves it out, as the whole-tree pass does.
    a = new_instance(tmp_path / "a", label_for(tmp_path), debounce=str(DEBOUNCE))
    (a.root / "etc").mkdir(parents=True)
    (a.root / "data").mkdir()
    with mounted_volume(a), loop_image(tmp_path / "data.img", 32, "rtdata") as data, \
            sh.mount(data, a.root / "data"):
        attach(a)
        with watching(a):
            gens = len(status(a)["generations"])
            (a.root / "data/busy").write_text("on the data disk\n")
            (a.root / "data/sub").mkdir()
            # No proof on its own (see the /var/log test); the count below is.
            time.sleep(DEBOUNCE + 3)
            assert len(status(a)["generations"]) == gens, "a change on another filesystem started a backup"
            (a.root / "etc/motd").write_text("watched\n")
            gen = wait_covered(a, time.time())
            assert len(status(a)["generations"]) == gens + 1, "a change on another filesystem started a backup"
            assert gen["kind"] == "incremental"
            assert (a.current() / "tree/etc/motd").read_text() == "watched\n"
            assert not (a.current() / "tree/data/busy").exists() and not (a.current() / "tree/data/sub").exists()
