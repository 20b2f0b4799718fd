"""Bundling then unbundling gives back the very image, for the sizes at the format's edges,
for a sparse 1 GiB image, and with either key that can open a bundle; and the reader
takes bundles written the way other tools write them."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from bundle_forge import forge_bundle
from bundle_keys import make_credentials

from builder.bundle.manifest import parse
from builder.bundle.reader import unbundle
from builder.bundle.writer import PART_SIZE, bundle_image
from builder.core.errors import BakeError

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def creds(tmp_path_factory):
    return make_credentials(tmp_path_factory.mktemp("keys"))


def image_data(size: int, seed: int = 1) -> bytes:
    """Incompressible bytes, so the bundle is about as large as the image and sizes near
    a part boundary really cross it."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def bundle(creds, image: Path, dest: Path, **kw):
    return bundle_image(image, dest, user_id=creds.account, user_cert=creds.user.cert, user_key=creds.user.key,
                        cloud_cert=creds.cloud.cert, **kw)


def file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("size", [0, 1, 16, 10 * MiB, 10 * MiB + 1], ids=["0", "1", "16", "10MiB", "10MiB+1"])
def test_round_trip_gives_back_the_identical_image(creds, tmp_path, size):
    image = tmp_path / "disk.img"
    image.write_bytes(image_data(size))
    result = bundle(creds, image, tmp_path / "bundle")

    assert result.size == size
    assert result.bundled_size == sum(p.stat().st_size for p in result.parts) == sum(result.part_sizes)
    assert result.bundled_size % 16 == 0
    assert all(s == PART_SIZE for s in result.part_sizes[:-1]) and 0 < result.part_sizes[-1] <= PART_SIZE
    assert [p.name for p in result.parts] == [f"disk.img.part.{i:02d}" for i in range(len(result.parts))]
    if size > 10 * MiB:
        assert len(result.parts) == 2  # incompressible data: the bundle crosses a part boundary

    back = unbundle(result.manifest, private_key=creds.user.key, source_dir=None,
                    destination=tmp_path / "back", cert=creds.user.cert)
    assert back == tmp_path / "back" / "disk.img"
    assert back.read_bytes() == image.read_bytes()


