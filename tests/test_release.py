"""`bake release` and `bake latest` on real builds: two bakes of a demo recipe that differ
by known packages, each verified for real under QEMU, one of them published to the
Eucalyptus 3.x stand-in and released with --public.

The packages that differ are small .deb files made here and installed by a test element
after the package checkpoint, so both bakes take the demo's cached base and packages
(about half a minute each) and the release notes can be checked against exact names and
versions. The verifications boot each image and log in over SSH (`--checks
boots,metadata`): the full set of checks is test_verify.py's, and three more minutes of
QEMU would prove nothing more about releasing.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from builder.core.record import Build
from builder.cloud.clients import make_clients
from builder.cloud.credentials import load_credentials
from builder.operations.records import state_of
from builder.operations.packages import compare_versions, package_changes
from conftest import BAKE, REPO
from eucalyptus_standin.fixtures import euca3, euca4  # noqa: F401
from test_release_signing import make_key

pytestmark = [pytest.mark.e2e, pytest.mark.bakes, pytest.mark.boots]

RECIPE = "release-demo"
# (name, version, source package) installed by the probe element in each bake
PROBES_A = [("bake-probe-kept", "1.0-1", None), ("bake-probe-gone", "1.0", None), ("bake-probe-old", "2.0", None)]
PROBES_B = [("bake-probe-kept", "1.0-2", None), ("bake-probe-new", "0.5-1", "bake-probe-suite"),
            ("bake-probe-old", "1.9", None)]
SSTREAM_QUERY = str(Path(BAKE).parent / "sstream-query")
PYSPDXTOOLS = str(Path(BAKE).parent / "pyspdxtools")


def bake(*args: str, env: dict | None = None, timeout: float = 1200, no_cloud: bool = False) -> subprocess.CompletedProcess:
    """Run bake; with `no_cloud`, without any cloud credential variable of the test run's environment."""
    from builder.cloud.credentials import ENV_NAMES

    environ = {**os.environ, **(env or {})}
    if no_cloud:
        environ = {k: v for k, v in environ.items() if not any(k in names for names in ENV_NAMES.values())}
    return subprocess.run([BAKE, *args], capture_output=True, text=True, timeout=timeout, env=environ,
                          stdin=subprocess.DEVNULL)


def make_deb(dest: Path, work: Path, name: str, version: str, source: str | None) -> Path:
    root = work / f"{name}_{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: bake tests <tests@bake.invalid>\n"
        + (f"Source: {source}\n" if source else "") + "Description: a package the release tests look for\n")
    doc = root / "usr" / "share" / "doc" / name
    doc.mkdir(parents=True)
    (doc / "probe").write_text(f"{name} {version}\n")
    deb = dest / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


def probe_element(where: Path, probes: list[tuple[str, str, str | None]]) -> Path:
    """A folder of elements holding `release-probe`, which installs `probes` with dpkg."""
    element = where / "release-probe"
    (element / "debs").mkdir(parents=True)
    (element / "install.d").mkdir()
    (element / "element.yaml").write_text("description: installs the release tests' probe packages\n")
    hook = element / "install.d" / "60-release-probe"
    hook.write_text('#!/bin/sh\nset -e\ndpkg -i "$BAKE_ELEMENT_DIR"/debs/*.deb\n')
    hook.chmod(0o755)
    for name, version, source in probes:
        make_deb(element / "debs", where / "work", name, version, source)
    return where


