"""`bake ls` and `bake show`: every build under an output root with its state (building,
killed, failed at a stage, baked, published, verified, released), sizes, cloud ids and
verification; one build's record, readable or as JSON. The builds are real build
directories made as the pipeline makes them (Build.create, record_output, the bundle
stage's own function, the verification's own report), and the installed `bake` reads
them in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builder.core import locks
from builder.core.record import Build
from builder.bundle.build import bundle_and_record
from builder.verify import _record as record_verification
from builder.verify.report import Report
from builder.verify.result import FAIL, PASS, SKIP, CheckResult
from conftest import BAKE

SIZES = {"kernel": 1_000_003, "ramdisk": 2_000_005, "image": 3 * 2**20}
CLOUD = {"image_id": "emi-0badcafe", "kernel_id": "eki-0000beef", "ramdisk_id": "eri-00c0ffee",
         "bucket": "bake-images-000000000000", "prefix": "demo/20261203-120000",
         "published": "2026-12-03T12:10:00+00:00"}
LS_KEYS = {"recipe", "build_id", "dir", "state", "failed_stage", "created", "sizes", "cloud", "verify", "released"}


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path, monkeypatch):
    """Build locks in a folder of this test's own; the `bake` it runs inherits it."""
    monkeypatch.setenv("BAKE_STATE_DIR", str(tmp_path / "state"))


def bake(*args) -> subprocess.CompletedProcess:
    return subprocess.run([BAKE, *map(str, args)], capture_output=True, text=True, timeout=120)


def make_build(out: Path, recipe: str, build_id: str, *, created: str | None = None, result: str | None = "ok",
               outputs: bool = True, **sections) -> Build:
    """A build directory as the pipeline leaves it: its record, and with `outputs` real
    kernel, ramdisk and image files recorded with their sizes and sha256."""
    b = Build.create(out, recipe, build_id)
    b.data["recipe"] = {"name": recipe, "path": f"recipes/{recipe}.yml"}
    b.data.update(release="debian/bookworm", arch="amd64")
    if created:
        b.data["created"] = created
    if result is not None:
        b.data["result"] = result
    b.data.update(sections)
    b.save()
    if outputs:
        for role, size in SIZES.items():
            path = b.dir / role
            path.write_bytes(os.urandom(size))
            b.record_output(role, path)
        for stage in ("bootstrap", "customize", "image"):
            b.record_stage(stage, seconds=1.5, **({"cached": True} if stage == "bootstrap" else {}))
    return b


def verified(b: Build, *, ok: bool = True) -> None:
    """Record a local verification of `b` through the verification's own recorder."""
    report = Report("local", results=[CheckResult("boots", PASS, 19.2, "ready in 19.2 s"),
                                      CheckResult("sync-agent", PASS if ok else FAIL, 80.0,
                                                  "restored on a fresh instance" if ok else "no restore"),
                                      CheckResult("recipe:motd", SKIP, 0.0, "not asked for")])
    report.seconds = 101.0
    record_verification(b, report)


def ls_json(out: Path, *args) -> dict[str, dict]:
    r = bake("ls", "--output", out, "--json", *args)
    assert r.returncode == 0, r.stderr
    return {f"{e['recipe']}/{e['build_id']}": e for e in json.loads(r.stdout)}


@pytest.fixture
def every_state(tmp_path):
    """One build in every state but `building` (which needs a lock held while asked),
    by recipe/id."""
    out = tmp_path / "output"
    builds = {}
    builds["baked"] = make_build(out, "demo", "20261203-120000")
    b = make_build(out, "demo", "20261203-120100")
    bundle_and_record(b, None)
    b.set("cloud", dict(CLOUD))
    builds["published"] = b
    b = make_build(out, "demo", "20261203-120200")
    bundle_and_record(b, None)
    b.set("cloud", dict(CLOUD, image_id="emi-11111111"))
    verified(b)
    builds["verified"] = b
    b = make_build(out, "demo", "20261203-120300", released={"channel": "stable", "by": "release-job"})
    verified(b)
    builds["released"] = b
    builds["failed recorded"] = make_build(out, "demo", "20261203-120400", result="failed",
                                           failed_stage="publish", error="publishing failed: 403")
    b = make_build(out, "demo", "20261203-120500")
    verified(b, ok=False)  # the verification's recorder marks the build failed
    builds["failed verify"] = b
    b = make_build(out, "demo", "20261203-120600", result="failed", outputs=False, error="apt-get failed")
    b.record_stage("bootstrap", seconds=3.0, cached=True)
    builds["failed derived"] = b
    b = make_build(out, "demo", "20261203-120700", result="failed", stages_run=[], error="could not run")
    b.record_stage("bundle", seconds=0.1, local=True)
    b.record_stage("publish", skipped="no cloud configured")
    b.record_stage("verify", error="QEMU would not start")
    builds["failed stage error"] = b
    builds["killed"] = make_build(out, "demo", "20261203-120800", result="running", outputs=False)
    builds["killed, no result"] = make_build(out, "other", "20261203-120900", result=None, outputs=False)
    return out, builds


