"""`bake gc --keep N`: builds beyond the N newest go, with their folders, the cache
entries no kept build uses and, with --cloud, their images and bundles on the stand-in
cloud; released builds, held builds, builds being baked and images an instance runs stay,
each with its reason; --dry-run changes nothing."""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import time
from pathlib import Path

import pytest

from builder.operations import gc
from builder.core.record import Build
from builder.core.cache import TreeCache
from builder.cli.main import main as bake_main
from builder.cloud.clients import make_clients
from builder.cloud.credentials import load_credentials
from builder.core.locks import recipe_lock
from eucalyptus_standin.fixtures import euca3, euca4, euca_cloud  # noqa: F401
from eucalyptus_standin.trio import ROLES, bundle_build

IDS = ("20261201-080000", "20261202-080000", "20261203-080000", "20261204-080000")


@pytest.fixture
def isolated(tmp_path, monkeypatch, clean_env):
    """A cache and a state folder (build and recipe locks, journals) of the test's own:
    gc must never see the suite's shared cache or the locks of bakes running beside it."""
    monkeypatch.setenv("BAKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BAKE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def make_build(output: Path, recipe: str, build_id: str, keys: tuple[str, str] | None = None,
               result: str = "ok") -> Build:
    """A finished build with a small kernel, ramdisk and image, as a bake records them
    (the cache entries it used among them)."""
    build = Build.create(output, recipe, build_id)
    assert build.id == build_id
    build.data.update({"recipe": {"name": recipe}, "arch": "x86_64", "result": result})
    for role, _, name, size in ROLES:
        p = build.dir / name
        p.write_bytes(os.urandom(size))
        build.record_output(role, p)
    if keys:
        build.record_stage("bootstrap", cached=True, key=keys[0])
        build.record_stage("customize", cached_packages=True, checkpoint_key=keys[1])
    if result == "failed":
        build.data["failed_stage"] = "customize"
    build.save()
    return build


