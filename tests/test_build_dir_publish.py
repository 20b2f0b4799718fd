"""`bake publish` checks the build's own folder before it contacts the cloud, says what
is wrong with the eucarc it was given, and `bake unpublish` describes its own options.

The eucarcs here point at a port on 127.0.0.1 where nothing listens: reaching for the
cloud would end in "cannot reach the cloud", so any other error was found locally."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from builder.core.record import Build
from builder.cloud.credentials import ENV_NAMES
from conftest import BAKE
from eucalyptus_standin.trio import make_build

SECRET = "n0t-a-real/secret+key"


@pytest.fixture
def dead_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_eucarc(path: Path, port: int, *, bundling: bool = False, only: tuple[str, ...] | None = None) -> Path:
    lines = {
        "EC2_URL": f"http://127.0.0.1:{port}/services/Eucalyptus",
        "S3_URL": f"http://127.0.0.1:{port}/services/Walrus",
        "EC2_ACCESS_KEY": "AKIDLOCALTEST01",
        "EC2_SECRET_KEY": SECRET,
    }
    if bundling:
        for name in ("cert.pem", "pk.pem", "cloud-cert.pem"):
            (path.parent / name).write_text(f"not really {name}\n")
        lines.update(EC2_CERT="${EUCA_KEY_DIR}/cert.pem", EC2_PRIVATE_KEY="${EUCA_KEY_DIR}/pk.pem",
                     EUCALYPTUS_CERT="${EUCA_KEY_DIR}/cloud-cert.pem", EC2_USER_ID="123456789012")
    if only is not None:
        lines = {k: v for k, v in lines.items() if k in only}
    path.write_text("EUCA_KEY_DIR=$(cd $(dirname ${BASH_SOURCE:-$0}); pwd -P)\n"
                    + "".join(f"export {k}='{v}'\n" if "$" not in v else f"export {k}={v}\n"
                              for k, v in lines.items()))
    return path


def bake(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not any(k in names for names in ENV_NAMES.values())}
    return subprocess.run([BAKE, *argv], capture_output=True, text=True, env={**clean, **(env or {})}, timeout=120)


def listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else b"" for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("bundling", [False, True], ids=["bundles-only", "can-bundle"])
def test_a_build_without_outputs_is_refused_before_the_cloud_is_contacted(tmp_path, dead_port, bundling):
    build = Build.create(tmp_path / "output", "demo")
    rc = write_eucarc(tmp_path / "eucarc", dead_port, bundling=bundling)
    before = listing(build.dir)
    r = bake("publish", "--eucarc", str(rc), str(build.dir))
    assert r.returncode == 1
    assert f"bake: error: {build.dir}: this build has no image (stage not run?)" in r.stderr
    assert "cannot reach the cloud" not in r.stderr and "Traceback" not in r.stderr
    assert listing(build.dir) == before


def test_a_build_whose_image_file_is_gone_is_refused_before_the_cloud_is_contacted(tmp_path, dead_port):
    build = make_build(tmp_path / "output")
    image = build.output_path("image")
    image.unlink()
    rc = write_eucarc(tmp_path / "eucarc", dead_port, bundling=True)
    r = bake("publish", "--eucarc", str(rc), str(build.dir))
    assert r.returncode == 1
    assert f"recorded but missing: {image} (its image)" in r.stderr
    assert "cannot reach the cloud" not in r.stderr


def test_a_bundle_whose_manifest_is_gone_is_refused_before_the_cloud_is_contacted(tmp_path, dead_port):
    build = make_build(tmp_path / "output")
    build.set("bundle", {"image": {"manifest": "bundle/image/test.img.manifest.xml", "parts": []}})
    rc = write_eucarc(tmp_path / "eucarc", dead_port)
    r = bake("publish", "--eucarc", str(rc), str(build.dir))
    assert r.returncode == 1
    assert "test.img.manifest.xml: recorded as the image bundle's manifest but missing" in r.stderr
    assert "cannot reach the cloud" not in r.stderr


def test_a_build_ready_to_publish_does_reach_for_the_cloud_and_bundles_nothing_first(tmp_path, dead_port):
    # the other tests' proof: with everything in place, the same eucarc does reach for the cloud
    build = make_build(tmp_path / "output")
    rc = write_eucarc(tmp_path / "eucarc", dead_port, bundling=True)
    r = bake("publish", "--eucarc", str(rc), str(build.dir))
    assert r.returncode == 1
    assert "cannot reach the cloud" in r.stderr and SECRET not in r.stderr
    assert not (build.dir / "bundle").exists()


def test_a_given_eucarc_that_sets_nothing_is_named_not_called_no_cloud(tmp_path):
    build = make_build(tmp_path / "output")
    garbage = tmp_path / "garbage"
    garbage.write_text("this is not an eucarc\n")
    r = bake("publish", "--eucarc", str(garbage), str(build.dir))
    assert r.returncode == 1
    assert (f"bake: error: {garbage}: this eucarc sets none of EC2_URL, S3_URL, EC2_ACCESS_KEY, EC2_SECRET_KEY"
            in r.stderr)
    assert "no cloud configured" not in r.stderr


def test_a_given_eucarc_lacking_variables_names_them_even_when_the_environment_has_a_cloud(tmp_path, dead_port):
    build = make_build(tmp_path / "output")
    rc = write_eucarc(tmp_path / "eucarc", dead_port, only=("EC2_URL", "EC2_ACCESS_KEY"))
    other_cloud = {"EC2_URL": "http://other:8773/services/Eucalyptus", "S3_URL": "http://other:8773/services/Walrus",
                   "EC2_ACCESS_KEY": "AKIDOTHER", "EC2_SECRET_KEY": "other-secret"}
    r = bake("unpublish", "--eucarc", str(rc), str(build.dir), env=other_cloud)
    assert r.returncode == 1
    assert f"bake: error: {rc}: this eucarc does not set S3_URL, EC2_SECRET_KEY" in r.stderr
    assert "other-secret" not in r.stderr


def test_a_given_eucarc_that_does_not_exist_is_named(tmp_path):
    build = make_build(tmp_path / "output")
    r = bake("publish", "--eucarc", str(tmp_path / "nope"), str(build.dir))
    assert r.returncode == 1
    assert f"bake: error: {tmp_path / 'nope'}: cannot read the eucarc: No such file or directory" in r.stderr


def test_without_an_eucarc_or_environment_publish_says_how_to_configure_a_cloud(tmp_path):
    build = make_build(tmp_path / "output")
    r = bake("publish", str(build.dir))
    assert r.returncode == 1
    assert "no cloud configured: source an eucarc (or pass --eucarc)" in r.stderr


def test_unpublish_describes_its_bucket_as_the_one_to_delete_from():
    r = bake("unpublish", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "bucket to upload to" not in text
    assert "--bucket BUCKET bucket to delete the build's bundles from" in text
    assert "bucket to upload to" in " ".join(bake("publish", "--help").stdout.split())
