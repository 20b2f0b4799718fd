"""Evolving an image registered in the cloud starts by taking it back: `download_image`
fetches an EMI's bundle (and its kernel's and ramdisk's) from the Eucalyptus stand-in
and decrypts it with the user's own key, as euca-download-bundle and euca-unbundle do.

Every image here is published with bake's own code first: a tiny ext4 partition image
made with `mkfs.ext4 -d`, a kernel and a ramdisk of random bytes.

The stand-in serves one account per cloud. A second account of the same cloud is made by
having the front answer as another identity for a while (`acting_as`): its own account
number, access key and user certificate, the same cloud certificate and key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

from builder.core import events
from builder.core.record import Build
from builder.bundle.writer import bundle_image
from builder.cloud.clients import make_clients
from builder.cloud.credentials import Credentials, load_credentials
from builder.cloud.download import download_image
from builder.cloud.images import deregister, register
from builder.cloud.publish import PublishOptions, publish, unpublish
from builder.cloud.store import delete_object, upload_file
from builder.core.errors import BakeError
from eucalyptus_standin import Standin
from eucalyptus_standin.fixtures import euca3, euca4, euca_cloud  # noqa: F401
from eucalyptus_standin.keys import TestIdentity
from eucalyptus_standin.trio import fresh_build_id
from eucalyptus_standin.trio import bundle_build

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
FOREIGN_REFUSAL = ("only the account that bundled it can decrypt it — ask its owner to re-bundle it for you "
                   "or to share the image file")


# --- what is published -------------------------------------------------------------------

def make_base_build(output_root: Path, recipe: str = "base") -> Build:
    """A build whose image is a 16 MiB ext4 filesystem (sparse) holding a tiny tree, with
    a kernel and a ramdisk of random bytes."""
    build = Build.create(output_root, recipe, fresh_build_id())
    build.set("arch", "x86_64")
    tree = output_root / f"{recipe}-tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text('ID=debian\nVERSION_CODENAME=bookworm\nVERSION_ID="12"\n')
    (tree / "etc" / "hostname").write_text("base\n")
    (tree / "srv").mkdir()
    (tree / "srv" / "data.bin").write_bytes(os.urandom(200_000))
    image = build.dir / f"{recipe}.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-L", "base", str(image)], check=True)
    kernel, ramdisk = build.dir / "vmlinuz-2.6.32-base", build.dir / "initrd.img-2.6.32-base"
    kernel.write_bytes(os.urandom(3000))
    ramdisk.write_bytes(os.urandom(5000))
    for role, path in (("kernel", kernel), ("ramdisk", ramdisk), ("image", image)):
        build.record_output(role, path)
    return build


def opts(**kw) -> PublishOptions:
    kw.setdefault("bucket", "base-" + secrets.token_hex(5))
    kw.setdefault("sleep", lambda s: None)
    return PublishOptions(**kw)


@pytest.fixture
def creds(euca_cloud, clean_env) -> Credentials:
    return load_credentials({"eucarc": str(euca_cloud.eucarc)})


@pytest.fixture
def published(euca_cloud, creds, tmp_path):
    """The base trio published by this account (image in 32 KiB parts, so several);
    unpublished afterwards, bucket and all."""
    build = make_base_build(tmp_path / "output")
    bundle_build(build, euca_cloud, part_size=32 * 1024)
    cloud = publish(build, creds, opts())
    assert len(build.data["bundle"]["image"]["parts"]) > 2
    try:
        yield build, cloud
    finally:
        unpublish(build, creds)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def s3_gets(cloud: Standin, match: str) -> list[str]:
    return [r.path for r in cloud.front.requests if r.service == "s3" and r.method == "GET" and match in r.path]


# --- a second account of the same cloud ----------------------------------------------------

def second_account(cloud: Standin, directory: Path) -> TestIdentity:
    """Another account of `cloud`: its own number, keys and user certificate; the cloud's
    certificate is the cloud's."""
    other = TestIdentity.create(directory)
    return replace(other, cloud_cert=cloud.identity.cloud_cert, cloud_key=cloud.identity.cloud_key,
                   cloud_key_obj=cloud.identity.cloud_key_obj)


