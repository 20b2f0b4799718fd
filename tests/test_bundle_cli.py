"""`bake bundle` / `bake unbundle` as operators use them: euca2ools' options and
environment variables, only the made path on stdout; and the bundle stage of a build."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bundle_keys import make_credentials

from builder.core.record import Build
from builder.core.errors import BakeError
from builder.bundle.reader import unbundle
from builder.pipeline.stages import bundle as bundle_stage

CRED_VARS = ("EC2_CERT", "EUCA_CERT", "EC2_PRIVATE_KEY", "EUCA_PRIVATE_KEY", "EUCALYPTUS_CERT", "EC2_USER_ID")


@pytest.fixture(scope="session")
def creds(tmp_path_factory):
    return make_credentials(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def no_cred_env(monkeypatch):
    for v in CRED_VARS:
        monkeypatch.delenv(v, raising=False)


def cred_env(creds) -> dict[str, str]:
    return {"EC2_CERT": str(creds.user.cert), "EC2_PRIVATE_KEY": str(creds.user.key),
            "EUCALYPTUS_CERT": str(creds.cloud.cert), "EC2_USER_ID": "1234-5678-9012"}


def bake(*args, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in CRED_VARS}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], capture_output=True, text=True,
                          env=full, cwd=cwd)


def test_bundle_prints_only_the_manifest_path_and_unbundle_only_the_image_path(creds, tmp_path):
    image = tmp_path / "lucid.img"
    image.write_bytes(os.urandom(200_000))
    r = bake("bundle", "-i", image, "-d", tmp_path / "b", "-r", "i386", "--kernel", "eki-11111111",
             "--ramdisk", "eri-22222222", "-B", "ami=sda1,root=/dev/sda1", env=cred_env(creds))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{tmp_path / 'b' / 'lucid.img.manifest.xml'}\n"
    text = (tmp_path / "b" / "lucid.img.manifest.xml").read_text()
    assert "<architecture>i386</architecture>" in text
    assert ("<block_device_mapping><mapping><virtual>ami</virtual><device>sda1</device></mapping><mapping>"
            "<virtual>root</virtual><device>/dev/sda1</device></mapping></block_device_mapping>"
            "<kernel_id>eki-11111111</kernel_id><ramdisk_id>eri-22222222</ramdisk_id>") in text
    assert "<user>123456789012</user>" in text

    r = bake("unbundle", "-m", tmp_path / "b" / "lucid.img.manifest.xml", "-d", tmp_path / "out",
             "-c", creds.user.cert, env={"EC2_PRIVATE_KEY": str(creds.user.key)})
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{tmp_path / 'out' / 'lucid.img'}\n"
    assert (tmp_path / "out" / "lucid.img").read_bytes() == image.read_bytes()


def test_explicit_options_work_without_environment(creds, tmp_path):
    image = tmp_path / "initrd.img"
    image.write_bytes(b"ramdisk" * 1000)
    r = bake("bundle", "-i", image, "-c", creds.user.cert, "-k", creds.user.key, "--ec2cert", creds.cloud.cert,
             "-u", "123456789012", "-d", tmp_path / "b", "-p", "my-initrd", "--ramdisk", "true")
    assert r.returncode == 0, r.stderr
    manifest = tmp_path / "b" / "my-initrd.manifest.xml"
    assert r.stdout.strip() == str(manifest)
    text = manifest.read_text()
    assert "<type>ramdisk</type>" in text and "<ramdisk_id>true</ramdisk_id>" in text
    assert "<block_device_mapping>" not in text
    r = bake("unbundle", "-m", manifest, "-k", creds.cloud.key, "-s", tmp_path / "b", "-d", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == image.read_bytes()


def test_default_destination_is_a_fresh_private_directory(creds, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"x" * 5000)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    r = bake("bundle", "-i", image, env={**cred_env(creds), "TMPDIR": str(tmpdir)})
    assert r.returncode == 0, r.stderr
    manifest = Path(r.stdout.strip())
    assert manifest.parent.parent == tmpdir and manifest.parent.name.startswith("bundle-")
    assert stat.S_IMODE(manifest.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600


@pytest.mark.parametrize("args, env_drop, message", [
    (["-i", "IMG"], "EUCALYPTUS_CERT", r"bundling needs the cloud certificate: give --ec2cert or EUCALYPTUS_CERT"),
    (["-i", "IMG", "-u", "12345"], None, r"account id '12345': must be the 12-digit account number"),
    (["-i", "IMG", "-B", "ami"], None, r"block device mapping 'ami': must be VIRTUAL=DEVICE"),
    (["-i", "IMG", "--kernel", "true", "--ramdisk", "eri-1"], None, r"a kernel image names no kernel or ramdisk"),
    (["-i", "MISSING"], None, r"MISSING: cannot read the image"),
    ([], None, r"nothing to bundle: give -i IMAGE or a build directory"),
])
def test_user_errors_go_to_stderr_with_exit_1_and_nothing_on_stdout(creds, tmp_path, args, env_drop, message):
    image = tmp_path / "img"
    image.write_bytes(b"data")
    env = cred_env(creds)
    if env_drop:
        del env[env_drop]
    args = [str(image) if a == "IMG" else str(tmp_path / a) if a == "MISSING" else a for a in args]
    r = bake("bundle", *args, "-d", tmp_path / "b", env=env)
    assert r.returncode == 1
    assert r.stdout == ""
    import re
    assert re.search(message, r.stderr), r.stderr
    assert "Traceback" not in r.stderr


def test_unbundle_errors_name_the_problem(creds, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"y" * 70000)
    r = bake("bundle", "-i", image, "-d", tmp_path / "b", env=cred_env(creds))
    manifest = Path(r.stdout.strip())
    r = bake("unbundle", "-m", manifest, "-d", tmp_path / "o", env={})
    assert (r.returncode, r.stdout) == (1, "")
    assert "unbundling needs the private key" in r.stderr
    r = bake("unbundle", "-m", manifest, "-k", creds.stranger.key, "-d", tmp_path / "o")
    assert (r.returncode, r.stdout) == (1, "")
    assert "this private key cannot open the bundle" in r.stderr


# --- a build directory ------------------------------------------------------------------

def make_build(root: Path) -> Build:
    build = Build.create(root, "demo")
    build.data["arch"] = "i386"
    build.save()
    for role, name, size in (("kernel", "vmlinuz-2.6.32-21-generic-pae", 40_000), ("ramdisk", "initrd.img-2.6.32", 30_000),
                             ("image", "demo.img", 3 * 1024 * 1024)):
        path = build.dir / name
        with open(path, "wb") as f:
            f.write(os.urandom(size // 3))
            f.truncate(size)
        build.record_output(role, path)
    return build


def test_bundle_of_a_build_bundles_kernel_ramdisk_and_image_and_records_them(creds, tmp_path):
    build = make_build(tmp_path / "output")
    r = bake("bundle", build.dir, env=cred_env(creds))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines == [str(build.dir / "bundle" / role / f"{name}.manifest.xml") for role, name in
                     (("kernel", "vmlinuz-2.6.32-21-generic-pae"), ("ramdisk", "initrd.img-2.6.32"), ("image", "demo.img"))]

    record = json.loads((build.dir / "build.json").read_text())["bundle"]
    assert list(record) == ["kernel", "ramdisk", "image"]
    assert [record[r]["image_type"] for r in record] == ["kernel", "ramdisk", "machine"]
    for role, entry in record.items():
        assert (build.dir / entry["manifest"]).is_file()
        assert entry["arch"] == "i386"
        assert entry["bundled_size"] == sum(p["size"] for p in entry["parts"])
        assert all((build.dir / p["path"]).stat().st_size == p["size"] for p in entry["parts"])
        assert entry["size"] == build.data["outputs"][role]["size"]
        assert entry["image_sha256"] == build.data["outputs"][role]["sha256"]
        assert "private" not in json.dumps(entry)
        assert stat.S_IMODE((build.dir / entry["manifest"]).stat().st_mode) == 0o600
    assert "<kernel_id>true</kernel_id>" in (build.dir / record["kernel"]["manifest"]).read_text()
    assert "<virtual>ami</virtual><device>sda1</device>" in (build.dir / record["image"]["manifest"]).read_text()

    r = bake("unbundle", "-m", build.dir / record["image"]["manifest"], "-k", creds.cloud.key, "-d", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == (build.dir / "demo.img").read_bytes()


def recipe(**bundle) -> SimpleNamespace:
    return SimpleNamespace(bundle=bundle, publish={}, arch="x86_64")


def test_stage_bundles_with_recipe_credentials_and_keeps_up_to_date_bundles(creds, tmp_path, no_cred_env):
    build = make_build(tmp_path / "output")
    section = {"cert": str(creds.user.cert), "private_key": str(creds.user.key),
               "cloud_cert": str(creds.cloud.cert), "user_id": "123456789012", "part_size": 1048576}
    records = bundle_stage.run_on(build, recipe(**section))
    assert set(records) == {"kernel", "ramdisk", "image"}
    assert len(records["image"]["parts"]) > 1  # 1 MiB parts from the recipe
    manifest = build.dir / records["image"]["manifest"]
    before = manifest.read_bytes()

    again = bundle_stage.run_on(Build.load(build.dir), recipe(**section))
    assert again == records and manifest.read_bytes() == before  # same image, same keys: kept

    (build.dir / "demo.img").write_bytes(b"changed")
    build = Build.load(build.dir)
    build.record_output("image", build.dir / "demo.img")
    third = bundle_stage.run_on(build, recipe(**section))
    assert third["image"]["size"] == 7 and manifest.read_bytes() != before
    assert sorted(p.name for p in (build.dir / "bundle").iterdir()) == ["image", "kernel", "ramdisk"]
    assert not [p for p in build.dir.iterdir() if p.name.startswith(".bundle")]  # nothing half-made left


def test_stage_without_any_credentials_bundles_locally_with_a_key_pair_of_the_build(tmp_path, no_cred_env):
    build = make_build(tmp_path / "output")
    records = bundle_stage.run_on(build, recipe())
    data = json.loads((build.dir / "build.json").read_text())
    assert data["stages"]["bundle"]["local"] is True
    assert "bundled locally" in data["stages"]["bundle"]["note"]
    assert set(records) == {"kernel", "ramdisk", "image"} and data["bundle"] == records
    keys = build.dir / "bundle-keys"
    assert oct(keys.stat().st_mode & 0o777) == "0o700"
    assert oct((keys / "local-pk.pem").stat().st_mode & 0o777) == "0o600"
    # complete and checkable with the build's own key
    out = tmp_path / "back"
    image = unbundle(build.dir / records["image"]["manifest"], private_key=keys / "local-pk.pem",
                     source_dir=None, destination=out, cert=keys / "local-cert.pem")
    assert image.read_bytes() == (build.dir / "demo.img").read_bytes()
    # a second run reuses the same key pair and bundles
    again = bundle_stage.run_on(Build.load(build.dir), recipe())
    assert again["image"]["parts"] == records["image"]["parts"]


def test_stage_with_half_the_credentials_is_an_error(creds, tmp_path, no_cred_env, monkeypatch):
    build = make_build(tmp_path / "output")
    monkeypatch.setenv("EC2_CERT", str(creds.user.cert))
    with pytest.raises(BakeError, match=r"bundling needs the user private key, the cloud certificate, the account id: "
                                        r"give bundle.private_key or EC2_PRIVATE_KEY"):
        bundle_stage.run_on(build, recipe())


def test_stage_follows_the_recipes_prefix_and_settings_and_can_be_disabled(creds, tmp_path, no_cred_env):
    build = make_build(tmp_path / "output")
    section = {"cert": str(creds.user.cert), "private_key": str(creds.user.key),
               "cloud_cert": str(creds.cloud.cert), "user_id": "123456789012", "prefix": "lucid-uec"}
    records = bundle_stage.run_on(build, recipe(**section))
    assert records["image"]["manifest"] == "bundle/image/lucid-uec.manifest.xml"
    assert records["kernel"]["name"] == "vmlinuz-2.6.32-21-generic-pae"  # kernel and ramdisk keep their names
    changed = bundle_stage.run_on(Build.load(build.dir), recipe(**section, block_device_mapping={"ami": "sda"}))
    assert "<virtual>ami</virtual><device>sda</device></mapping></block_device_mapping>" in \
        (build.dir / changed["image"]["manifest"]).read_text()  # a changed setting bundles again

    other = make_build(tmp_path / "output2")
    assert bundle_stage.run_on(other, recipe(**section, enabled=False)) == {}
    assert json.loads((other.dir / "build.json").read_text())["stages"]["bundle"]["skipped"] == "disabled in the recipe"


# --- a build without credentials, as the bundle stage bundles it ------------------------

def test_bundle_of_a_build_without_credentials_bundles_locally_as_the_stage_does(creds, tmp_path):
    build = make_build(tmp_path / "output")
    r = bake("bundle", build.dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(build.dir / "bundle" / role / f"{name}.manifest.xml") for role, name in
                                     (("kernel", "vmlinuz-2.6.32-21-generic-pae"), ("ramdisk", "initrd.img-2.6.32"),
                                      ("image", "demo.img"))]
    own = build.dir / "bundle-keys"
    assert "bundled locally" in r.stderr
    assert f"signed and sealed with the build's own key pair ({own}/)" in r.stderr
    assert "`bake publish` bundles the build again with the cloud's certificate" in r.stderr

    # recorded exactly as the stage records a local bundle, which is what publishing reads
    data = json.loads((build.dir / "build.json").read_text())
    assert data["stages"]["bundle"]["local"] is True
    assert data["stages"]["bundle"]["note"] == bundle_stage.LOCAL_NOTE
    assert list(data["bundle"]) == ["kernel", "ramdisk", "image"]
    assert stat.S_IMODE(own.stat().st_mode) == 0o700
    assert stat.S_IMODE((own / "local-pk.pem").stat().st_mode) == 0o600

    # complete, signed and checkable with the build's own key pair, as the note says
    r = bake("unbundle", "-m", build.dir / data["bundle"]["image"]["manifest"], "-k", own / "local-pk.pem",
             "-c", own / "local-cert.pem", "-d", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back" / "demo.img").read_bytes() == (build.dir / "demo.img").read_bytes()

    # with credentials, the same build is bundled for that cloud and is no longer marked local
    r = bake("bundle", build.dir, env=cred_env(creds))
    assert r.returncode == 0, r.stderr
    assert "bundled locally" not in r.stderr
    stage = json.loads((build.dir / "build.json").read_text())["stages"]["bundle"]
    assert stage["local"] is False and "note" not in stage
    r = bake("unbundle", "-m", build.dir / data["bundle"]["image"]["manifest"], "-k", creds.cloud.key,
             "-d", tmp_path / "cloud")
    assert r.returncode == 0, r.stderr


def test_bundle_of_a_build_without_its_image_makes_no_keys(tmp_path):
    build = make_build(tmp_path / "output")
    (build.dir / "demo.img").unlink()
    r = bake("bundle", build.dir)
    assert (r.returncode, r.stdout) == (1, "")
    assert str(build.dir / "demo.img") in r.stderr and "missing" in r.stderr
    assert not (build.dir / "bundle-keys").exists() and not (build.dir / "bundle").exists()


def test_bundle_of_one_image_without_credentials_asks_for_them(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"z" * 1000)
    r = bake("bundle", "-i", image, "-d", tmp_path / "b")
    assert (r.returncode, r.stdout) == (1, "")
    assert "bundling an image needs your certificate (-c)" in r.stderr
    assert "`bake bundle BUILD_DIR`, is bundled locally without them" in r.stderr
    assert not (tmp_path / "b").exists()


# --- a failed command leaves nothing half-written -------------------------------------

def test_a_missing_image_leaves_no_bundle_folder_in_tmpdir(creds, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    r = bake("bundle", "-i", tmp_path / "nosuch.img", env={**cred_env(creds), "TMPDIR": str(tmpdir)})
    assert (r.returncode, r.stdout) == (1, "")
    assert f"{tmp_path / 'nosuch.img'}: cannot read the image (No such file or directory)" in r.stderr
    assert list(tmpdir.iterdir()) == []


def test_a_failed_bundle_removes_the_destination_it_made_and_only_that(creds, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"w" * 5000)
    mismatched = {**cred_env(creds), "EC2_PRIVATE_KEY": str(creds.stranger.key)}  # fails once bundling has begun
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    r = bake("bundle", "-i", image, env={**mismatched, "TMPDIR": str(tmpdir)})
    assert r.returncode == 1 and "does not belong to the private key" in r.stderr
    assert list(tmpdir.iterdir()) == []

    r = bake("bundle", "-i", image, "-d", tmp_path / "new" / "a" / "b", env=mismatched)
    assert r.returncode == 1
    assert not (tmp_path / "new").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = bake("bundle", "-i", image, "-d", mine, env=mismatched)
    assert r.returncode == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


@pytest.fixture
def corrupt_bundle(creds, tmp_path) -> Path:
    """A bundle whose first part has one byte changed: unbundling fails while writing."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(70_000))
    r = bake("bundle", "-i", image, "-d", tmp_path / "b", env=cred_env(creds))
    assert r.returncode == 0, r.stderr
    part = tmp_path / "b" / "disk.img.part.00"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    return Path(r.stdout.strip())