def gc_cmd(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    status = bake_main(["gc", *argv])
    out, err = capsys.readouterr()
    return status, out + err


def lines_of(out: str, name: str) -> str:
    found = [line for line in out.splitlines() if line.startswith(name)]
    assert len(found) == 1, out
    return found[0]


# --- the cloud ------------------------------------------------------------------------

@pytest.fixture
def published(euca_cloud, isolated, capsys):
    """Four builds of one recipe published to the stand-in with `bake publish`: the
    oldest released, the second one's EMI run by an instance, the newest the one to keep.
    The third is the one nothing protects."""
    recipe = "gc-" + secrets.token_hex(4)
    bucket = "gc-" + secrets.token_hex(5)
    output = isolated / "output"
    builds = []
    for build_id in IDS:
        b = make_build(output, recipe, build_id)
        bundle_build(b, euca_cloud)
        capsys.readouterr()
        assert bake_main(["publish", str(b.dir), "--eucarc", str(euca_cloud.eucarc), "--bucket", bucket]) == 0
        builds.append(Build.load(b.dir))
    released, used = builds[0], builds[1]
    released.set("released", {"at": "2026-12-05T10:00:00+00:00", "by": "test"})
    creds = load_credentials({"eucarc": str(euca_cloud.eucarc)})
    clients = make_clients(creds)
    run = clients.ec2.run_instances(ImageId=used.data["cloud"]["image_id"], MinCount=1, MaxCount=1,
                                    InstanceType="m1.small")
    instance = run["Instances"][0]["InstanceId"]
    return {"recipe": recipe, "bucket": bucket, "output": output, "builds": builds, "clients": clients,
            "cloud": euca_cloud, "instance": instance}


def cloud_state(p) -> tuple[set[str], set[str]]:
    """The image ids of this account and the object keys of the test's bucket."""
    images = {im["ImageId"] for im in p["clients"].ec2.describe_images(Owners=["self"])["Images"]}
    objects = {o["Key"] for o in p["clients"].s3.list_objects(Bucket=p["bucket"]).get("Contents", [])}
    return images, objects


def ids_of(build: Build) -> set[str]:
    c = build.data["cloud"]
    return {c["image_id"], c["kernel_id"], c["ramdisk_id"]}


def objects_of(build: Build) -> set[str]:
    return {k for im in build.data["cloud"]["images"].values() for k in im["objects"]}


def folders(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
def test_cloud_gc_removes_exactly_the_build_nothing_protects_and_dry_run_changes_nothing(published, capsys):
    p = published
    old_released, in_use, other, newest = p["builds"]
    eucarc = str(p["cloud"].eucarc)
    images_before, objects_before = cloud_state(p)
    assert all(ids_of(b) <= images_before and objects_of(b) <= objects_before for b in p["builds"])
    files_before = folders(p["output"])

    status, out = gc_cmd(capsys, "--keep", "1", "--cloud", "--dry-run", "--eucarc", eucarc,
                         "--output", str(p["output"]), p["recipe"])
    assert status == 0
    assert cloud_state(p) == (images_before, objects_before)
    assert folders(p["output"]) == files_before
    name = lambda b: f"{p['recipe']}/{b.id}"  # noqa: E731
    assert "kept: one of the 1 newest" in lines_of(out, name(newest))
    assert "kept: released (its build.json says so)" in lines_of(out, name(old_released))
    line = lines_of(out, name(in_use))
    assert "kept: its EMI " + in_use.data["cloud"]["image_id"] + " is used by " + p["instance"] in line
    line = lines_of(out, name(other))
    assert "would go: beyond the 1 newest" in line
    assert other.data["cloud"]["image_id"] in line and f"in {p['bucket']}" in line

    # without --cloud only folders go, and what stays on the cloud is said
    status, out = gc_cmd(capsys, "--keep", "1", "--dry-run", "--output", str(p["output"]), p["recipe"])
    assert "stay on the cloud: `bake gc --cloud` finds them there" in lines_of(out, name(other))

    status, out = gc_cmd(capsys, "--keep", "1", "--cloud", "--eucarc", eucarc, "--output", str(p["output"]),
                         p["recipe"])
    assert status == 0, out
    assert "removed: beyond the 1 newest" in lines_of(out, name(other))
    images, objects = cloud_state(p)
    assert images == images_before - ids_of(other)
    assert objects == objects_before - objects_of(other)
    assert not other.dir.exists()
    assert all(b.dir.is_dir() for b in (old_released, in_use, newest))


@pytest.mark.slow
def test_cloud_gc_finds_the_builds_from_the_clouds_listing_with_a_fresh_output(published, capsys):
    """A second build box, or a wiped output/: nothing local says what was published or
    released, and gc still removes exactly the unprotected build. The released build is
    known by the marker `bake release` puts beside its bundles."""
    p = published
    old_released, in_use, other, newest = p["builds"]
    prefix = old_released.data["cloud"]["prefix"]
    p["clients"].s3.put_object(Bucket=p["bucket"], Key=f"{prefix}/{gc.RELEASE_MARKER}",
                               Body=json.dumps({"released": "2026-12-05T10:00:00+00:00"}).encode())
    fresh = p["output"].parent / "fresh-output"
    eucarc = str(p["cloud"].eucarc)
    images_before, objects_before = cloud_state(p)

    status, out = gc_cmd(capsys, "--keep", "1", "--cloud", "--dry-run", "--eucarc", eucarc, "--output", str(fresh),
                         p["recipe"])
    assert status == 0
    assert cloud_state(p) == (images_before, objects_before)
    name = lambda b: f"{p['recipe']}/{b.id}"  # noqa: E731
    marker = f"released (the release marker {gc.RELEASE_MARKER} is beside its bundles)"
    assert marker in lines_of(out, name(old_released))
    assert "is used by " + p["instance"] in lines_of(out, name(in_use))
    assert "kept: one of the 1 newest" in lines_of(out, name(newest))
    assert "would go: beyond the 1 newest" in lines_of(out, name(other))

    status, out = gc_cmd(capsys, "--keep", "1", "--cloud", "--eucarc", eucarc, "--output", str(fresh), p["recipe"])
    assert status == 0, out
    images, objects = cloud_state(p)
    assert images == images_before - ids_of(other)
    assert objects == objects_before - objects_of(other)
    assert not fresh.exists() or not any(fresh.iterdir())


@pytest.mark.slow
def test_a_public_image_is_kept_though_nothing_else_protects_it(published, capsys):
    from builder.cloud.images import grant_public_launch

    p = published
    other = p["builds"][2]
    emi = other.data["cloud"]["image_id"]
    grant_public_launch(p["clients"], emi, load_credentials({"eucarc": str(p["cloud"].eucarc)}))
    before = cloud_state(p)
    status, out = gc_cmd(capsys, "--keep", "1", "--cloud", "--eucarc", str(p["cloud"].eucarc),
                         "--output", str(p["output"]), p["recipe"])
    assert status == 0, out
    assert f"kept: public (anyone may launch {emi})" in lines_of(out, f"{p['recipe']}/{other.id}")
    assert cloud_state(p) == before
    assert all(b.dir.is_dir() for b in p["builds"])


@pytest.mark.slow
def test_an_instance_that_ends_frees_its_image_for_the_next_gc(published, capsys):
    p = published
    old_released, in_use, other, newest = p["builds"]
    p["clients"].ec2.terminate_instances(InstanceIds=[p["instance"]])
    eucarc = str(p["cloud"].eucarc)
    images_before, _ = cloud_state(p)
    deadline = _dt.datetime.now() + _dt.timedelta(seconds=30)
    while True:     # the stand-in says shutting-down for a moment, as the cloud does
        status, out = gc_cmd(capsys, "--keep", "1", "--cloud", "--dry-run", "--json", "--eucarc", eucarc,
                             "--output", str(p["output"]), p["recipe"])
        plan = json.loads(out[out.index("{"):])
        going = {v["build_id"] for v in plan["builds"] if v["goes"]}
        if going == {in_use.id, other.id} or _dt.datetime.now() > deadline:
            break
        time.sleep(0.5)
    assert going == {in_use.id, other.id}
    status, out = gc_cmd(capsys, "--keep", "1", "--cloud", "--eucarc", eucarc, "--output", str(p["output"]),
                         p["recipe"])
    assert status == 0, out
    images, _ = cloud_state(p)
    assert images == images_before - ids_of(in_use) - ids_of(other)
    assert old_released.dir.is_dir() and newest.dir.is_dir()


# --- the output root and the cache ----------------------------------------------------------

def cache_entry(root: Path, namespace: str) -> str:
    key = secrets.token_hex(16)
    tree = root.parent / f"tree-{key}"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("gc\n")
    TreeCache(root, namespace).save(key, tree, {"created": "2026-12-01 00:00:00"})
    return key


def test_local_gc_removes_folders_beyond_n_and_cache_entries_no_kept_build_uses(isolated, capsys):
    output, cache = isolated / "output", isolated / "cache"
    old = (cache_entry(cache, "bootstrap"), cache_entry(cache, "packages"))
    new = (cache_entry(cache, "bootstrap"), cache_entry(cache, "packages"))
    orphan = cache_entry(cache, "packages")
    being_made = cache_entry(cache, "bootstrap")
    b1 = make_build(output, "demo", IDS[0], old)
    b2 = make_build(output, "demo", IDS[1], new, result="failed")
    b3 = make_build(output, "demo", IDS[2], new)
    b4 = make_build(output, "demo", IDS[3], new)
    other = make_build(output, "other", IDS[0], old)

    with b3.lock(), TreeCache(cache, "bootstrap").lock(being_made):
        before = folders(output), folders(cache)
        status, out = gc_cmd(capsys, "--keep", "1", "--dry-run", "--output", str(output), "demo")
        assert status == 0
        assert (folders(output), folders(cache)) == before
        assert "kept: one of the 1 newest" in lines_of(out, f"demo/{b4.id}")
        assert "kept: in use: held by pid" in lines_of(out, f"demo/{b3.id}")
        assert "would go: failed at customize, beyond the 1 newest" in lines_of(out, f"demo/{b2.id}")
        assert "would go: beyond the 1 newest" in lines_of(out, f"demo/{b1.id}")
        assert "kept: used by other/" in lines_of(out, f"cache bootstrap/{old[0]}")
        assert "kept: being made: held by pid" in lines_of(out, f"cache bootstrap/{being_made}")
        assert "would go: no kept build uses it" in lines_of(out, f"cache packages/{orphan}")
        assert not any(line.startswith("other/") for line in out.splitlines())

        status, out = gc_cmd(capsys, "--keep", "1", "--output", str(output))
        assert status == 0, out
    assert not b1.dir.exists() and not b2.dir.exists()
    assert b3.dir.is_dir() and b4.dir.is_dir() and other.dir.is_dir()
    left = {(ns, k) for ns in gc.NAMESPACES for k in TreeCache(cache, ns).keys()}
    # `other` is the one build of its recipe: it stays, and so do the entries it uses
    assert left == {("bootstrap", old[0]), ("packages", old[1]), ("bootstrap", new[0]), ("packages", new[1]),
                    ("bootstrap", being_made)}


def test_nothing_of_a_recipe_being_baked_goes_nor_any_cache_entry(isolated, capsys):
    output, cache = isolated / "output", isolated / "cache"
    orphan = cache_entry(cache, "packages")
    builds = [make_build(output, "busy", build_id) for build_id in IDS]
    with recipe_lock("busy"):
        status, out = gc_cmd(capsys, "--keep", "1", "--output", str(output))
    assert status == 0
    assert all(b.dir.is_dir() for b in builds)
    assert TreeCache(cache, "packages").has(orphan)
    assert "recipe busy is being baked now (held by pid" in lines_of(out, f"busy/{IDS[0]}")
    assert "kept: a bake is under way and may need it: busy" in lines_of(out, f"cache packages/{orphan}")


def test_a_build_taken_between_the_plan_and_its_removal_stays_with_its_cache_entries(isolated):
    output, cache = isolated / "output", isolated / "cache"
    old = (cache_entry(cache, "bootstrap"), cache_entry(cache, "packages"))
    b1 = make_build(output, "late", IDS[0], old)
    b2 = make_build(output, "late", IDS[1])
    survey = gc.survey_local(output)
    plan = gc.plan_gc(survey, 1)
    assert [v.goes for v in plan.builds] == [False, True] and all(c.goes for c in plan.cache)
    with b1.lock():     # a verification, say, starts on it now
        gc.execute(plan, survey)
    assert b1.dir.is_dir() and b2.dir.is_dir()
    assert plan.builds[1].outcome.startswith(f"skipped: build {b1.dir} is in use by pid {os.getpid()}")
    assert [c.outcome for c in plan.cache] == [f"skipped: late/{b1.id} stays, and uses it"] * 2
    assert TreeCache(cache, "bootstrap").has(old[0]) and TreeCache(cache, "packages").has(old[1])


def test_with_no_build_under_the_output_root_the_cache_is_left_alone(isolated, capsys):
    """An empty output root says more likely a wrong --output, or a cache other output
    roots share, than a cache nobody needs."""
    output, cache = isolated / "output", isolated / "cache"
    entry = cache_entry(cache, "bootstrap")
    status, out = gc_cmd(capsys, "--keep", "1", "--output", str(output))
    assert status == 0
    assert TreeCache(cache, "bootstrap").has(entry)
    assert f"kept: there is no build under {output}" in lines_of(out, f"cache bootstrap/{entry}")


def test_older_than_keeps_young_builds_and_bad_arguments_are_usage_errors(isolated, capsys):
    output = isolated / "output"
    now = _dt.datetime.now(_dt.timezone.utc)
    ids = [(now - _dt.timedelta(days=d)).strftime("%Y%m%d-%H%M%S") for d in (30, 10, 3, 0)]
    builds = [make_build(output, "aged", build_id) for build_id in ids]
    status, out = gc_cmd(capsys, "--keep", "1", "--older-than", "7d", "--dry-run", "--json", "--output", str(output))
    plan = json.loads(out)
    verdicts = {v["build_id"]: v for v in plan["builds"]}
    assert verdicts[ids[3]]["reasons"] == ["one of the 1 newest", "younger than 1 week"]
    assert verdicts[ids[2]]["reasons"] == ["younger than 1 week"]
    assert verdicts[ids[1]]["goes"] and verdicts[ids[0]]["goes"]
    status, out = gc_cmd(capsys, "--keep", "1", "--older-than", "100w", "--dry-run", "--json", "--output", str(output))
    assert not any(v["goes"] for v in json.loads(out)["builds"])
    assert all(b.dir.is_dir() for b in builds)
    for argv in (["--keep", "0"], ["--keep", "x"], ["--keep", "1", "--older-than", "3 fortnights"]):
        with pytest.raises(SystemExit) as e:
            bake_main(["gc", *argv, "--output", str(output)])
        assert e.value.code == 2


# --- the plan, from facts alone --------------------------------------------------------------

def image(image_id: str, kind: str, location: str, **kw) -> gc.CloudImage:
    return gc.CloudImage(image_id, kind, location, **kw)


def facts(build_id: str, *images: gc.CloudImage, objects: list[str] = ()) -> gc.BuildFacts:
    return gc.BuildFacts("r", build_id, images=list(images), objects={"b": list(objects)} if objects else {})


def test_a_kernel_another_image_still_names_stays_with_its_bundle_and_a_public_image_is_kept():
    shared_kernel = image("eki-1", "kernel", f"b/r/{IDS[0]}/vmlinuz.manifest.xml")
    old = facts(IDS[0], image("emi-1", "machine", f"b/r/{IDS[0]}/img.manifest.xml", kernel_id="eki-1"),
                shared_kernel, image("eri-1", "ramdisk", f"b/r/{IDS[0]}/initrd.manifest.xml"),
                objects=[f"r/{IDS[0]}/{n}" for n in ("img.part.00", "img.part.01", "img.manifest.xml",
                                                      "vmlinuz.part.00", "vmlinuz.manifest.xml",
                                                      "initrd.part.00", "initrd.manifest.xml", "notes.txt")])
    public = facts(IDS[1], image("emi-2", "machine", f"b/r/{IDS[1]}/img.manifest.xml", public=True))
    newest = facts(IDS[2], image("emi-3", "machine", f"b/r/{IDS[2]}/img.manifest.xml", kernel_id="eki-1"))
    survey = gc.Survey(Path("out"), Path("cache"), [old, public, newest], [], {}, cloud=True)
    plan = gc.plan_gc(survey, 1)
    v = {x.build_id: x for x in plan.builds}
    assert v[IDS[2]].reasons == ["one of the 1 newest"]
    assert v[IDS[1]].reasons == ["public (anyone may launch emi-2)"]
    assert v[IDS[0]].goes
    assert v[IDS[0]].deregister == ["emi-1", "eri-1"] and v[IDS[0]].keep_images == ["eki-1"]
    gone = ("img.part.00", "img.part.01", "img.manifest.xml", "initrd.part.00", "initrd.manifest.xml")
    assert v[IDS[0]].delete == {"b": sorted(f"r/{IDS[0]}/{n}" for n in gone)}


def test_a_failed_build_does_not_count_towards_n_but_the_latest_failure_is_kept_to_be_looked_into():
    builds = [gc.BuildFacts("r", IDS[0], state="verified"), gc.BuildFacts("r", IDS[1], state="failed",
                                                                          failed_stage="image"),
              gc.BuildFacts("r", IDS[2], state="baked"), gc.BuildFacts("r", IDS[3], state="killed")]
    plan = gc.plan_gc(gc.Survey(Path("out"), Path("cache"), builds, [], {}), 1)
    v = {x.build_id: x for x in plan.builds}
    assert [v[i].goes for i in IDS] == [True, True, False, False]
    assert v[IDS[2]].reasons == ["one of the 1 newest"]
    assert v[IDS[3]].reasons == ["killed, among the 1 newest: kept to be looked into"]
    assert v[IDS[1]].reasons == ["failed at image, beyond the 1 newest"]
    assert v[IDS[0]].reasons == ["beyond the 1 newest"]


def test_a_base_images_tree_is_kept_while_a_kept_build_names_it_and_goes_after(isolated, capsys):
    """An evolved image's first stage records its key in the `base` namespace: gc reads
    the namespace from the record, keeps the tree while a kept build uses it, removes it
    when none does."""
    output, cache = isolated / "output", isolated / "cache"
    used, unused = cache_entry(cache, "base"), cache_entry(cache, "base")
    packages = cache_entry(cache, "packages")
    b1 = make_build(output, "evolved", IDS[0], (unused, packages))
    b2 = make_build(output, "evolved", IDS[1], (used, packages))
    for b, key in ((b1, unused), (b2, used)):
        b.record_stage("bootstrap", cached=False, key=key, namespace="base")
    status, out = gc_cmd(capsys, "--keep", "1", "--output", str(output))
    assert status == 0, out
    assert not b1.dir.exists() and b2.dir.is_dir()
    assert TreeCache(cache, "base").keys() == [used]
    assert TreeCache(cache, "packages").keys() == [packages]