# --- states -------------------------------------------------------------------------------

def test_ls_says_the_state_of_every_build(every_state):
    out, builds = every_state
    listed = ls_json(out)
    got = {name: (listed[f"{b.dir.parent.name}/{b.id}"]["state"], listed[f"{b.dir.parent.name}/{b.id}"]["failed_stage"])
           for name, b in builds.items()}
    assert got == {
        "baked": ("baked", None),
        "published": ("published", None),
        "verified": ("verified", None),
        "released": ("released", None),
        "failed recorded": ("failed", "publish"),
        "failed verify": ("failed", "verify"),
        "failed derived": ("failed", "customize"),
        "failed stage error": ("failed", "verify"),
        "killed": ("killed", None),
        "killed, no result": ("killed", None),
    }


def test_a_running_build_is_building_while_its_lock_is_held_and_killed_once_it_is_not(tmp_path):
    out = tmp_path / "output"
    b = make_build(out, "demo", "20261203-130000", result="running", outputs=False)
    with locks.held(b.lock_path, f"build {b.dir}"):
        r = bake("ls", "--output", out)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[1].split()[:3] == ["demo", "20261203-130000", "building"]
        shown = bake("show", "--output", out, "demo/20261203-130000")
        assert f"building: held by pid {os.getpid()}" in shown.stdout
    r = bake("ls", "--output", out)
    assert r.stdout.splitlines()[1].split()[:3] == ["demo", "20261203-130000", "killed"]
    shown = bake("show", "--output", out, "demo/20261203-130000")
    assert "killed: build.json says it is running but no bake holds it" in shown.stdout


def test_a_finished_build_is_not_building_even_while_a_command_holds_it(tmp_path):
    out = tmp_path / "output"
    b = make_build(out, "demo", "20261203-130000")
    with locks.held(b.lock_path, f"build {b.dir}"):
        assert ls_json(out)["demo/20261203-130000"]["state"] == "baked"


# --- the table and the JSON -------------------------------------------------------------------

def test_ls_table_has_its_columns_sizes_in_mib_and_failed_stages(every_state):
    out, builds = every_state
    r = bake("ls", "--output", out)
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["RECIPE", "BUILD", "STATE", "CREATED", "IMAGE", "EMI", "VERIFY"]
    row = {line.split()[1]: line for line in lines[1:]}
    assert "3.0 MiB" in row["20261203-120000"] and "emi-" not in row["20261203-120000"]
    assert "failed at customize" in row["20261203-120600"]
    assert "failed at publish" in row["20261203-120400"]
    assert "emi-0badcafe" in row["20261203-120100"] and "published" in row["20261203-120100"]
    assert row["20261203-120200"].rstrip().endswith("passed (local)")
    assert row["20261203-120500"].rstrip().endswith("failed (local)")
    created = builds["baked"].data["created"]
    assert created[:10] + " " + created[11:19] in row["20261203-120000"]


def test_ls_json_has_stable_keys_sizes_in_bytes_and_cloud_ids(every_state):
    out, builds = every_state
    listed = ls_json(out)
    assert all(set(e) == LS_KEYS for e in listed.values())
    assert all(set(e["sizes"]) == {"image", "kernel", "ramdisk", "bundle"} for e in listed.values())
    assert all(set(e["cloud"]) == {"emi", "eki", "eri"} and set(e["verify"]) == {"result", "mode"}
               for e in listed.values())
    published = listed["demo/20261203-120100"]
    b = builds["published"]
    assert published["dir"] == str(b.dir)
    assert {k: published["sizes"][k] for k in SIZES} == {k: (b.dir / k).stat().st_size for k in SIZES}
    parts = sum(p.stat().st_size for p in (b.dir / "bundle").glob("*/*.part.*"))
    assert parts > 0 and published["sizes"]["bundle"] == parts
    assert published["cloud"] == {"emi": "emi-0badcafe", "eki": "eki-0000beef", "eri": "eri-00c0ffee"}
    assert published["verify"] == {"result": None, "mode": None}
    assert listed["demo/20261203-120200"]["verify"] == {"result": "passed", "mode": "local"}
    assert listed["demo/20261203-120300"]["released"] == {"channel": "stable", "by": "release-job"}
    killed = listed["demo/20261203-120800"]
    assert killed["sizes"] == {"image": None, "kernel": None, "ramdisk": None, "bundle": None}
    assert killed["created"] == builds["killed"].data["created"]