def recipe_file(where: Path) -> Path:
    demo = (REPO / "recipes" / "debian-demo.yml").read_text()
    # every check but the two that boot a second instance (the sync agent's round trip and
    # hygiene; minutes here), which test_verify makes on the demo build: a release asks
    # every check the recipe names
    text = demo.replace("name: debian-demo", f"name: {RECIPE}").replace(
        "elements:\n", "elements:\n  - release-probe\n", 1).replace(
        "  instance_type: m1.small\n", "  instance_type: m1.small\n  skip: [hygiene, sync-agent]\n", 1)
    assert f"name: {RECIPE}" in text and "- release-probe" in text and "skip: [hygiene, sync-agent]" in text
    path = where / f"{RECIPE}.yml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The output root of this module's builds (a gigabyte or two: removed after)."""
    d = tmp_path_factory.mktemp("release") / "output"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def elements(tmp_path_factory) -> dict[str, Path]:
    """The probe element as bake A and bake B get it (BAKE_ELEMENTS_PATH folders)."""
    where = tmp_path_factory.mktemp("release-elements")
    return {tag: probe_element(where / tag, probes) for tag, probes in (("a", PROBES_A), ("b", PROBES_B))}


@pytest.fixture(scope="module")
def env(elements) -> dict[str, str]:
    """The environment of the commands that read the recipe again (verify, publish, release
    --public): its element must be found."""
    return {"BAKE_ELEMENTS_PATH": str(elements["b"])}


@pytest.fixture(scope="module")
def builds(demo_build, root, elements, tmp_path_factory) -> tuple[Build, Build]:
    """Two bakes of the recipe, A then B, up to the image, from the demo's cached base
    (demo_build made the cache), that differ by the probe packages."""
    recipe = recipe_file(tmp_path_factory.mktemp("release-recipe"))
    out = []
    for tag in ("a", "b"):
        r = bake("build", "--stop-after", "image", "--output", str(root), str(recipe),
                 env={"BAKE_ELEMENTS_PATH": str(elements[tag])})
        assert r.returncode == 0, r.stderr[-3000:]
        out.append(Build.load(r.stdout.strip().splitlines()[-1]))
    assert out[0].id < out[1].id
    return out[0], out[1]


@pytest.fixture(scope="module")
def refused_unverified(builds):
    """`bake release A` before A was verified."""
    a, _ = builds
    return bake("release", str(a.dir))


@pytest.fixture(scope="module")
def verified(builds, refused_unverified, env):
    """A and B verified for real by every check their recipe names: each boots under
    QEMU, takes the served SSH key, sees a hot-plugged volume and passes the recipe's own."""
    for b in builds:
        r = bake("verify", str(b.dir), env=env, timeout=1500)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tuple(Build.load(b.dir) for b in builds)