def credentials_of(cloud: Standin, who: TestIdentity) -> Credentials:
    env = {"EC2_URL": cloud.ec2_url, "S3_URL": cloud.s3_url, "EC2_ACCESS_KEY": who.access_key,
           "EC2_SECRET_KEY": who.secret_key, "EC2_CERT": str(who.user_cert), "EC2_PRIVATE_KEY": str(who.user_key),
           "EUCALYPTUS_CERT": str(who.cloud_cert), "EC2_USER_ID": who.account_id}
    return load_credentials({}, environ=env)


@contextlib.contextmanager
def acting_as(cloud: Standin, who: TestIdentity) -> Iterator[Credentials]:
    """The stand-in answering as account `who` (what it registers is `who`'s, the buckets
    it creates are `who`'s, manifests must be signed by `who`) until the block ends."""
    front, own = cloud.front, cloud.front.identity
    front.keys[who.access_key] = who.secret_key
    front.identity = who
    try:
        yield credentials_of(cloud, who)
    finally:
        front.identity = own
        front.keys.pop(who.access_key, None)


# --- taking an image back ------------------------------------------------------------------

def test_an_emi_comes_back_byte_for_byte_with_its_kernel_and_ramdisk(euca_cloud, creds, published, tmp_path):
    build, cloud = published
    seen: list[dict] = []
    events.add_listener(seen.append)
    try:
        got = download_image(creds, cloud["image_id"], tmp_path / "dest")
    finally:
        events.remove_listener(seen.append)
    for role, path in (("image", got.image), ("kernel", got.kernel), ("ramdisk", got.ramdisk)):
        assert path is not None and path.parent == tmp_path / "dest"
        assert path.read_bytes() == build.output_path(role).read_bytes(), role
    assert got.image_id == cloud["image_id"]
    assert got.owner == euca_cloud.identity.account_id
    assert got.manifest == cloud["images"]["image"]["manifest_location"]
    assert got.sha256 == hashlib.sha256(build.output_path("image").read_bytes()).hexdigest()
    st = got.image.stat()
    assert st.st_blocks * 512 < st.st_size                  # holes stay holes
    assert files_in(tmp_path / "dest") == sorted(["base.img", "vmlinuz-2.6.32-base", "initrd.img-2.6.32-base"])
    progress = [e for e in seen if e["event"] == "progress" and e["step"] == f"downloading {cloud['image_id']}"]
    total = sum(p["size"] for entry in build.data["bundle"].values() for p in entry["parts"])
    assert progress and progress[-1]["done"] == progress[-1]["total"] == total
    assert progress[-1]["stage"] == "bootstrap" and progress[-1]["unit"] == "bytes"


def test_without_boot_files_only_the_image_is_fetched(euca_cloud, creds, published, tmp_path):
    build, cloud = published
    euca_cloud.clear_log()
    got = download_image(creds, cloud["image_id"], tmp_path / "dest", with_boot=False)
    assert got.kernel is None and got.ramdisk is None
    assert got.image.read_bytes() == build.output_path("image").read_bytes()
    assert files_in(tmp_path / "dest") == ["base.img"]
    assert s3_gets(euca_cloud, "vmlinuz") == [] and s3_gets(euca_cloud, "initrd") == []


def test_a_download_into_a_folder_that_has_files_keeps_them(euca_cloud, creds, published, tmp_path):
    _, cloud = published
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    download_image(creds, cloud["image_id"], dest)
    assert (dest / "notes.txt").read_text() == "mine"
    assert len(files_in(dest)) == 4


# --- refusals ------------------------------------------------------------------------------

