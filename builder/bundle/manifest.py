"""The bundle manifest (version 2007-10-10): the only place that knows its XML.

Written byte for byte in the form ec2-ami-tools writes, the most widely accepted one:
`<?xml version='1.0'?>` then the whole document on one line, single-quoted attributes,
`<type>` right after `<user>`, block device mappings (`virtual` then `device`, sorted)
before `kernel_id`/`ramdisk_id`. The signature covers the exact bytes written for
`<machine_configuration>…</machine_configuration><image>…</image>`, so the text is
never re-serialised once signed.

Reading is tolerant: any XML declaration, single or double quotes, any part names,
parts ordered by their `index`.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable
from xml.sax.saxutils import escape

from builder.core.errors import BakeError

VERSION = "2007-10-10"
DIGEST_ALGORITHM = "SHA1"
CIPHER_ALGORITHM = "AES-128-CBC"
IMAGE_TYPES = ("machine", "kernel", "ramdisk")
XML_DECLARATION = b"<?xml version='1.0'?>"
# Names travel through S3 keys and Java verifiers that use the platform charset.
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class ManifestPart:
    """One encrypted part: its file name (relative to the manifest) and SHA-1."""

    index: int
    filename: str
    sha1: str


@dataclass
class Manifest:
    """Everything a 2007-10-10 manifest says about a bundle."""

    name: str
    user: str
    image_type: str
    arch: str
    digest: str  # SHA-1 of the uncompressed tar stream
    size: int  # image bytes
    bundled_size: int  # encrypted bytes = sum of the parts' sizes
    ec2_encrypted_key: str
    ec2_encrypted_iv: str
    user_encrypted_key: str
    user_encrypted_iv: str
    parts: list[ManifestPart]
    kernel_id: str | None = None
    ramdisk_id: str | None = None
    block_device_mapping: dict[str, str] = field(default_factory=dict)
    product_codes: list[str] = field(default_factory=list)
    kernel_name: str | None = None
    ancestor_ami_ids: list[str] = field(default_factory=list)
    bundler_name: str = "bake"
    bundler_version: str = "0"
    bundler_release: str = "0"
    version: str = VERSION
    signature: str = ""
    # The raw bytes the signature covers, as found in (or written to) the file.
    signed_bytes: bytes = b""


# --- writing ----------------------------------------------------------------------------

def _el(tag: str, text: str | int, attrs: dict[str, str] | None = None) -> str:
    a = "".join(f" {k}='{escape(str(v), _APOS)}'" for k, v in (attrs or {}).items())
    return f"<{tag}{a}>{escape(str(text))}</{tag}>"


_APOS = {"'": "&apos;"}


def _machine_configuration(m: Manifest) -> str:
    out = [_el("architecture", m.arch)]
    if m.block_device_mapping:
        out.append("<block_device_mapping>")
        for virtual in sorted(m.block_device_mapping):
            out.append("<mapping>" + _el("virtual", virtual) + _el("device", m.block_device_mapping[virtual])
                       + "</mapping>")
        out.append("</block_device_mapping>")
    if m.kernel_id:
        out.append(_el("kernel_id", m.kernel_id))
    if m.ramdisk_id:
        out.append(_el("ramdisk_id", m.ramdisk_id))
    if m.product_codes:
        out.append("<product_codes>" + "".join(_el("product_code", c) for c in m.product_codes) + "</product_codes>")
    return "<machine_configuration>" + "".join(out) + "</machine_configuration>"


def _image(m: Manifest) -> str:
    out = [_el("name", m.name), _el("user", m.user), _el("type", m.image_type)]
    if m.kernel_name:
        out.append(_el("kernel_name", m.kernel_name))
    if m.ancestor_ami_ids:
        out.append("<ancestry>" + "".join(_el("ancestor_ami_id", a) for a in m.ancestor_ami_ids) + "</ancestry>")
    out += [
        _el("digest", m.digest, {"algorithm": DIGEST_ALGORITHM}),
        _el("size", m.size),
        _el("bundled_size", m.bundled_size),
        _el("ec2_encrypted_key", m.ec2_encrypted_key, {"algorithm": CIPHER_ALGORITHM}),
        _el("user_encrypted_key", m.user_encrypted_key, {"algorithm": CIPHER_ALGORITHM}),
        _el("ec2_encrypted_iv", m.ec2_encrypted_iv),
        _el("user_encrypted_iv", m.user_encrypted_iv),
        f"<parts count='{len(m.parts)}'>",
    ]
    for p in m.parts:
        out.append(f"<part index='{p.index}'>" + _el("filename", p.filename)
                   + _el("digest", p.sha1, {"algorithm": DIGEST_ALGORITHM}) + "</part>")
    out.append("</parts>")
    return "<image>" + "".join(out) + "</image>"


def render(m: Manifest, sign: Callable[[bytes], str]) -> bytes:
    """The manifest file's bytes, signed by `sign` (signed bytes → lowercase hex).

    Sets `m.signature` and `m.signed_bytes` to what was written.
    """
    if m.image_type not in IMAGE_TYPES:
        raise BakeError(f"image type {m.image_type!r}: must be one of {', '.join(IMAGE_TYPES)}")
    for what, value in (("image name", m.name), *(("part file name", p.filename) for p in m.parts)):
        if not NAME_RE.match(value):
            raise BakeError(f"{what} {value!r}: use only letters, digits, '.', '_' and '-'")
    try:
        signed = (_machine_configuration(m) + _image(m)).encode("ascii")
    except UnicodeEncodeError as e:
        bad, around = e.object[e.start:e.end], e.object[max(0, e.start - 30):e.end + 10]
        raise BakeError(f"manifest values must be ASCII: {bad!r} in {around!r}") from None
    m.signed_bytes = signed
    m.signature = sign(signed)
    head = ("<manifest>" + _el("version", m.version) + "<bundler>" + _el("name", m.bundler_name)
            + _el("version", m.bundler_version) + _el("release", m.bundler_release) + "</bundler>")
    tail = "<signature>" + m.signature + "</signature></manifest>"
    return XML_DECLARATION + head.encode("ascii") + signed + tail.encode("ascii")


# --- reading ----------------------------------------------------------------------------

def signed_portion(data: bytes) -> bytes:
    """The bytes a manifest's signature covers: the raw text from `<machine_configuration>`
    to its end tag, then from `<image>` to its end tag, exactly as the verifiers in
    Eucalyptus cut them out of the file."""
    def cut(tag: bytes) -> bytes:
        start = data.find(b"<" + tag + b">")
        if start < 0:
            return b""
        end = data.find(b"</" + tag + b">", start)
        if end < 0:
            return b""
        return data[start:end + len(tag) + 3]

    return cut(b"machine_configuration") + cut(b"image")


def _text(root: ET.Element, path: str, *, required: bool = True) -> str | None:
    el = root.find(path)
    if el is None or el.text is None or not el.text.strip():
        if required:
            raise BakeError(f"not a complete bundle manifest: no <{path.replace('/', '><')}>")
        return None
    return el.text.strip()


def _int(root: ET.Element, path: str) -> int:
    value = _text(root, path)
    try:
        n = int(value)  # type: ignore[arg-type]
    except ValueError:
        raise BakeError(f"bundle manifest: <{path}> is {value!r}, not a number") from None
    if n < 0:
        raise BakeError(f"bundle manifest: <{path}> is negative")
    return n


def parse(data: bytes) -> Manifest:
    """Read a manifest's bytes; a BakeError says what is missing or malformed."""
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise BakeError("bundle manifest: document type declarations are not allowed in a manifest")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise BakeError(f"bundle manifest: not well-formed XML ({e})") from None
    if root.tag != "manifest":
        raise BakeError(f"not a bundle manifest: root element is <{root.tag}>, not <manifest>")
    version = _text(root, "version")
    if version != VERSION:
        raise BakeError(f"bundle manifest version {version!r} is not supported (only {VERSION})")
    digest_el = root.find("image/digest")
    algorithm = (digest_el.get("algorithm") if digest_el is not None else None) or DIGEST_ALGORITHM
    if algorithm.upper() != DIGEST_ALGORITHM:
        raise BakeError(f"bundle manifest: digest algorithm {algorithm!r} is not supported (only SHA1)")

    parts_el = root.find("image/parts")
    if parts_el is None:
        raise BakeError("not a complete bundle manifest: no <image><parts>")
    parts: list[ManifestPart] = []
    for el in parts_el.findall("part"):
        try:
            index = int(el.get("index", ""))
        except ValueError:
            raise BakeError(f"bundle manifest: part with index {el.get('index')!r}, not a number") from None
        filename = _text(el, "filename")
        sha1 = (_text(el, "digest") or "").lower()
        if not NAME_RE.match(filename or "") or filename in (".", ".."):
            raise BakeError(f"bundle manifest: part file name {filename!r} is not a plain file name")
        if not re.fullmatch(r"[0-9a-f]{40}", sha1):
            raise BakeError(f"bundle manifest: part {index} digest {sha1!r} is not a SHA-1")
        parts.append(ManifestPart(index, filename, sha1))  # type: ignore[arg-type]
    parts.sort(key=lambda p: p.index)
    if [p.index for p in parts] != list(range(len(parts))):
        raise BakeError(f"bundle manifest: part indexes {[p.index for p in parts]} are not 0..{len(parts) - 1}")
    count = parts_el.get("count")
    if count is not None and count.strip() != str(len(parts)):
        raise BakeError(f"bundle manifest: <parts count={count!r}> but {len(parts)} <part> elements")

    name = _text(root, "image/name")
    if not NAME_RE.match(name or "") or name in (".", ".."):
        raise BakeError(f"bundle manifest: image name {name!r} is not a plain file name")
    bdm = {}
    for mapping in root.findall("machine_configuration/block_device_mapping/mapping"):
        virtual, device = _text(mapping, "virtual", required=False), _text(mapping, "device", required=False)
        if virtual and device:
            bdm[virtual] = device
    return Manifest(
        name=name,  # type: ignore[arg-type]
        user=_text(root, "image/user", required=False) or "",
        image_type=_text(root, "image/type", required=False) or "machine",
        arch=_text(root, "machine_configuration/architecture", required=False) or "",
        digest=(_text(root, "image/digest") or "").lower(),
        size=_int(root, "image/size"),
        bundled_size=_int(root, "image/bundled_size"),
        ec2_encrypted_key=_text(root, "image/ec2_encrypted_key", required=False) or "",
        ec2_encrypted_iv=_text(root, "image/ec2_encrypted_iv", required=False) or "",
        user_encrypted_key=_text(root, "image/user_encrypted_key", required=False) or "",
        user_encrypted_iv=_text(root, "image/user_encrypted_iv", required=False) or "",
        parts=parts,
        kernel_id=_text(root, "machine_configuration/kernel_id", required=False),
        ramdisk_id=_text(root, "machine_configuration/ramdisk_id", required=False),
        block_device_mapping=bdm,
        product_codes=[e.text.strip() for e in root.findall("machine_configuration/product_codes/product_code")
                       if e.text],
        kernel_name=_text(root, "image/kernel_name", required=False),
        ancestor_ami_ids=[e.text.strip() for e in root.findall("image/ancestry/ancestor_ami_id") if e.text],
        bundler_name=_text(root, "bundler/name", required=False) or "",
        bundler_version=_text(root, "bundler/version", required=False) or "",
        bundler_release=_text(root, "bundler/release", required=False) or "",
        version=version,
        signature=(_text(root, "signature", required=False) or "").lower(),
        signed_bytes=signed_portion(data),
    )