@pytest.fixture(scope="module")
def published_b(verified, euca3, env):
    """B published to the 3.x stand-in (bundled for it first); unpublished after."""
    _, b = verified
    bucket = "release-" + secrets.token_hex(4)
    r = bake("publish", str(b.dir), "--eucarc", str(euca3.eucarc), "--bucket", bucket, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    yield Build.load(b.dir)
    bake("unpublish", str(b.dir), "--eucarc", str(euca3.eucarc), env=env)


@pytest.fixture(scope="module")
def released_a(verified):
    a, _ = verified
    r = bake("release", str(a.dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return Build.load(a.dir), r


@pytest.fixture(scope="module")
def release_key(tmp_path_factory) -> tuple[str, Path, Path]:
    """A signing key of the test's own: (fingerprint, its public key, its GnuPG home)."""
    home = tmp_path_factory.mktemp("release-gnupg") / "home"
    fpr, public = make_key(home, "bake release tests <releases@example.invalid>")
    return fpr, public, home


@pytest.fixture(scope="module")
def released_b(released_a, published_b, euca3, env, release_key):
    """B released with --public after A, on the 3.x stand-in, signed; its requests kept."""
    fpr, _, home = release_key
    euca3.clear_log()
    r = bake("release", str(published_b.dir), "--public", "--eucarc", str(euca3.eucarc), "--sign", fpr,
             env={**env, "GNUPGHOME": str(home)})
    assert r.returncode == 0, r.stderr[-3000:]
    requests = [rec for rec in euca3.front.requests if rec.operation == "ModifyImageAttribute"]
    return Build.load(published_b.dir), r, requests


def sha256sum_check(build: Build) -> list[str]:
    r = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=build.dir, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return [line.rsplit(": ", 1)[0] for line in r.stdout.splitlines() if line.endswith(": OK")]


# --- refusals ---------------------------------------------------------------------------------

def test_a_build_never_verified_is_refused_saying_so(builds, refused_unverified):
    a, _ = builds
    assert refused_unverified.returncode == 1
    assert "was never verified" in refused_unverified.stderr and f"bake verify {a.dir}" in refused_unverified.stderr
    assert not (a.dir / "SHA256SUMS").exists() and not Build.load(a.dir).data.get("released")


def test_a_build_whose_verification_failed_is_refused_naming_the_checks(builds, tmp_path):
    a, _ = builds
    # a copy of A's record (outputs linked) as a failed verification leaves it
    copy = tmp_path / RECIPE / a.id
    copy.mkdir(parents=True)
    data = dict(a.data)
    for entry in data["outputs"].values():
        os.link(a.dir / entry["path"], copy / entry["path"])
    data.update(result="failed", error="verification failed: boots",
                verify={"result": "failed", "mode": "local", "checks": {"boots": "fail", "metadata": "skip"}})
    (copy / "build.json").write_text(json.dumps(data))
    r = bake("release", str(copy))
    assert r.returncode == 1
    assert "verification failed (failed: boots)" in r.stderr
    assert not (copy / "SHA256SUMS").exists() and "released" not in json.loads((copy / "build.json").read_text())


# --- what a release writes -----------------------------------------------------------------

def test_the_package_list_names_source_packages(builds):
    _, b = builds
    pkgs = {p["name"]: p for p in b.data["packages"]}
    assert pkgs["bake-probe-new"]["source"] == "bake-probe-suite" and pkgs["bake-probe-new"]["arch"] == "all"
    assert pkgs["bake-probe-kept"]["source"] == "bake-probe-kept"
    assert pkgs["libc6"]["source"] == "glibc"


def test_a_verified_build_is_released_with_sums_sbom_and_first_notes(released_a):
    a, r = released_a
    rel = a.data["released"]
    assert rel["public"] is False and rel["at"] and rel["previous"] is None
    assert state_of(a)[0] == "released"
    checked = sha256sum_check(a)
    assert sorted(checked) == sorted(a.data["outputs"][role]["path"] for role in ("kernel", "ramdisk", "image"))
    notes = (a.dir / rel["notes"]).read_text()
    assert f"First release of {RECIPE}" in notes
    assert "boots, metadata, acpiphp, volume-hotplug, recipe:os-release passed" in notes
    assert (rel["verified"], rel["unverified_checks"]) == ("fully", [])
    assert "Not published" in notes
    assert f"released\t{RECIPE}/{a.id}" in r.stdout


def test_the_sbom_is_valid_spdx_2_3_listing_every_package(released_b):
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    b, _, _ = released_b
    path = b.dir / b.data["released"]["sbom"]
    cli = subprocess.run([PYSPDXTOOLS, "-i", str(path)], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    doc = parse_file(str(path))
    assert validate_full_spdx_document(doc, "SPDX-2.3") == []
    assert doc.creation_info.spdx_version == "SPDX-2.3"
    by_name = {p.name: p for p in doc.packages}
    assert len(doc.packages) == len(b.data["packages"]) + 1        # the image and its packages
    new = by_name["bake-probe-new"]
    assert new.version == "0.5-1" and "bake-probe-suite" in new.source_info
    assert [ref.locator for ref in new.external_references] == ["pkg:deb/debian/bake-probe-new@0.5-1?arch=all"]
    libc = by_name["libc6"]
    assert libc.external_references[0].locator.startswith("pkg:deb/debian/libc6@") and "arch=amd64" in \
        libc.external_references[0].locator
    contained = {r.related_spdx_element_id for r in doc.relationships if r.relationship_type.name == "CONTAINS"}
    assert new.spdx_id in contained and len(contained) == len(b.data["packages"])


def test_the_second_release_notes_say_what_changed_since_the_first(released_a, released_b):
    a, _ = released_a
    b, _, _ = released_b
    assert b.data["released"]["previous"] == a.id
    notes = (b.dir / b.data["released"]["notes"]).read_text()
    assert f"## Changes since {a.id}" in notes

    def section(title: str) -> list[str]:
        block = notes.split(f"### {title}", 1)[1].split("\n\n", 2)[1]
        return [line[2:] for line in block.splitlines() if line.startswith("- ")]
    assert section("Added") == ["bake-probe-new 0.5-1"]
    assert section("Removed") == ["bake-probe-gone 1.0"]
    assert section("Upgraded") == ["bake-probe-kept 1.0-1 → 1.0-2"]
    assert section("Downgraded") == ["bake-probe-old 2.0 → 1.9"]


def test_sha256sums_cover_the_bundles_of_a_published_build(released_b):
    b, _, _ = released_b
    checked = sha256sum_check(b)
    bundle = b.data["bundle"]
    expected = [b.data["outputs"][role]["path"] for role in ("kernel", "ramdisk", "image")]
    for role in ("kernel", "ramdisk", "image"):
        expected += [p["path"] for p in bundle[role]["parts"]] + [bundle[role]["manifest"]]
    assert sorted(checked) == sorted(expected) and any(".part." in c for c in checked)
    # and a changed byte is caught
    part = b.dir / bundle["image"]["parts"][0]["path"]
    original = part.read_bytes()
    try:
        part.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        r = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=b.dir, capture_output=True, text=True)
        assert r.returncode != 0 and "FAILED" in r.stdout
    finally:
        part.write_bytes(original)


# --- --public on Eucalyptus 3.x ---------------------------------------------------------------

def test_public_grants_launch_permission_to_all_in_the_form_eucalyptus_3_binds(released_b, euca3):
    b, r, requests = released_b
    ids = b.data["released"]["images"]
    assert b.data["released"]["public"] is True and all(ids.values())
    assert f"public\t{ids['emi']} {ids['eki']} {ids['eri']}" in r.stdout
    assert sorted(q.params["ImageId"] for q in requests) == sorted(ids.values())
    for q in requests:
        assert (q.status, q.params["Attribute"], q.params["OperationType"], q.params["UserGroup.1"]) == \
            (200, "launchPermission", "add", "all")
        assert not any(k.startswith("LaunchPermission.") for k in q.params)
    ec2 = make_clients(load_credentials({}, eucarc=euca3.eucarc)).ec2
    for image_id in ids.values():
        attr = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
        assert attr["LaunchPermissions"] == [{"Group": "all"}]
    assert ec2.describe_images(ImageIds=[ids["emi"]])["Images"][0]["Public"] is True
    assert "launchable by every account" in (b.dir / b.data["released"]["notes"]).read_text()


def test_the_stand_ins_bind_launch_permission_forms_as_eucalyptus_does(euca3, euca4, tmp_path):
    """3.0-3.2 bind only Attribute/OperationType/UserGroup.N; 3.3 and 4.x bind both."""
    from builder.cloud.publish import PublishOptions, publish
    from eucalyptus_standin.trio import bundle_build, make_build

    for cloud in (euca3, euca4):
        build = make_build(tmp_path / cloud.version)
        bundle_build(build, cloud)
        creds = load_credentials({}, eucarc=cloud.eucarc)
        emi = publish(build, creds, PublishOptions(bucket="perm-" + secrets.token_hex(4)))["image_id"]
        ec2 = make_clients(creds).ec2
        newer = dict(ImageId=emi, LaunchPermission={"Add": [{"Group": "all"}]})
        if cloud.version == "3":
            with pytest.raises(ClientError) as e:
                ec2.modify_image_attribute(**newer)
            assert e.value.response["Error"]["Code"] == "InvalidParameter"
            assert "Failed to bind the following fields: LaunchPermission.Add.1.Group" in str(e.value)
            assert ec2.describe_image_attribute(ImageId=emi, Attribute="launchPermission")["LaunchPermissions"] == []
            ec2.modify_image_attribute(ImageId=emi, Attribute="launchPermission", OperationType="add",
                                       UserGroups=["all"])
        else:
            ec2.modify_image_attribute(**newer)
        assert ec2.describe_image_attribute(ImageId=emi, Attribute="launchPermission")["LaunchPermissions"] == \
            [{"Group": "all"}]
        ec2.modify_image_attribute(ImageId=emi, Attribute="launchPermission", OperationType="remove",
                                   UserGroups=["all"])
        assert ec2.describe_images(ImageIds=[emi])["Images"][0]["Public"] is False


def test_a_published_release_puts_the_marker_gc_looks_for_beside_its_bundles(released_b, euca3):
    from builder.operations import gc

    b, _, _ = released_b
    cloud = b.data["cloud"]
    key = f"{cloud['prefix']}/{gc.RELEASE_MARKER}"
    assert b.data["released"]["marker_at"] == f"{cloud['bucket']}/{key}"
    s3 = make_clients(load_credentials({}, eucarc=euca3.eucarc)).s3
    marker = json.loads(s3.get_object(Bucket=cloud["bucket"], Key=key)["Body"].read())
    assert (marker["build_id"], marker["recipe"], marker["images"], marker["public"]) == \
        (b.id, RECIPE, b.data["released"]["images"], True)


def test_a_published_build_is_not_released_without_its_clouds_credentials(released_b, env, tmp_path):
    b, _, _ = released_b
    copy = tmp_path / RECIPE / b.id
    copy.mkdir(parents=True)
    data = {k: v for k, v in b.data.items() if k != "released"}
    for entry in data["outputs"].values():
        os.link(b.dir / entry["path"], copy / entry["path"])
    data.pop("bundle")
    (copy / "build.json").write_text(json.dumps(data))
    r = bake("release", str(copy), env=env, no_cloud=True)
    assert r.returncode == 1
    assert f"was published to {b.data['cloud']['ec2_url']}" in r.stderr and "--eucarc" in r.stderr
    assert not (copy / "SHA256SUMS").exists() and "released" not in json.loads((copy / "build.json").read_text())


def test_releasing_again_is_refused(released_b):
    b, _, _ = released_b
    r = bake("release", str(b.dir))
    assert r.returncode == 1 and "was released already" in r.stderr
    assert Build.load(b.dir).data["released"] == b.data["released"]


# --- latest and the stream index ----------------------------------------------------------------

def test_latest_prints_the_newest_published_or_released_builds_images(released_b, root, tmp_path):
    b, _, _ = released_b
    ids = b.data["released"]["images"]
    r = bake("latest", RECIPE, "--released", "--output", str(root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"build\t{RECIPE}/{b.id}", f"emi\t{ids['emi']}", f"eki\t{ids['eki']}",
                                     f"eri\t{ids['eri']}"]
    # a newer build, published and not released: the newest for `latest`, not for --released
    newer = root / RECIPE / "29991231-235959"
    newer.mkdir()
    data = {k: v for k, v in b.data.items() if k != "released"}
    data.update(build_id=newer.name, created="2999-12-31T23:59:59+00:00")
    (newer / "build.json").write_text(json.dumps(data))
    try:
        r = json.loads(bake("latest", RECIPE, "--json", "--output", str(root)).stdout)
        assert (r["build_id"], r["emi"], r["released"]) == (newer.name, ids["emi"], None)
        r = json.loads(bake("latest", RECIPE, "--released", "--json", "--output", str(root)).stdout)
        assert (r["build_id"], r["emi"], r["public"]) == (b.id, ids["emi"], True)
    finally:
        shutil.rmtree(newer)
    none = bake("latest", "no-such-recipe", "--output", str(root))
    assert none.returncode == 1 and "no builds of no-such-recipe" in none.stderr
    # only an unreleased copy in another root: nothing released there
    other = tmp_path / "other" / RECIPE / b.id
    other.mkdir(parents=True)
    (other / "build.json").write_text(json.dumps(data))
    r = bake("latest", RECIPE, "--released", "--output", str(tmp_path / "other"))
    assert r.returncode == 1 and f"no released build of {RECIPE}" in r.stderr


def test_sstream_query_finds_the_released_emi(released_a, released_b, root):
    b, _, _ = released_b
    ids = b.data["released"]["images"]
    index = root / "streams" / "v1" / "index.json"
    r = subprocess.run([SSTREAM_QUERY, "--json", str(index), "itype=machine"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)
    # A was released but never published: it has no image ids to list
    assert [(i["product_name"], i["version_name"], i["id"]) for i in items] == \
        [(f"bake:{RECIPE}:x86_64", b.id, ids["emi"])]
    assert (items[0]["kernel_id"], items[0]["ramdisk_id"]) == (ids["eki"], ids["eri"])
    assert items[0]["endpoint"] == b.data["cloud"]["ec2_url"]
    r = subprocess.run([SSTREAM_QUERY, "--json", str(index), f"id={ids['eki']}"], capture_output=True, text=True)
    assert [i["itype"] for i in json.loads(r.stdout)] == ["kernel"]


def test_a_signed_published_release_passes_gpg_sstream_query_and_names_the_trio(released_b, root, release_key):
    b, r, _ = released_b
    fpr, public, _ = release_key
    assert f"signed\t{fpr}" in r.stdout
    empty = root.parent / "gpg-verify"          # a GnuPG home that knows only the keyring given
    empty.mkdir(mode=0o700, exist_ok=True)
    v = subprocess.run(["gpg", "--no-default-keyring", "--keyring", str(public), "--verify", "SHA256SUMS.gpg",
                        "SHA256SUMS"], cwd=b.dir, capture_output=True, text=True,
                       env={**os.environ, "GNUPGHOME": str(empty)})
    assert v.returncode == 0 and "Good signature" in v.stderr, v.stderr
    ids = b.data["released"]["images"]
    q = subprocess.run([SSTREAM_QUERY, "--keyring", str(public), "--json", str(root / "streams/v1/index.sjson"),
                        "itype=machine"], capture_output=True, text=True)
    assert q.returncode == 0, q.stderr
    assert [i["id"] for i in json.loads(q.stdout)] == [ids["emi"]]
    envelope = json.loads((b.dir / "provenance.intoto.jsonl").read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    named = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    for role in ("kernel", "ramdisk", "image"):
        assert named[b.data["outputs"][role]["path"]] == b.data["outputs"][role]["sha256"], role
    check = bake("release", "verify", str(b.dir), "--keyring", str(public))
    assert check.returncode == 0 and "FAIL" not in check.stdout, check.stdout + check.stderr


# --- the parts, on their own ------------------------------------------------------------------

@pytest.mark.parametrize("a, b, order", [
    ("1.0-1", "1.0-2", -1), ("1:0.9", "2.0", 1), ("1.0~rc1", "1.0", -1), ("2.36-9+deb12u14", "2.36-9+deb12u3", 1),
    ("1.0+b1", "1.0", 1), ("1.0", "1.0-0", 0), ("10", "9", 1), ("1.0a", "1.0+", -1)])
def test_versions_compare_as_dpkg_orders_them(a, b, order):
    assert (compare_versions(a, b), compare_versions(b, a)) == (order, -order)
    op = {-1: "lt", 0: "eq", 1: "gt"}[order]
    assert subprocess.run(["dpkg", "--compare-versions", a, op, b]).returncode == 0


def test_package_changes_tell_multiarch_packages_apart():
    old = [{"name": "libx", "version": "1", "arch": "amd64"}, {"name": "libx", "version": "1", "arch": "i386"}]
    new = [{"name": "libx", "version": "2", "arch": "amd64"}, {"name": "libx", "version": "1", "arch": "i386"}]
    c = package_changes(old, new)
    assert (c.added, c.removed, c.upgraded, c.downgraded) == ([], [], [("libx:amd64", "1", "2")], [])