def test_an_emi_bundled_with_another_accounts_certificate_is_refused_and_nothing_is_left(
        euca_cloud, creds, published, tmp_path):
    build, cloud = published
    other = second_account(euca_cloud, tmp_path / "other")
    # The other account bundles an image of its own and puts the bundle where this
    # account can read it (as when the owner shares the files), then registers it.
    theirs = bundle_image(build.output_path("image"), tmp_path / "theirs", prefix="theirs.img",
                          user_id=other.account_id, user_cert=other.user_cert, user_key=other.user_key,
                          cloud_cert=other.cloud_cert, part_size=32 * 1024)
    mine = make_clients(creds)
    keys = [f"shared/{p.name}" for p in (*theirs.parts, theirs.manifest)]
    for path, key in zip((*theirs.parts, theirs.manifest), keys):
        upload_file(mine, path, cloud["bucket"], key, opts(), creds)
    location = f"{cloud['bucket']}/shared/theirs.img.manifest.xml"
    emi = None
    try:
        with acting_as(euca_cloud, other) as their_creds:
            emi, _ = register(make_clients(their_creds), location, "theirs", "machine", "x86_64", their_creds,
                              kernel_id=cloud["kernel_id"], ramdisk_id=cloud["ramdisk_id"])
        euca_cloud.clear_log()
        dest = tmp_path / "dest"
        with pytest.raises(BakeError) as e:
            download_image(creds, emi, dest)
        msg = str(e.value)
        assert f"{emi} was bundled with another account's certificate (owner {other.account_id})" in msg
        assert FOREIGN_REFUSAL in msg
        assert not dest.exists()
        assert s3_gets(euca_cloud, "theirs.img.part") == []     # refused before any part was fetched
        # a folder that was there keeps what it had, and only that
        dest.mkdir()
        (dest / "keep").write_text("x")
        with pytest.raises(BakeError, match="another account's certificate"):
            download_image(creds, emi, dest)
        assert files_in(dest) == ["keep"]
    finally:
        if emi:
            with acting_as(euca_cloud, other) as their_creds:
                deregister(make_clients(their_creds), emi, their_creds)
        for key in keys:
            delete_object(mine, cloud["bucket"], key, opts(), creds)


def test_another_accounts_image_in_a_bucket_this_account_may_not_read(euca_cloud, creds, tmp_path):
    other = second_account(euca_cloud, tmp_path / "other")
    theirs = make_base_build(tmp_path / "their-output", "theirs")
    with acting_as(euca_cloud, other) as their_creds:
        cloud = publish(theirs, their_creds, opts())
    try:
        dest = tmp_path / "dest"
        with pytest.raises(BakeError) as e:
            download_image(creds, cloud["image_id"], dest)
        msg = str(e.value)
        assert f"its manifest {cloud['images']['image']['manifest_location']} cannot be read: access denied" in msg
        assert f"belongs to account {other.account_id}" in msg and "ask its owner" in msg
        assert "secret key" not in msg          # not a credentials problem
        assert not dest.exists()
    finally:
        with acting_as(euca_cloud, other) as their_creds:
            unpublish(theirs, their_creds)


@pytest.mark.parametrize("role,kind", [("kernel", "kernel image (EKI)"), ("ramdisk", "ramdisk image (ERI)")])
def test_an_eki_or_eri_given_as_the_emi_is_refused(euca_cloud, creds, published, tmp_path, role, kind):
    _, cloud = published
    image_id = cloud[f"{role}_id"]
    with pytest.raises(BakeError) as e:
        download_image(creds, image_id, tmp_path / "dest")
    assert f"{image_id} is a {kind}, not a machine image: give the EMI" in str(e.value)
    assert not (tmp_path / "dest").exists()


def test_an_unknown_id_is_refused(euca_cloud, creds, tmp_path):
    with pytest.raises(BakeError) as e:
        download_image(creds, "emi-0BADF00D", tmp_path / "dest")
    assert "emi-0BADF00D: no such image in the cloud" in str(e.value)
    assert not (tmp_path / "dest").exists()


