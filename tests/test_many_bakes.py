"""Many bakes on one box: `bake build A B -j 2`, the lock per recipe (a second bake of a
recipe waits, or with --no-wait exits busy at once naming the holder), and the exit
statuses a program reads."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from builder.core import exitcodes, sh, stale
from builder.core.locks import recipe_lock
from conftest import BAKE, REPO
from event_stream import parse
from events import wait_for
from shared_base import recipes

DEMO = REPO / "recipes" / "debian-demo.yml"


def test_no_wait_exits_busy_at_once_naming_the_holder_and_makes_nothing(tmp_path):
    out = tmp_path / "out"
    with recipe_lock("debian-demo"):
        r = subprocess.run([BAKE, "build", str(DEMO), "--output", str(out), "--no-wait"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == exitcodes.BUSY, r.stderr
    assert f"recipe debian-demo is in use by pid {os.getpid()}" in r.stderr
    assert r.stdout == ""
    assert not out.exists()


def test_a_second_bake_of_a_recipe_waits_for_the_holder_and_can_be_interrupted_while_it_waits(tmp_path):
    out = tmp_path / "out"
    err = tmp_path / "stderr"
    with recipe_lock("debian-demo"), open(err, "w") as f:
        p = subprocess.Popen([BAKE, "build", str(DEMO), "--output", str(out)], stdout=subprocess.PIPE,
                             stderr=f, text=True)
        try:
            wait_for(lambda: "waiting for recipe debian-demo" in err.read_text() or p.poll() is not None, 120,
                     "the second bake to say it waits")
            assert p.poll() is None, err.read_text()
            assert f"in use by pid {os.getpid()}" in err.read_text()
            p.send_signal(signal.SIGTERM)
            p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == exitcodes.INTERRUPTED, err.read_text()
    assert not out.exists(), "nothing is made before the recipe is free"


def test_bad_input_is_refused_before_waiting_for_the_recipe(tmp_path):
    with recipe_lock("debian-demo"):
        r = subprocess.run([BAKE, "build", str(DEMO), "--output", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, BAKE_MIRROR="notaurl"))
    assert r.returncode == exitcodes.FAILED
    assert "BAKE_MIRROR" in r.stderr and "waiting" not in r.stderr


def test_several_recipes_with_one_invalid_bake_the_others_and_say_which_failed(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("name: bad\nrelease: debian/bookworm\npakages: [less]\n")
    # the valid one is held by this test and asked for without waiting: it ends at once
    with recipe_lock("debian-demo"):
        r = subprocess.run([BAKE, "build", str(bad), str(DEMO), "--no-wait", "--output", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == exitcodes.SOME_FAILED, r.stderr
    assert f"bake: error: {bad}:3: pakages: unknown key" in r.stderr
    assert "debian-demo | bake: busy: recipe debian-demo is in use by pid" in r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["RECIPE", "RESULT", "TIME", "BUILD"]
    assert lines[1].startswith("bad ") and "invalid recipe" in lines[1]
    assert any(line.startswith("debian-demo ") and "busy" in line for line in lines[2:]), r.stdout


def test_j_must_be_at_least_one(tmp_path):
    r = subprocess.run([BAKE, "build", str(DEMO), str(DEMO), "-j", "0", "--output", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == exitcodes.FAILED and "-j 0: the number of bakes at a time must be at least 1" in r.stderr


def _interval(record: dict) -> tuple[dt.datetime, dt.datetime]:
    return dt.datetime.fromisoformat(record["created"]), dt.datetime.fromisoformat(record["finished"])


@pytest.mark.bakes
@pytest.mark.boots
@pytest.mark.e2e
@pytest.mark.alone
def test_two_recipes_sharing_a_base_baked_and_verified_with_j2_and_one_debootstrap(tmp_path):
    # verified in parallel by every check but the two that boot a second instance (the
    # sync agent's round trip and hygiene), which test_verify proves on the demo build
    a, b = recipes(tmp_path, skip_checks=["hygiene", "sync-agent"])
    cache = tmp_path / "cache"          # empty: the base is made during this run, once
    out = tmp_path / "out"
    env = dict(os.environ, BAKE_CACHE=str(cache))
    env.pop("BAKE_GROUP", None)
    for k in ("EC2_URL", "S3_URL", "EC2_ACCESS_KEY", "EC2_SECRET_KEY"):
        env.pop(k, None)
    started: list[subprocess.Popen] = []

    def start(*args: str, stderr=subprocess.PIPE) -> subprocess.Popen:
        p = subprocess.Popen([BAKE, "build", *args, "--output", str(out)], stdout=subprocess.PIPE, stderr=stderr,
                             text=True, env=env, start_new_session=True)
        started.append(p)
        return p

    waiter_err = tmp_path / "waiter.stderr"
    try:
        many = start(str(a), str(b), "-j", "2", "--json")
        wait_for(lambda: list(out.glob("shared-base-a/*/build.json")) or many.poll() is not None, 600,
                 "the bake of shared-base-a to start")
        busy = subprocess.run([BAKE, "build", str(a), "--no-wait", "--output", str(out)], capture_output=True,
                              text=True, env=env, timeout=120)
        with open(waiter_err, "w") as f:
            waiter = start(str(a), "--stop-after", "bootstrap", stderr=f)
        stdout, stderr = many.communicate(timeout=3000)
        waiter_out, _ = waiter.communicate(timeout=900)
    finally:
        for p in started:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        stale.clean_stale()

    # the second bake of a recipe being built: busy at once, naming the holder
    assert busy.returncode == exitcodes.BUSY, busy.stderr
    assert "recipe shared-base-a is in use by pid" in busy.stderr and busy.stdout == ""

    assert many.returncode == exitcodes.OK, stderr
    # stdout is events only, each valid against the schema, the summary last
    events = parse(stdout)
    summary = events[-1]
    assert summary["event"] == "summary" and summary["exit_status"] == exitcodes.OK
    assert {x["recipe"]: x["result"] for x in summary["recipes"]} == {"shared-base-a": "ok", "shared-base-b": "ok"}
    builds = {x["recipe"]: Path(x["dir"]) for x in summary["recipes"]}
    for name, d in builds.items():
        mine = [e for e in events if e["recipe"] == name]
        assert {e["build_id"] for e in mine} == {d.name}
        stages = [(e["stage"], e["status"]) for e in mine if e["event"] == "stage"]
        for stage in ("bootstrap", "customize", "image", "verify"):
            assert stages.index((stage, "started")) < stages.index((stage, "finished")), stages
        assert ("publish", "skipped") in stages, stages
        checks = {e["check"]: e["result"] for e in mine if e["event"] == "check"}
        assert checks and set(checks.values()) == {"passed"}, checks
        assert {"boots", "metadata", "acpiphp", "volume-hotplug"} <= set(checks), checks
        assert "sync-agent" not in checks and "hygiene" not in checks, checks
        [result] = [e for e in mine if e["event"] == "result"]
        assert (result["result"], result["exit_status"], result["dir"]) == ("ok", 0, str(d))
        assert mine[-1] is result
    # progress counted from what debootstrap and apt printed, in whichever bake ran them
    def final(stage: str) -> list[dict]:
        return [e for e in events if e["event"] == "progress" and e["stage"] == stage
                and e["step"] == "packages installed" and e["done"] == e["total"]]
    for stage in ("bootstrap", "customize"):
        finals = final(stage)
        assert finals and len({e["recipe"] for e in finals}) == 1, "one bake made the base and the packages"
        last = finals[-1]
        assert last["unit"] == "packages" and last["total"] > 10, last
        counts = [e["done"] for e in events if e["event"] == "progress" and e["stage"] == stage
                  and e["step"] == "packages installed" and e["recipe"] == last["recipe"]]
        assert counts == sorted(counts) and len(counts) > 1, counts
    apt_log = [d / "packages.log" for d in builds.values() if (d / "packages.log").exists()]
    [log] = [p for p in apt_log if "Setting up" in p.read_text()]
    assert final("customize")[-1]["total"] == log.read_text().count("\nSetting up ")
    assert any(line.startswith("shared-base-a | ") for line in stderr.splitlines())
    assert any(line.startswith("shared-base-b | ") for line in stderr.splitlines())

    records = {n: json.loads((d / "build.json").read_text()) for n, d in builds.items()}
    for name, rec in records.items():
        assert rec["result"] == "ok" and rec["recipe"]["name"] == name
        assert rec["stages"]["verify"]["result"] == "passed", rec["stages"]["verify"]
        assert json.loads((builds[name] / "verify.json").read_text())["result"] == "passed"
        # the build and what it made are the owner's alone (no BAKE_GROUP here)
        assert builds[name].stat().st_mode & 0o7777 == 0o700
        for role in ("image", "kernel", "ramdisk"):
            made = builds[name] / rec["outputs"][role]["path"]
            assert made.stat().st_mode & 0o7777 == 0o600, (role, oct(made.stat().st_mode))
    made = [rec["stages"]["bootstrap"]["cached"] is False for rec in records.values()]
    assert made.count(True) == 1, "one debootstrap between the two recipes"
    (a0, a1), (b0, b1) = _interval(records["shared-base-a"]), _interval(records["shared-base-b"])
    assert a0 < b1 and b0 < a1, "the two bakes ran at the same time"

    # the bake that waited for shared-base-a went on once it was free, on the cached base
    assert waiter.returncode == exitcodes.OK, waiter_err.read_text()
    assert "waiting for recipe shared-base-a" in waiter_err.read_text()
    third = json.loads((Path(waiter_out.strip().splitlines()[-1]) / "build.json").read_text())
    assert third["stages"]["bootstrap"]["cached"] is True

    assert sh.mounts_under(out) == []
    qemu = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_mentions(pid, str(out))]
    assert qemu == [], "no process of the bakes is left"


def _cmdline_mentions(pid: str, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.bakes
@pytest.mark.e2e
@pytest.mark.alone
def test_sigterm_to_a_j2_bake_ends_every_bake_with_everything_undone(demo_build, tmp_path):
    from test_build_failures import TEST_ELEMENTS, assert_nothing_left, demo_plus

    paths = [demo_plus("sleeps-in-install", name, tmp_path) for name in ("sleepy-a", "sleepy-b")]
    out = tmp_path / "out"
    env = dict(os.environ, BAKE_ELEMENTS_PATH=str(TEST_ELEMENTS))
    p = subprocess.Popen([BAKE, "build", *map(str, paths), "-j", "2", "--stop-after", "image", "--output", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        markers = lambda: list(out.glob("sleepy-*/*/work/rootfs/var/tmp/bake-test-sleeping"))  # noqa: E731
        wait_for(lambda: len(markers()) == 2 or p.poll() is not None, 900, "both bakes to reach the sleeping hook")
        assert p.poll() is None, p.communicate()[1]
        builds = [m.parents[4] for m in markers()]
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        stale.clean_stale()
    assert p.returncode == exitcodes.INTERRUPTED, stderr
    for name in ("sleepy-a", "sleepy-b"):
        assert f"{name} | bake: interrupted; everything mounted or started was undone" in stderr, stderr
    for b in builds:
        assert_nothing_left(b)
        assert json.loads((b / "build.json").read_text())["result"] == "failed"
    leftover = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_mentions(pid, str(out))]
    assert leftover == []