def test_ls_lists_recipes_in_order_and_each_recipe_oldest_first(tmp_path):
    out = tmp_path / "output"
    make_build(out, "zeta", "20261203-100000", outputs=False, created="2026-12-03T10:00:00+00:00")
    for _ in range(11):  # .2 to .11: two bakes that start in the same second get a suffix
        make_build(out, "alpha", "20261203-110000", outputs=False, created="2026-12-03T11:00:00+00:00")
    make_build(out, "alpha", "20261203-090000", outputs=False, created="2026-12-03T09:00:00+00:00")
    r = bake("ls", "--output", out)
    ids = [line.split()[:2] for line in r.stdout.splitlines()[1:]]
    assert ids == [["alpha", "20261203-090000"], ["alpha", "20261203-110000"],
                   *(["alpha", f"20261203-110000.{n}"] for n in range(2, 12)), ["zeta", "20261203-100000"]]


def test_ls_recipe_lists_only_that_recipe(every_state):
    out, builds = every_state
    assert set(ls_json(out, "other")) == {"other/20261203-120900"}
    assert len(ls_json(out, "demo")) == len(builds) - 1
    r = bake("ls", "nosuch", "--output", out)
    assert r.returncode == 0 and r.stdout.strip() == f"no builds of nosuch under {out}"


def test_ls_of_an_empty_or_missing_output_root_says_there_are_no_builds(tmp_path):
    empty = tmp_path / "empty"
    (empty / "demo" / "not-a-build").mkdir(parents=True)  # a folder without build.json is no build
    for root in (empty, tmp_path / "missing"):
        r = bake("ls", "--output", root)
        assert (r.returncode, r.stdout.strip(), r.stderr) == (0, f"no builds under {root}", "")
        r = bake("ls", "--output", root, "--json")
        assert (r.returncode, json.loads(r.stdout)) == (0, [])


def test_ls_reads_the_output_root_from_bake_output(tmp_path):
    out = tmp_path / "output"
    make_build(out, "demo", "20261203-120000", outputs=False)
    r = subprocess.run([BAKE, "ls", "--json"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "BAKE_OUTPUT": str(out)}, cwd=tmp_path / "output" / "demo")
    assert [e["build_id"] for e in json.loads(r.stdout)] == ["20261203-120000"]


# --- damaged records ----------------------------------------------------------------------------

def test_a_damaged_build_json_is_skipped_by_ls_with_one_warning_and_refused_by_show(tmp_path):
    out = tmp_path / "output"
    make_build(out, "demo", "20261203-120000", outputs=False)
    broken = out / "demo" / "20261203-120100"
    broken.mkdir()
    (broken / "build.json").write_text('{"build_id": "20261203-120100", "outputs": {')
    foreign = out / "demo" / "20261203-120200"
    foreign.mkdir()
    (foreign / "build.json").write_text("[]")
    r = bake("ls", "--output", out, "--json")
    assert r.returncode == 0
    assert [e["build_id"] for e in json.loads(r.stdout)] == ["20261203-120000"]
    warnings = r.stderr.splitlines()
    assert len(warnings) == 2 and "Traceback" not in r.stderr
    assert warnings[0].startswith(f"bake: warning: {broken / 'build.json'}: unreadable build record")
    assert warnings[1].startswith(f"bake: warning: {foreign / 'build.json'}: expected a build record")
    assert all(w.endswith("; skipped") for w in warnings)
    for spec in (broken, "demo/20261203-120100", "20261203-120100"):
        r = bake("show", "--output", out, spec)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith(f"bake: error: {broken / 'build.json'}: unreadable build record")
        assert "Traceback" not in r.stderr


def test_show_of_something_that_is_no_build_says_so(tmp_path):
    out = tmp_path / "output"
    make_build(out, "demo", "20261203-120000", outputs=False)
    r = bake("show", "--output", out, out / "demo")
    assert r.returncode == 1 and f"{out / 'demo'}: not a build directory (no build.json)" in r.stderr
    r = bake("show", "--output", out, "20991231-000000")
    assert r.returncode == 1
    assert r.stderr.startswith(f"bake: error: no build 20991231-000000: not a build directory, nor RECIPE/BUILD_ID")
    assert "Traceback" not in r.stderr


