"""What Eucalyptus checks of a bundle manifest when an image is registered: it parses,
its RSA-SHA1 signature over `<machine_configuration>…</machine_configuration><image>…</image>`
verifies against the user's certificate, and `ec2_encrypted_key`/`iv` decrypt with the
cloud's private key. Written independently of the project's bundle code."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


class ManifestRefused(Exception):
    """The manifest fails one of the cloud's checks; the message says which."""


@dataclass
class CheckedManifest:
    name: str
    user: str
    image_type: str
    architecture: str | None
    kernel_id: str | None
    ramdisk_id: str | None
    size: int
    parts: list[tuple[str, str]] = field(default_factory=list)   # (filename, sha1)


def _signed_bytes(raw: bytes) -> bytes:
    text = raw.decode("ascii", "replace")
    mc_start = text.find("<machine_configuration>")
    mc_end = text.find("</machine_configuration>")
    im_start = text.find("<image>")
    im_end = text.find("</image>")
    if im_start < 0 or im_end < 0:
        raise ManifestRefused("manifest has no <image> element")
    mc = text[mc_start:mc_end + len("</machine_configuration>")] if 0 <= mc_start < mc_end else ""
    return (mc + text[im_start:im_end + len("</image>")]).encode("ascii", "replace")


def check_manifest(raw: bytes, user_cert: x509.Certificate, cloud_key: rsa.RSAPrivateKey) -> CheckedManifest:
    """Parse and verify a 2007-10-10 manifest as the cloud does; raise ManifestRefused."""
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise ManifestRefused(f"manifest does not parse: {e}") from None
    if root.tag != "manifest":
        raise ManifestRefused(f"root element is <{root.tag}>, not <manifest>")

    def text(path: str, required: bool = True) -> str | None:
        el = root.find(path)
        if el is None or el.text is None:
            if required:
                raise ManifestRefused(f"manifest lacks {path}")
            return None
        return el.text.strip()

    signature = text("signature")
    try:
        sig = bytes.fromhex(signature or "")
    except ValueError:
        raise ManifestRefused("signature is not hex") from None
    try:
        user_cert.public_key().verify(sig, _signed_bytes(raw), padding.PKCS1v15(), hashes.SHA1())
    except InvalidSignature:
        raise ManifestRefused("manifest signature does not verify against the user's certificate") from None

    for what in ("ec2_encrypted_key", "ec2_encrypted_iv"):
        try:
            plain = cloud_key.decrypt(bytes.fromhex(text(f"image/{what}") or ""), padding.PKCS1v15())
        except ValueError:
            raise ManifestRefused(f"{what} does not decrypt with the cloud's private key") from None
        if not re.fullmatch(rb"[0-9a-fA-F]{32}", plain):
            # PKCS#1 v1.5 decryption with the wrong key yields random bytes (implicit rejection)
            raise ManifestRefused(f"{what} does not decrypt with the cloud's private key (not a 128-bit hex key)")

    name = text("image/name")
    image_type = text("image/type", required=False) or "machine"
    kernel_id = text("machine_configuration/kernel_id", required=False)
    ramdisk_id = text("machine_configuration/ramdisk_id", required=False)
    if kernel_id in ("true", "yes") or (name or "").startswith("vmlinuz"):
        image_type = "kernel" if image_type == "machine" else image_type
    if ramdisk_id in ("true", "yes") or (name or "").startswith("initrd"):
        image_type = "ramdisk" if image_type == "machine" else image_type
    if image_type not in ("machine", "kernel", "ramdisk"):
        raise ManifestRefused(f"unknown image type {image_type!r}")
    parts = []
    for part in root.findall("image/parts/part"):
        fn, dg = part.find("filename"), part.find("digest")
        if fn is None or fn.text is None:
            raise ManifestRefused("a part has no filename")
        parts.append((fn.text.strip(), (dg.text or "").strip() if dg is not None else ""))
    if not parts:
        raise ManifestRefused("manifest lists no parts")
    try:
        size = int(text("image/size") or "0")
    except ValueError:
        raise ManifestRefused("image/size is not a number") from None
    return CheckedManifest(
        name=name or "", user=(text("image/user") or "").replace("-", ""), image_type=image_type,
        architecture=text("machine_configuration/architecture", required=False),
        kernel_id=None if kernel_id in (None, "true", "yes") else kernel_id,
        ramdisk_id=None if ramdisk_id in (None, "true", "yes") else ramdisk_id,
        size=size, parts=parts)
