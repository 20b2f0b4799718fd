"""An independent decode with nothing but the openssl command line and tar: what
ec2-unbundle and the cloud do. Python here only cuts fields out of the manifest text."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bundle_keys import make_credentials

from builder.bundle.writer import bundle_image

OPENSSL = shutil.which("openssl")
TAR = shutil.which("tar")


@pytest.fixture(scope="session")
def creds(tmp_path_factory):
    return make_credentials(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def made(creds, tmp_path_factory):
    """A bundle of several parts of an image that is part noise, part text, part zeros
    (several MiB of them, so that runs of all-zero blocks are compressed as such)."""
    d = tmp_path_factory.mktemp("openssl")
    image = d / "lucid.img"
    noise = b"".join(hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(20000))
    text = b"".join(b"line %d of a config file\n" % i for i in range(20000))
    image.write_bytes(noise + text + bytes(3 * 1024 * 1024 + 300_000) + noise[:12345])  # zeros: whole zero blocks in a row
    result = bundle_image(image, d / "bundle", user_id=creds.account, user_cert=creds.user.cert,
                          user_key=creds.user.key, cloud_cert=creds.cloud.cert, part_size=65536,
                          kernel_id="eki-ABCD1234", ramdisk_id="eri-ABCD1234")
    assert len(result.parts) > 3
    return image, result


def run(argv, **kw) -> bytes:
    assert OPENSSL and TAR, "openssl and tar must be installed (scripts/setup installs them)"
    return subprocess.run(argv, check=True, capture_output=True, **kw).stdout


def field(text: str, tag: str) -> str:
    return re.search(rf"<{tag}(?: [^>]*)?>([^<]*)</{tag}>", text)[1]


def pem_public_key(cert: Path, tmp: Path) -> Path:
    out = tmp / (cert.stem + ".pub.pem")
    out.write_bytes(run([OPENSSL, "x509", "-in", str(cert), "-pubkey", "-noout"]))
    return out


@pytest.mark.parametrize("who", ["user", "ec2"])
def test_openssl_and_tar_alone_decode_the_bundle(creds, made, tmp_path, who):
    image, result = made
    text = result.manifest.read_text()
    key_file = creds.user.key if who == "user" else creds.cloud.key

    # the AES key and IV: RSA PKCS#1 v1.5, the plaintext being 32 hex characters
    secrets = {}
    for what in ("key", "iv"):
        sealed = tmp_path / f"{what}.bin"
        sealed.write_bytes(bytes.fromhex(field(text, f"{who}_encrypted_{what}")))
        secrets[what] = run([OPENSSL, "pkeyutl", "-decrypt", "-inkey", str(key_file), "-in", str(sealed)]).decode()
        assert re.fullmatch(r"[0-9a-f]{32}", secrets[what])

    # each part's SHA-1
    names = re.findall(r"<filename>([^<]+)</filename><digest algorithm='SHA1'>([0-9a-f]{40})</digest>", text)
    assert [n for n, _ in names] == [p.name for p in result.parts]
    for name, digest in names:
        out = run([OPENSSL, "dgst", "-sha1", "-r", str(result.manifest.parent / name)]).decode()
        assert out.split()[0] == digest

    # concatenate, decrypt, gunzip: the tar stream, whose SHA-1 is the manifest's digest
    joined = run(["cat", *(str(result.manifest.parent / n) for n, _ in names)])
    assert len(joined) == int(field(text, "bundled_size"))
    tar_stream = run([OPENSSL, "enc", "-d", "-aes-128-cbc", "-K", secrets["key"], "-iv", secrets["iv"]], input=joined)
    tar_stream = run(["gunzip", "-c"], input=tar_stream)
    assert run([OPENSSL, "dgst", "-sha1", "-r"], input=tar_stream).decode().split()[0] == field(text, "digest")

    # tar: one member, named as the image, identical to the original
    assert run([TAR, "-t"], input=tar_stream).decode().splitlines() == ["lucid.img"]
    out = tmp_path / "x"
    out.mkdir()
    run([TAR, "-x", "-C", str(out)], input=tar_stream)
    assert (out / "lucid.img").read_bytes() == image.read_bytes()
    assert int(field(text, "size")) == image.stat().st_size


def test_openssl_verifies_the_signature_over_the_raw_manifest_bytes(creds, made, tmp_path):
    _, result = made
    raw = result.manifest.read_bytes()
    signed = raw[raw.index(b"<machine_configuration>"):raw.index(b"</machine_configuration>") + 24] \
        + raw[raw.index(b"<image>"):raw.index(b"</image>") + 8]
    (tmp_path / "signed").write_bytes(signed)
    (tmp_path / "sig").write_bytes(bytes.fromhex(field(raw.decode(), "signature")))
    out = run([OPENSSL, "dgst", "-sha1", "-verify", str(pem_public_key(creds.user.cert, tmp_path)),
               "-signature", str(tmp_path / "sig"), str(tmp_path / "signed")])
    assert out.strip() == b"Verified OK"
    # and a stranger's key does not verify it
    bad = subprocess.run([OPENSSL, "dgst", "-sha1", "-verify", str(pem_public_key(creds.stranger.cert, tmp_path)),
                          "-signature", str(tmp_path / "sig"), str(tmp_path / "signed")], capture_output=True)
    assert bad.returncode != 0


def test_the_cloud_stand_ins_own_manifest_check_accepts_the_manifest(creds, made):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from eucalyptus_standin.manifest_check import check_manifest

    _, result = made
    checked = check_manifest(result.manifest.read_bytes(),
                             x509.load_pem_x509_certificate(creds.user.cert.read_bytes()),
                             serialization.load_pem_private_key(creds.cloud.key.read_bytes(), password=None))
    assert (checked.name, checked.image_type, checked.kernel_id, checked.ramdisk_id) == (
        "lucid.img", "machine", "eki-ABCD1234", "eri-ABCD1234")
    assert [f for f, _ in checked.parts] == [p.name for p in result.parts]