# --- show -------------------------------------------------------------------------------------

def test_show_finds_a_build_by_path_by_recipe_and_id_and_by_bare_id(every_state, tmp_path):
    out, builds = every_state
    b = builds["verified"]
    by_path = bake("show", b.dir)
    by_record = bake("show", b.dir / "build.json")
    by_name = bake("show", "--output", out, "demo/20261203-120200")
    by_id = bake("show", "--output", out, "20261203-120200")
    assert by_path.returncode == 0, by_path.stderr
    assert by_path.stdout == by_record.stdout == by_name.stdout == by_id.stdout
    assert by_path.stdout.splitlines()[0] == "demo/20261203-120200: verified"


def test_show_asks_for_the_recipe_when_a_bare_id_is_in_two(tmp_path):
    out = tmp_path / "output"
    make_build(out, "demo", "20261203-120000", outputs=False)
    make_build(out, "other", "20261203-120000", outputs=False)
    r = bake("show", "--output", out, "20261203-120000")
    assert r.returncode == 1
    assert "in more than one recipe" in r.stderr and "demo/20261203-120000, other/20261203-120000" in r.stderr
    assert bake("show", "--output", out, "other/20261203-120000").stdout.startswith("other/20261203-120000: baked")


def test_show_reads_as_sections(every_state):
    out, builds = every_state
    b = builds["verified"]
    b.set("notes", ["1 initramfs generation deferred to the end of customize"])
    text = bake("show", "--output", out, "demo/20261203-120200").stdout
    lines = text.splitlines()
    assert "  recipe    demo (recipes/demo.yml)" in lines
    assert "  release   debian/bookworm, amd64" in lines
    assert "  bootstrap  1.5 s, cached" in lines
    image = b.data["outputs"]["image"]
    assert f"  image      image  3.0 MiB ({SIZES['image']} bytes)  sha256 {image['sha256']}" in lines
    assert any(l.startswith("bundle (local") for l in lines)
    assert "  emi        emi-11111111" in lines and "  eki        eki-0000beef" in lines
    assert "verification: passed (local), 2 passed, 0 failed, 1 skipped in 101 s" in lines
    assert any(l.split()[:2] == ["sync-agent", "PASS"] and l.endswith("restored on a fresh instance") for l in lines)
    assert lines[lines.index("notes") + 1] == "  - 1 initramfs generation deferred to the end of customize"


def test_show_of_a_failed_build_names_the_stage_and_the_error(every_state):
    out, builds = every_state
    lines = bake("show", "--output", out, "demo/20261203-120600").stdout.splitlines()
    assert lines[0] == "demo/20261203-120600: failed at customize"
    assert "  error     apt-get failed" in lines
    assert lines[lines.index("stages") + 1:lines.index("stages") + 3] == [
        "  bootstrap  3.0 s, cached", "  customize  failed here"]
    lines = bake("show", "--output", out, "demo/20261203-120500").stdout.splitlines()
    assert lines[0] == "demo/20261203-120500: failed at verify"
    assert any(l.split()[:2] == ["sync-agent", "FAIL"] and l.endswith("no restore") for l in lines)


def test_show_json_is_the_record_with_its_state(every_state):
    out, builds = every_state
    b = builds["failed derived"]
    r = bake("show", "--output", out, "--json", "demo/20261203-120600")
    shown = json.loads(r.stdout)
    assert {k: v for k, v in shown.items() if k not in ("state", "failed_stage", "dir")} == \
        json.loads((b.dir / "build.json").read_text())
    assert (shown["state"], shown["failed_stage"], shown["dir"]) == ("failed", "customize", str(b.dir))
    shown = json.loads(bake("show", "--output", out, "--json", "20261203-120300").stdout)
    assert shown["state"] == "released" and shown["released"]["channel"] == "stable"


# --- the suite's real bake ---------------------------------------------------------------------

@pytest.mark.bakes
@pytest.mark.e2e
def test_ls_lists_the_real_demo_bake_with_its_image_size(demo_build):
    out = demo_build.dir.parent.parent
    entry = ls_json(out)[f"debian-demo/{demo_build.id}"]
    assert entry["state"] == "baked"        # baked up to the image stage, not published or verified
    assert entry["dir"] == str(demo_build.dir)
    for role in ("image", "kernel", "ramdisk"):
        assert entry["sizes"][role] == demo_build.output_path(role).stat().st_size
    assert entry["cloud"] == {"emi": None, "eki": None, "eri": None}
