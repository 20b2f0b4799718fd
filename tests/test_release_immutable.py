"""Releases are immutable: attacks on a released build through publish, gc --cloud and
gc --farm, against the Eucalyptus stand-in. What stays is judged by asking the cloud
with boto3 (images registered, object bytes), never by asking bake.

The builds are small fake build folders (a kernel, ramdisk and image of random bytes,
bundled with the project's own bundler, marked verified), published and released with
the real commands; nothing is baked or booted."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

import pytest

from builder.cli.main import main as bake_main
from builder.cloud.clients import make_clients
from builder.cloud.credentials import load_credentials
from builder.core.record import Build
from builder.farm.connect import Farm
from builder.farm.records import list_records
from builder.operations import gc
from eucalyptus_standin.fixtures import euca3, euca4, euca_cloud  # noqa: F401  (fixtures)
from eucalyptus_standin.trio import bundle_build
from farm_helpers import store_url
from test_gc import make_build

pytestmark = pytest.mark.slow


@pytest.fixture
def isolated(tmp_path, monkeypatch, clean_env):
    """A cache and state folder (locks, journals) of the test's own."""
    monkeypatch.setenv("BAKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BAKE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def bake(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    status = bake_main(list(argv))
    out, err = capsys.readouterr()
    return status, out + err


def verified_build(output: Path, recipe: str, build_id: str, cloud) -> Build:
    """A finished build bundled for `cloud`, whose verification passed: releasable."""
    b = make_build(output, recipe, build_id)
    bundle_build(b, cloud)
    b = Build.load(b.dir)
    checks = ("boots", "metadata", "acpiphp", "volume-hotplug", "hygiene", "sync-agent")
    b.set("verify", {"result": "passed", "mode": "local", "checks": dict.fromkeys(checks, "pass"),
                     "required": list(checks)})
    return b


def clients_of(cloud):
    return make_clients(load_credentials({"eucarc": str(cloud.eucarc)}))


def images(clients) -> dict[str, dict]:
    """This account's registered images, by id."""
    return {im["ImageId"]: im for im in clients.ec2.describe_images(Owners=["self"])["Images"]
            if im.get("State", "available") not in ("deregistered", "failed")}


def objects(clients, bucket: str) -> dict[str, bytes]:
    """Every object of `bucket`, key -> its bytes as the cloud returns them."""
    keys = [o["Key"] for page in clients.s3.get_paginator("list_objects").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: clients.s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def ids_of(build: Build) -> set[str]:
    c = Build.load(build.dir).data["cloud"]
    return {c["image_id"], c["kernel_id"], c["ramdisk_id"]}


def bundle_keys(build: Build) -> set[str]:
    return {k for im in Build.load(build.dir).data["cloud"]["images"].values() for k in im["objects"]}


def publish(capsys, build: Build, cloud, bucket: str, *extra: str) -> tuple[int, str]:
    return bake(capsys, "publish", str(build.dir), "--eucarc", str(cloud.eucarc), "--bucket", bucket, *extra)


def release(capsys, build: Build, cloud, *extra: str) -> tuple[int, str]:
    return bake(capsys, "release", str(build.dir), "--eucarc", str(cloud.eucarc),
                "--output", str(build.dir.parent.parent), *extra)


# --- publish ------------------------------------------------------------------------------

def test_a_second_build_under_the_same_prefix_leaves_the_released_one_registered_and_byte_identical(
        euca_cloud, isolated, capsys):  # noqa: F811
    cloud, clients = euca_cloud, clients_of(euca_cloud)
    recipe, bucket = "imm-" + secrets.token_hex(3), "imm-" + secrets.token_hex(5)
    output = isolated / "output"
    first = verified_build(output, recipe, "20261201-080000", cloud)
    status, out = publish(capsys, first, cloud, bucket, "--prefix", "stable")
    assert status == 0, out
    status, out = release(capsys, first, cloud)
    assert status == 0, out
    first_ids = ids_of(first)
    before = {k: v for k, v in objects(clients, bucket).items() if k in bundle_keys(first)}
    assert len(before) == len(bundle_keys(first)) and first_ids <= set(images(clients))
    # the prefix is a folder above the build's own names
    assert all(k.startswith(f"stable/{recipe}/{first.id}/") for k in before)

    second = verified_build(output, recipe, "20261202-080000", cloud)
    status, out = publish(capsys, second, cloud, bucket, "--prefix", "stable")
    assert status == 0, out

    now = images(clients)
    assert first_ids <= set(now), "the released build's EMI, EKI and ERI stay registered"
    first_emi = Build.load(first.dir).data["cloud"]["image_id"]
    assert now[first_emi]["ImageLocation"].lstrip("/").startswith(f"{bucket}/stable/{recipe}/{first.id}/")
    after = objects(clients, bucket)
    assert {k: after.get(k) for k in before} == before, "its bundle parts are byte for byte as released"
    assert ids_of(second).isdisjoint(first_ids) and bundle_keys(second).isdisjoint(before)
    assert {now[i]["Name"] for i in ids_of(second)}.isdisjoint({now[i]["Name"] for i in first_ids})


def test_a_build_of_another_box_with_the_same_recipe_and_id_is_refused_and_changes_nothing(
        euca_cloud, isolated, capsys):  # noqa: F811
    """Two boxes that baked one recipe in the same second meet on every name: the second
    to publish is refused before anything is written."""
    cloud, clients = euca_cloud, clients_of(euca_cloud)
    recipe, bucket = "imm-" + secrets.token_hex(3), "imm-" + secrets.token_hex(5)
    first = verified_build(isolated / "box-a", recipe, "20261201-080000", cloud)
    status, out = publish(capsys, first, cloud, bucket, "--prefix", "stable")
    assert status == 0, out
    status, out = release(capsys, first, cloud)
    assert status == 0, out
    images_before, objects_before = images(clients), objects(clients, bucket)

    twin = verified_build(isolated / "box-b", recipe, "20261201-080000", cloud)
    status, out = publish(capsys, twin, cloud, bucket, "--prefix", "stable")
    assert status != 0
    errors = [line for line in out.splitlines() if line.startswith("bake: error:")]
    assert len(errors) == 1 and "refused" in errors[0] and f"{recipe}/{first.id}" in errors[0], out
    assert "another build" in errors[0]
    assert images(clients) == images_before
    assert objects(clients, bucket) == objects_before
    assert "cloud" not in Build.load(twin.dir).data


def test_a_released_build_published_again_keeps_its_images_and_is_never_bundled_again(
        euca3, euca4, isolated, capsys):  # noqa: F811
    cloud, clients = euca4, clients_of(euca4)
    recipe, bucket = "imm-" + secrets.token_hex(3), "imm-" + secrets.token_hex(5)
    build = verified_build(isolated / "output", recipe, "20261201-080000", cloud)
    status, out = publish(capsys, build, cloud, bucket)
    assert status == 0, out
    status, out = release(capsys, build, cloud)
    assert status == 0, out
    sums = (build.dir / "SHA256SUMS").read_text()
    images_before, objects_before = images(clients), objects(clients, bucket)
    cloud.clear_log()

    status, out = publish(capsys, build, cloud, bucket)     # the same cloud: nothing to do
    assert status == 0, out
    assert not [r for r in cloud.front.requests if r.operation in ("RegisterImage", "DeregisterImage")]
    assert images(clients) == images_before and objects(clients, bucket) == objects_before

    # another cloud's certificate would mean new bundles: refused before anything changes
    other_before = images(clients_of(euca3))
    status, out = publish(capsys, build, euca3, "imm-" + secrets.token_hex(5))
    assert status != 0 and "was released" in out and "never change" in out, out
    for line in sums.splitlines():      # what `sha256sum -c SHA256SUMS` checks
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((build.dir / name).read_bytes()).hexdigest() == digest, name
    assert images(clients_of(euca3)) == other_before and images(clients) == images_before


# --- gc --cloud ---------------------------------------------------------------------------

def _gc_until_removal(output: Path, recipe: str, cloud, keep: int = 1):
    """gc's survey and plan, as `bake gc --cloud` makes them before it removes anything."""
    creds = load_credentials({"eucarc": str(cloud.eucarc)})
    clients = make_clients(creds)
    survey = gc.survey_local(output, [recipe])
    gc.survey_cloud(survey, clients, creds)
    return gc.plan_gc(survey, keep), survey, clients, creds


@pytest.mark.parametrize("where", ["its build.json", "the marker in the bucket"])
def test_a_release_made_while_gc_runs_survives(euca4, isolated, capsys, where):  # noqa: F811
    """gc surveys and plans; the old build is released; then gc removes: the build
    stays. Through its build.json (gc on the box that holds it) or, for gc with another
    output root that knows it from the cloud alone, through the marker beside its bundles."""
    cloud, clients = euca4, clients_of(euca4)
    recipe, bucket = "imm-" + secrets.token_hex(3), "imm-" + secrets.token_hex(5)
    output = isolated / "output"
    old = verified_build(output, recipe, "20261201-080000", cloud)
    new = verified_build(output, recipe, "20261202-080000", cloud)
    for b in (old, new):
        status, out = publish(capsys, b, cloud, bucket)
        assert status == 0, out
    gc_output = output if where == "its build.json" else isolated / "other-box"
    plan, survey, gc_clients, creds = _gc_until_removal(gc_output, recipe, cloud)
    verdict = {v.build_id: v for v in plan.builds}
    assert verdict[old.id].goes and ids_of(old) <= set(verdict[old.id].deregister), plan

    status, out = release(capsys, old, cloud)     # between gc's survey and its removal
    assert status == 0, out
    images_before, objects_before = images(clients), objects(clients, bucket)

    gc.execute(plan, survey, gc_clients, creds)
    outcome = {v.build_id: v.outcome for v in plan.builds}[old.id]
    assert outcome.startswith("skipped: released since the survey"), outcome
    assert ("its build.json says so" if where == "its build.json" else "the release marker") in outcome, outcome
    assert images(clients) == images_before and objects(clients, bucket) == objects_before
    assert Build.load(old.dir).data["released"]

    # and the next gc, which sees the release in its survey, keeps it too
    status, out = bake(capsys, "gc", "--keep", "1", "--cloud", "--eucarc", str(cloud.eucarc),
                       "--output", str(gc_output), recipe)
    assert status == 0, out
    assert ids_of(old) <= set(images(clients))


# --- the farm -----------------------------------------------------------------------------

def farm_record(store, recipe: str, build_id: str, state: str, **extra) -> None:
    store.put_json(f"builds/{recipe}/{build_id}.json",
                   {"recipe": recipe, "build_id": build_id, "state": state, **extra})
    store.put_bytes(f"logs/{recipe}/{build_id}.log", b"log\n")


def test_a_released_farm_build_survives_gc_farm(euca4, isolated, capsys, monkeypatch):  # noqa: F811
    for k, v in euca4.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("BAKE_FARM_STORE", raising=False)
    url = store_url("immutable")
    store = Farm("", url).store()
    recipe = "imm-" + secrets.token_hex(3)
    output = isolated / "output"
    ids = ["20261201-080000-aaaa", "20261202-080000-bbbb", "20261203-080000-cccc"]
    for build_id in ids:
        farm_record(store, recipe, build_id, "verified")
    oldest = verified_build(output, recipe, ids[0], euca4)     # the worker box's folder of the oldest

    # a farm build released without its store is refused, and nothing is marked
    status, out = bake(capsys, "release", str(oldest.dir), "--output", str(output))
    assert status != 0 and "farm build" in out and "--store" in out, out
    assert "released" not in Build.load(oldest.dir).data

    status, out = bake(capsys, "release", str(oldest.dir), "--output", str(output), "--store", url)
    assert status == 0, out
    assert store.get_json(f"builds/{recipe}/{ids[0]}.json")["released"]["at"]

    status, out = bake(capsys, "gc", "--farm", "--keep", "1", "--store", url, recipe)
    assert status == 0, out
    left = {r["build_id"] for r in list_records(store, recipe)}
    assert left == {ids[0], ids[2]}, out
    assert f"{recipe}/{ids[0]}  released: released" in out


def test_gc_cloud_collects_farm_builds_from_the_bucket_alone_but_never_a_released_one(
        euca4, isolated, capsys):  # noqa: F811
    """A farm build's id is the time and a hex suffix; gc --cloud on a box without their
    folders finds them from the bucket, keeps the released and the newest, collects the rest."""
    cloud, clients = euca4, clients_of(euca4)
    recipe, bucket = "imm-" + secrets.token_hex(3), "imm-" + secrets.token_hex(5)
    worker = isolated / "worker"
    builds = [verified_build(worker, recipe, i, cloud)
              for i in ("20261201-080000-aaaa", "20261202-080000-bbbb", "20261203-080000-cccc")]
    for b in builds:
        status, out = publish(capsys, b, cloud, bucket)
        assert status == 0, out
    released, collected, newest = builds
    marker = Build.load(released.dir).data["cloud"]["prefix"] + "/" + gc.RELEASE_MARKER
    clients.s3.put_object(Bucket=bucket, Key=marker, Body=json.dumps({"at": "2026-12-04T00:00:00+00:00"}).encode())

    status, out = bake(capsys, "gc", "--keep", "1", "--cloud", "--eucarc", str(cloud.eucarc),
                       "--output", str(isolated / "fresh"), recipe)
    assert status == 0, out
    now = images(clients)
    assert ids_of(released) <= set(now) and ids_of(newest) <= set(now)
    assert not ids_of(collected) & set(now), out
    left = set(objects(clients, bucket))
    assert bundle_keys(released) <= left and bundle_keys(newest) <= left
    assert not bundle_keys(collected) & left
