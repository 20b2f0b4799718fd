"""A tampered, truncated or foreign bundle is refused, and the error names the first
thing that does not match; nothing is left in the destination."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from bundle_keys import make_credentials

from builder.bundle.reader import unbundle
from builder.bundle.writer import bundle_image
from builder.core.errors import BakeError

PART = 16384


@pytest.fixture(scope="session")
def creds(tmp_path_factory):
    return make_credentials(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def pristine(creds, tmp_path_factory):
    """A bundle of five parts, made once; each test tampers with its own copy."""
    d = tmp_path_factory.mktemp("pristine")
    image = d / "disk.img"
    image.write_bytes(b"".join(hashlib.sha512(str(i).encode()).digest() for i in range(1100)))  # 70 400 bytes
    result = bundle_image(image, d / "bundle", user_id=creds.account, user_cert=creds.user.cert,
                          user_key=creds.user.key, cloud_cert=creds.cloud.cert, part_size=PART)
    assert len(result.parts) == 5
    return d / "bundle"


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    d = tmp_path / "bundle"
    shutil.copytree(pristine, d)
    return d


def manifest_of(d: Path) -> Path:
    return d / "disk.img.manifest.xml"


def refused(creds, d: Path, message: str, *, key=None, cert=None, tmp: Path) -> None:
    dest = tmp / "out"
    with pytest.raises(BakeError, match=message):
        unbundle(manifest_of(d), private_key=key or creds.user.key, source_dir=None, destination=dest, cert=cert)
    assert not dest.exists() or list(dest.iterdir()) == []


def edit_manifest(d: Path, old: str, new: str) -> None:
    m = manifest_of(d)
    text = m.read_text()
    assert old in text
    m.write_text(text.replace(old, new, 1))


def test_pristine_copy_unbundles(creds, bundle, tmp_path):
    out = unbundle(manifest_of(bundle), private_key=creds.user.key, source_dir=None,
                   destination=tmp_path / "out", cert=creds.user.cert)
    assert out.stat().st_size == 70400


@pytest.mark.parametrize("index", [0, 2, 4])
def test_flipped_byte_in_a_part_names_that_part(creds, bundle, tmp_path, index):
    part = bundle / f"disk.img.part.{index:02d}"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    refused(creds, bundle, rf"part {index} \(.*disk\.img\.part\.{index:02d}\) does not match the manifest", tmp=tmp_path)


def test_flipped_bytes_in_two_parts_name_the_first(creds, bundle, tmp_path):
    for index in (1, 3):
        part = bundle / f"disk.img.part.{index:02d}"
        data = bytearray(part.read_bytes())
        data[10] ^= 0xFF
        part.write_bytes(bytes(data))
    refused(creds, bundle, r"part 1 \(", tmp=tmp_path)


def test_missing_part_is_named(creds, bundle, tmp_path):
    (bundle / "disk.img.part.03").unlink()
    refused(creds, bundle, r"part 3 \(disk\.img\.part\.03\) is missing from .*incomplete", tmp=tmp_path)


def test_truncated_last_part_is_named(creds, bundle, tmp_path):
    last = bundle / "disk.img.part.04"
    last.write_bytes(last.read_bytes()[:-16])
    refused(creds, bundle, r"part 4 \(.*\) does not match the manifest.*truncated", tmp=tmp_path)


def test_swapped_parts_are_named(creds, bundle, tmp_path):
    a, b = bundle / "disk.img.part.01", bundle / "disk.img.part.02"
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    refused(creds, bundle, r"part 1 \(", tmp=tmp_path)


def test_edited_manifest_fails_its_signature(creds, bundle, tmp_path):
    edit_manifest(bundle, "<architecture>x86_64</architecture>", "<architecture>i386</architecture>")
    refused(creds, bundle, r"signature does not verify .*edited", cert=creds.user.cert, tmp=tmp_path)


def test_signature_by_another_key_is_refused(creds, bundle, tmp_path):
    refused(creds, bundle, r"signature does not verify", cert=creds.stranger.cert, tmp=tmp_path)


def test_edited_size_is_named_without_a_certificate(creds, bundle, tmp_path):
    edit_manifest(bundle, "<size>70400</size>", "<size>70401</size>")
    refused(creds, bundle, r"image is 70400 bytes but the manifest's <size> says 70401", tmp=tmp_path)


def test_edited_image_digest_is_named(creds, bundle, tmp_path):
    digest = re.search(r"<digest algorithm='SHA1'>([0-9a-f]{40})</digest><size>", manifest_of(bundle).read_text())[1]
    edit_manifest(bundle, digest, "0" * 40)
    refused(creds, bundle, r"tar stream's SHA-1 is [0-9a-f]{40} but the manifest's <digest> says 0{40}", tmp=tmp_path)


def test_edited_part_digest_is_named(creds, bundle, tmp_path):
    digest = re.search(r"<filename>disk.img.part.02</filename><digest algorithm='SHA1'>([0-9a-f]{40})<",
                       manifest_of(bundle).read_text())[1]
    edit_manifest(bundle, digest, "f" * 40)
    refused(creds, bundle, r"part 2 \(.*\) does not match the manifest: SHA-1 [0-9a-f]{40}, manifest says f{40}",
            tmp=tmp_path)


def test_edited_bundled_size_is_named(creds, bundle, tmp_path):
    size = re.search(r"<bundled_size>(\d+)</bundled_size>", manifest_of(bundle).read_text())[1]
    edit_manifest(bundle, f"<bundled_size>{size}<", f"<bundled_size>{int(size) + 16}<")
    refused(creds, bundle, rf"<bundled_size> says {int(size) + 16} bytes but the parts hold {size}", tmp=tmp_path)


def test_dropped_part_element_is_caught_by_the_count(creds, bundle, tmp_path):
    text = manifest_of(bundle).read_text()
    text = re.sub(r"<part index='4'>.*?</part>", "", text)
    manifest_of(bundle).write_text(text)
    refused(creds, bundle, r"<parts count='5'> but 4 <part> elements", tmp=tmp_path)


def test_wrong_private_key_is_refused(creds, bundle, tmp_path):
    refused(creds, bundle, r"stranger-pk\.pem: this private key cannot open the bundle.*wrong key",
            key=creds.stranger.key, tmp=tmp_path)


def test_parts_of_another_bundle_are_refused(creds, bundle, pristine, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(bytes(70400))
    result = bundle_image(other, tmp_path / "other", prefix="disk.img", user_id=creds.account,
                          user_cert=creds.user.cert, user_key=creds.user.key, cloud_cert=creds.cloud.cert,
                          part_size=PART)
    shutil.copy(result.parts[0], bundle / "disk.img.part.00")
    refused(creds, bundle, r"part 0 \(", tmp=tmp_path)


def test_not_a_manifest_is_refused(creds, bundle, tmp_path):
    manifest_of(bundle).write_text("<html><body>403</body></html>")
    refused(creds, bundle, r"not a bundle manifest: root element is <html>", tmp=tmp_path)


def test_manifest_pointing_outside_its_directory_is_refused(creds, bundle, tmp_path):
    edit_manifest(bundle, "<filename>disk.img.part.00</filename>", "<filename>../../etc/passwd</filename>")
    refused(creds, bundle, r"part file name '\.\./\.\./etc/passwd' is not a plain file name", tmp=tmp_path)