def test_a_damaged_part_is_named_and_nothing_is_left(euca_cloud, creds, published, tmp_path):
    _, cloud = published
    s3 = make_clients(creds).s3
    key = f"{cloud['prefix']}/base.img.part.01"
    data = bytearray(s3.get_object(Bucket=cloud["bucket"], Key=key)["Body"].read())
    data[100] ^= 0xFF
    s3.put_object(Bucket=cloud["bucket"], Key=key, Body=bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises(BakeError) as e:
        download_image(creds, cloud["image_id"], dest)
    msg = str(e.value)
    assert f"{cloud['image_id']}: part 1 of its bundle ({cloud['bucket']}/{key}) is damaged" in msg
    assert "uploaded again" in msg
    assert not dest.exists()


def test_a_manifest_edited_in_the_bucket_is_refused_by_its_signature(euca_cloud, creds, published, tmp_path):
    # the parts and their digests untouched: only the signature tells the edit
    _, cloud = published
    assert creds.cert is not None and creds.cert.is_file()
    s3 = make_clients(creds).s3
    key = cloud["images"]["image"]["manifest_location"].split("/", 1)[1]
    text = s3.get_object(Bucket=cloud["bucket"], Key=key)["Body"].read()
    edited = text.replace(b"<architecture>x86_64</architecture>", b"<architecture>i386</architecture>", 1)
    assert edited != text
    s3.put_object(Bucket=cloud["bucket"], Key=key, Body=edited)
    dest = tmp_path / "dest"
    with pytest.raises(BakeError, match="the manifest's signature does not verify with"):
        download_image(creds, cloud["image_id"], dest)
    assert not dest.exists()


def test_a_missing_part_is_named(euca_cloud, creds, published, tmp_path):
    _, cloud = published
    key = f"{cloud['prefix']}/base.img.part.02"
    make_clients(creds).s3.delete_object(Bucket=cloud["bucket"], Key=key)
    with pytest.raises(BakeError) as e:
        download_image(creds, cloud["image_id"], tmp_path / "dest")
    assert f"part 2 of its bundle ({cloud['bucket']}/{key}) is missing from the bucket" in str(e.value)
    assert not (tmp_path / "dest").exists()


def test_a_manifest_gone_or_garbled_cannot_be_read(euca_cloud, creds, published, tmp_path):
    _, cloud = published
    s3 = make_clients(creds).s3
    location = cloud["images"]["image"]["manifest_location"]
    key = location.split("/", 1)[1]
    s3.put_object(Bucket=cloud["bucket"], Key=key, Body=b"<manifest><version>2007-10-10")
    with pytest.raises(BakeError, match=f"its manifest {location} cannot be read: bundle manifest: not well-formed"):
        download_image(creds, cloud["image_id"], tmp_path / "dest")
    s3.delete_object(Bucket=cloud["bucket"], Key=key)
    with pytest.raises(BakeError) as e:
        download_image(creds, cloud["image_id"], tmp_path / "dest")
    assert f"its manifest {location} cannot be read: it is not in the bucket" in str(e.value)
    assert "bake publish" in str(e.value)
    assert not (tmp_path / "dest").exists()


def test_an_interrupt_midway_leaves_the_folder_as_it_was(euca_cloud, creds, published, tmp_path):
    _, cloud = published
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("x")

    def interrupt(event: dict) -> None:
        if event["event"] == "progress":
            raise KeyboardInterrupt

    events.add_listener(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            download_image(creds, cloud["image_id"], dest)
    finally:
        events.remove_listener(interrupt)
    assert files_in(dest) == ["keep"]
    assert s3_gets(euca_cloud, ".part.")       # it was interrupted while downloading


def test_without_a_private_key_it_says_what_to_set(euca_cloud, creds, tmp_path):
    with pytest.raises(BakeError, match="needs your private key to decrypt it: set EC2_PRIVATE_KEY"):
        download_image(replace(creds, private_key=None), "emi-12345678", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