def test_a_failed_unbundle_removes_the_destination_it_made_and_only_that(creds, corrupt_bundle, tmp_path):
    r = bake("unbundle", "-m", corrupt_bundle, "-k", creds.user.key, "-d", tmp_path / "new" / "dir")
    assert (r.returncode, r.stdout) == (1, "")
    assert "part 0 (" in r.stderr and "does not match the manifest" in r.stderr
    assert not (tmp_path / "new").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = bake("unbundle", "-m", corrupt_bundle, "-k", creds.user.key, "-d", mine)
    assert r.returncode == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_unbundle_says_when_it_did_not_check_the_signature(creds, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(20_000))
    r = bake("bundle", "-i", image, "-d", tmp_path / "b", env=cred_env(creds))
    manifest = Path(r.stdout.strip())
    manifest.write_text(manifest.read_text().replace("<architecture>x86_64</architecture>",
                                                     "<architecture>i386</architecture>"))

    r = bake("unbundle", "-m", manifest, "-k", creds.user.key, "-d", tmp_path / "o1")
    assert r.returncode == 0, r.stderr  # the data itself is intact: digests and size still match
    assert "the manifest's signature was NOT checked (give -c CERT" in r.stderr

    r = bake("unbundle", "-m", manifest, "-k", creds.user.key, "-c", creds.user.cert, "-d", tmp_path / "o2")
    assert (r.returncode, r.stdout) == (1, "")
    assert "signature does not verify" in r.stderr
    assert not (tmp_path / "o2").exists()

    pristine = tmp_path / "p"
    r = bake("bundle", "-i", image, "-d", pristine, env=cred_env(creds))
    r = bake("unbundle", "-m", r.stdout.strip(), "-k", creds.user.key, "-c", creds.user.cert, "-d", tmp_path / "o3")
    assert r.returncode == 0, r.stderr
    assert "NOT checked" not in r.stderr