def test_cloud_key_opens_the_bundle_too(creds, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(image_data(100_000))
    result = bundle(creds, image, tmp_path / "bundle", part_size=16384)
    back = unbundle(result.manifest, private_key=creds.cloud.key, source_dir=tmp_path / "bundle",
                    destination=tmp_path / "back")
    assert back.read_bytes() == image.read_bytes()


@pytest.mark.slow
def test_sparse_1gib_image_round_trips_and_comes_back_sparse(creds, tmp_path):
    image = tmp_path / "sparse.img"
    marks = {0: b"boot sector", 300 * MiB + 5: image_data(3 * MiB, seed=7), (1 << 30) - 7: b"the end"}
    with open(image, "wb") as f:
        f.truncate(1 << 30)
        for offset, data in marks.items():
            f.seek(offset)
            f.write(data)
    assert image.stat().st_blocks * 512 < 64 * MiB  # really sparse to begin with

    result = bundle(creds, image, tmp_path / "bundle")
    assert result.size == 1 << 30
    assert result.bundled_size < 8 * MiB  # holes compress to almost nothing

    back = unbundle(result.manifest, private_key=creds.user.key, source_dir=None, destination=tmp_path / "back")
    assert back.stat().st_size == 1 << 30
    assert back.stat().st_blocks * 512 < 64 * MiB  # zeros written back as holes
    assert file_sha1(back) == file_sha1(image)


def test_exact_multiple_of_the_part_size_makes_no_empty_part(creds, tmp_path):
    # Find an image whose bundle is an exact multiple of the part size: ciphertext of
    # incompressible data grows by a fixed overhead, so aim at 3 parts of 4096 exactly.
    image = tmp_path / "disk.img"
    for size in range(12288 - 200, 12288):
        image.write_bytes(image_data(size, seed=size))
        dest = tmp_path / f"b{size}"
        result = bundle(creds, image, dest, part_size=4096)
        if result.bundled_size == 3 * 4096:
            break
    else:
        pytest.fail("no size gave a bundle of exactly three parts")
    assert result.part_sizes == [4096, 4096, 4096]
    assert unbundle(result.manifest, private_key=creds.user.key, source_dir=None,
                    destination=tmp_path / "back").read_bytes() == image.read_bytes()


def test_output_files_are_private(creds, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(image_data(50_000))
    result = bundle(creds, image, tmp_path / "new" / "bundle", part_size=8192)
    assert stat.S_IMODE((tmp_path / "new" / "bundle").stat().st_mode) == 0o700
    for path in [result.manifest, *result.parts]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert sorted(p.name for p in (tmp_path / "new" / "bundle").iterdir()) == sorted(
        [result.manifest.name, *(p.name for p in result.parts)])  # nothing else left behind
    back = unbundle(result.manifest, private_key=creds.user.key, source_dir=None, destination=tmp_path / "back")
    assert stat.S_IMODE(back.stat().st_mode) == 0o600


def test_key_files_are_not_copied_into_the_bundle(creds, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(image_data(5000))
    result = bundle(creds, image, tmp_path / "bundle")
    key_text = creds.user.key.read_bytes()
    body = b"".join(l for l in key_text.splitlines() if not l.startswith(b"-----"))
    for path in [result.manifest, *result.parts]:
        assert body[:40] not in path.read_bytes()


def _tar_of(name: str, data: bytes, *, fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=fmt) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("style", [
    dict(quote="'", declaration="ec2-ami-tools", part_names="%d"),
    dict(quote='"', declaration="euca2ools-3", part_names="%02d"),
    dict(quote='"', declaration="euca2ools-2", part_names="%02d"),
    dict(quote='"', declaration="none", part_names="%d", empty_last_part=True),
], ids=["ec2-ami-tools", "euca2ools-3", "euca2ools-2", "zero-length-last-part"])
def test_reader_takes_bundles_as_other_tools_write_them(creds, tmp_path, style):
    data = image_data(20_000)
    manifest = forge_bundle(_tar_of("other.img", data), tmp_path / "b", name="other.img", size=len(data),
                            user_cert=creds.user.cert, user_key=creds.user.key, cloud_cert=creds.cloud.cert, **style)
    back = unbundle(manifest, private_key=creds.user.key, source_dir=None, destination=tmp_path / "back",
                    cert=creds.user.cert)
    assert back.read_bytes() == data


def test_reader_takes_a_gnu_sparse_member_as_ec2_ami_tools_writes_for_sparse_files(creds, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "vol.img"
    with open(sparse, "wb") as f:
        f.truncate(40 * MiB)
        f.seek(20 * MiB)
        f.write(b"data in the middle")
    stream = subprocess.run(["tar", "-c", "-S", "--owner", "0", "--group", "0", "-C", str(src), "vol.img"],
                            check=True, capture_output=True).stdout
    assert len(stream) < MiB  # the holes are not in the tar stream
    manifest = forge_bundle(stream, tmp_path / "b", name="vol.img", size=40 * MiB, part_size=65536,
                            user_cert=creds.user.cert, user_key=creds.user.key, cloud_cert=creds.cloud.cert)
    back = unbundle(manifest, private_key=creds.user.key, source_dir=None, destination=tmp_path / "back")
    assert file_sha1(back) == file_sha1(sparse)


def test_manifest_says_what_the_publisher_needs(creds, tmp_path):
    image = tmp_path / "vmlinuz-2.6.32"
    image.write_bytes(image_data(30_000))
    result = bundle(creds, image, tmp_path / "bundle", image_type="kernel", kernel_id="true", part_size=8192,
                    arch="i386")
    m = parse(result.manifest.read_bytes())
    assert (m.name, m.image_type, m.arch, m.kernel_id, m.ramdisk_id) == ("vmlinuz-2.6.32", "kernel", "i386", "true", None)
    assert m.block_device_mapping == {}
    assert [p.filename for p in m.parts] == [p.name for p in result.parts]
    assert [p.sha1 for p in m.parts] == result.part_digests
    assert (m.size, m.bundled_size, m.digest) == (result.size, result.bundled_size, result.digest)
    assert m.user == "123456789012"
    assert os.path.getsize(result.manifest) == len(result.manifest.read_bytes())


def test_existing_bundle_of_the_same_name_is_not_overwritten(creds, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(image_data(3000))
    first = bundle(creds, image, tmp_path / "bundle")
    before = first.manifest.read_bytes()
    with pytest.raises(BakeError, match=r"already holds a bundle named disk.img"):
        bundle(creds, image, tmp_path / "bundle")
    assert first.manifest.read_bytes() == before
    other = bundle(creds, image, tmp_path / "bundle", prefix="disk-2")  # another prefix sits beside it
    assert other.manifest.name == "disk-2.manifest.xml"


def test_destination_that_is_a_file_is_refused(creds, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"x")
    (tmp_path / "file").write_text("")
    with pytest.raises(BakeError, match=r"file: not a directory"):
        bundle(creds, image, tmp_path / "file")


def test_mismatched_certificate_and_key_are_refused_before_any_work(creds, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"x")
    with pytest.raises(BakeError, match=r"user-cert.pem: this certificate does not belong to the private key"):
        bundle_image(image, tmp_path / "b", user_id=creds.account, user_cert=creds.user.cert,
                     user_key=creds.stranger.key, cloud_cert=creds.cloud.cert)
    assert not (tmp_path / "b").exists()
