"""Write a bundle: image → tar (one member) → gzip → AES-128-CBC → 10 MiB parts + manifest.

The image is read once, in 1 MiB blocks, and never copied: the tar stream is made on
the fly (one header, the data, the end blocks), hashed (SHA-1, the manifest's digest),
compressed on several threads, encrypted and cut into parts, each hashed as it is
written. Memory stays constant whatever the image's size. Holes of a sparse image are
read as zeros (the bundle holds one regular tar member, which every reader accepts);
runs of zeros cost almost nothing to compress.

Files are born 0600 in a fresh private directory inside the destination and moved into
place only when the whole bundle is written, the manifest last: a failed run leaves
nothing behind, and a manifest is never seen before its parts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import BinaryIO, Iterator

from builder.core import events
from builder.core.errors import BakeError
from builder.core.log import step
from . import crypto
from .files import create_private, os_errors_as_bake_errors, private_directory
from .gzipstream import ParallelGzip
from .manifest import NAME_RE, Manifest, ManifestPart, render

log = logging.getLogger("bake.bundle")

PART_SIZE = 10 * 1024 * 1024
BLOCK_SIZE = 1024 * 1024
GZIP_LEVEL = 6  # what euca2ools uses (gzip/pigz default); readers do not care
DEFAULT_BLOCK_DEVICE_MAPPING = {"ami": "sda1", "root": "/dev/sda1", "ephemeral0": "sda2", "swap": "sda3"}
ARCHITECTURES = ("i386", "x86_64", "armhf", "ppc", "ppc64", "ppc64le")


@dataclass
class BundleResult:
    """What `bundle_image` wrote."""

    manifest: Path
    parts: list[Path]
    part_sizes: list[int]
    part_digests: list[str]
    name: str
    image_type: str
    arch: str
    size: int  # image bytes
    bundled_size: int  # encrypted bytes, the sum of part_sizes
    digest: str  # SHA-1 of the tar stream
    info: Manifest

    def record(self, base: Path) -> dict:
        """A JSON-ready description, paths relative to `base` (a build directory)."""
        def rel(p: Path) -> str:
            try:
                return str(p.relative_to(base))
            except ValueError:
                return str(p)

        return {
            "manifest": rel(self.manifest),
            "name": self.name,
            "type": self.image_type,
            "arch": self.arch,
            "kernel_id": self.info.kernel_id,
            "ramdisk_id": self.info.ramdisk_id,
            "size": self.size,
            "bundled_size": self.bundled_size,
            "digest": self.digest,
            "parts": [{"path": rel(p), "size": s, "sha1": d}
                      for p, s, d in zip(self.parts, self.part_sizes, self.part_digests, strict=True)],
        }


def account_id(user_id: str) -> str:
    """The 12-digit account id as the manifest wants it (dashes removed)."""
    plain = str(user_id).replace("-", "").strip()
    if not re.fullmatch(r"\d{12}", plain):
        raise BakeError(f"account id {user_id!r}: must be the 12-digit account number (dashes allowed)")
    return plain


def _bundler_version() -> str:
    try:
        return version("bake")
    except Exception:  # not installed as a distribution: a source checkout
        return "0"


def _tar_header(name: str, size: int) -> bytes:
    # What euca2ools writes: one regular member, mtime 0, root-owned, GNU format, so the
    # tar digest depends on nothing but the name and the content.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _tar_stream(f: BinaryIO, name: str, size: int, block: int) -> Iterator[tuple[bytes, bool]]:
    """The tar stream of one member as (chunk, is_last), chunks of `block` bytes but the last."""
    header = _tar_header(name, size)
    used = len(header) + size + (-size) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE
    trailer = bytes((-size) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE + (-used) % tarfile.RECORDSIZE)
    pending = header
    remaining = size
    while True:
        n = min(block - len(pending), remaining)
        data = f.read(n) if n else b""
        if len(data) != n:
            raise BakeError(f"{f.name}: the image shrank while it was being bundled")
        remaining -= n
        chunk = pending + data if pending else data
        pending = b""
        if remaining == 0:
            yield chunk + trailer, True
            return
        yield chunk, False


class _PartWriter:
    """Cuts the encrypted stream into parts of `part_size`, hashing each; a part is only
    created when it has bytes, so there is never an empty last part."""

    def __init__(self, directory: Path, prefix: str, part_size: int):
        self.directory = directory
        self.prefix = prefix
        self.part_size = part_size
        self.names: list[str] = []
        self.sizes: list[int] = []
        self.digests: list[str] = []
        self._f: BinaryIO | None = None
        self._left = 0
        self._sha1 = hashlib.sha1()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._f is None or self._left == 0:
                self._next()
            n = min(self._left, len(view))
            piece = view[:n]
            self._f.write(piece)  # type: ignore[union-attr]
            self._sha1.update(piece)
            self._left -= n
            view = view[n:]

    def _finish_part(self) -> None:
        if self._f is not None:
            self._f.close()
            self.sizes.append(self.part_size - self._left)
            self.digests.append(self._sha1.hexdigest())
            self._f = None

    def _next(self) -> None:
        self._finish_part()
        name = f"{self.prefix}.part.{len(self.names):02d}"
        self._f = create_private(self.directory / name)
        self.names.append(name)
        self._left = self.part_size
        self._sha1 = hashlib.sha1()

    def close(self) -> None:
        self._finish_part()


def _encrypt_into_parts(src: BinaryIO, size: int, directory: Path, prefix: str, key: str, iv: str, *,
                        part_size: int, gzip_level: int, workers: int | None) -> tuple[_PartWriter, str]:
    """Stream `src` through tar, gzip and AES into part files; return them and the tar SHA-1."""
    parts = _PartWriter(directory, prefix, part_size)
    tar_sha1 = hashlib.sha1()
    compressed = 0
    enc = crypto.encryptor(bytes.fromhex(key), bytes.fromhex(iv))
    try:
        read = 0
        with ParallelGzip(gzip_level, workers) as gz:
            for chunk, last in _tar_stream(src, prefix, size, BLOCK_SIZE):
                tar_sha1.update(chunk)
                read += len(chunk)
                events.progress("bundle", f"bundling {prefix}", min(read, size), size, "bytes", final=last)
                for out in gz.write(chunk, final=last):
                    compressed += len(out)
                    parts.write(enc.update(out))
        parts.write(enc.update(crypto.pkcs7_pad(compressed)) + enc.finalize())
    finally:
        parts.close()
    return parts, tar_sha1.hexdigest()


def _check_type(image_type: str, kernel_id: str | None, ramdisk_id: str | None,
                block_device_mapping: dict | None) -> None:
    if image_type == "kernel" and (ramdisk_id or (kernel_id and kernel_id != "true")):
        raise BakeError("a kernel image names no kernel or ramdisk of its own (only --kernel true)")
    if image_type == "ramdisk" and (kernel_id or (ramdisk_id and ramdisk_id != "true")):
        raise BakeError("a ramdisk image names no kernel or ramdisk of its own (only --ramdisk true)")
    if image_type != "machine" and block_device_mapping:
        raise BakeError("block device mappings belong to machine images, not to a " + image_type)


def bundle_image(
    image: Path,
    destination: Path,
    *,
    prefix: str | None = None,
    image_type: str = "machine",
    arch: str = "x86_64",
    user_id: str,
    user_cert: Path,
    user_key: Path,
    cloud_cert: Path,
    kernel_id: str | None = None,
    ramdisk_id: str | None = None,
    block_device_mapping: dict | None = None,
    part_size: int = PART_SIZE,
    gzip_level: int = GZIP_LEVEL,
    workers: int | None = None,
) -> BundleResult:
    """Bundle `image` into `destination` as `<prefix>.part.NN` and `<prefix>.manifest.xml`.

    `prefix` defaults to the image's file name and is also the image name in the
    manifest. `block_device_mapping` None means the usual default for a machine image
    (ami=sda1, root=/dev/sda1, ephemeral0=sda2, swap=sda3) and none for a kernel or
    ramdisk; {} means none. `destination` is created (0700) when missing; it must not
    already hold a bundle with this prefix. Raises BakeError on anything a user can fix.
    """
    image, destination = Path(image), Path(destination)
    prefix = prefix or image.name
    if not NAME_RE.match(prefix) or prefix in (".", ".."):
        raise BakeError(f"prefix {prefix!r}: use only letters, digits, '.', '_' and '-' (it becomes the image name)")
    if image_type not in ("machine", "kernel", "ramdisk"):
        raise BakeError(f"image type {image_type!r}: must be machine, kernel or ramdisk")
    if arch not in ARCHITECTURES:
        raise BakeError(f"architecture {arch!r}: must be one of {', '.join(ARCHITECTURES)}")
    if part_size < crypto.AES_BLOCK:
        raise BakeError(f"part size {part_size}: too small")
    _check_type(image_type, kernel_id, ramdisk_id, block_device_mapping)
    if block_device_mapping is None:
        block_device_mapping = dict(DEFAULT_BLOCK_DEVICE_MAPPING) if image_type == "machine" else {}
    user = account_id(user_id)

    user_public = crypto.load_certificate_key(user_cert)
    cloud_public = crypto.load_certificate_key(cloud_cert)
    private = crypto.load_private_key(user_key)
    if not crypto.same_key(user_public, private):
        raise BakeError(f"{user_cert}: this certificate does not belong to the private key given with it")

    try:
        # closed by the `with src:` below; opened apart so that only open's error is the BakeError
        src = open(image, "rb")  # noqa: SIM115
    except OSError as e:
        raise BakeError(f"{image}: cannot read the image ({e.strerror})") from None
    with src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BakeError(f"{image}: not a regular file")
        size = st.st_size

        private_directory(destination)
        manifest_path = destination / f"{prefix}.manifest.xml"
        clash = [p for p in [manifest_path, *destination.glob(f"{prefix}.part.*")] if p.exists()]
        if clash:
            raise BakeError(f"{destination}: already holds a bundle named {prefix} ({clash[0].name}); "
                            "remove it or choose another destination or prefix")
        with os_errors_as_bake_errors(f"writing into {destination}"):
            stage = Path(tempfile.mkdtemp(prefix=f".{prefix}.", suffix=".partial", dir=destination))
        try:
            with os_errors_as_bake_errors(f"writing the bundle in {destination}"), \
                    step(f"Bundling {image.name} ({image_type}, {size} bytes)"):
                key, iv = os.urandom(16).hex(), os.urandom(16).hex()
                parts, digest = _encrypt_into_parts(src, size, stage, prefix, key, iv,
                                                    part_size=part_size, gzip_level=gzip_level, workers=workers)
                info = Manifest(
                    name=prefix, user=user, image_type=image_type, arch=arch,
                    digest=digest, size=size, bundled_size=sum(parts.sizes),
                    ec2_encrypted_key=crypto.wrap(cloud_public, key),
                    user_encrypted_key=crypto.wrap(user_public, key),
                    ec2_encrypted_iv=crypto.wrap(cloud_public, iv),
                    user_encrypted_iv=crypto.wrap(user_public, iv),
                    parts=[ManifestPart(i, n, d)
                           for i, (n, d) in enumerate(zip(parts.names, parts.digests, strict=True))],
                    kernel_id=kernel_id, ramdisk_id=ramdisk_id,
                    block_device_mapping=dict(block_device_mapping),
                    kernel_name=prefix if image_type == "kernel" else None,
                    bundler_version=_bundler_version(),
                )
                text = render(info, lambda data: crypto.sign(private, data))
                with create_private(stage / manifest_path.name) as f:
                    f.write(text)
                for name in parts.names:
                    os.rename(stage / name, destination / name)
                os.rename(stage / manifest_path.name, manifest_path)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    log.info("bundled %s: %d part(s), %d → %d bytes", image.name, len(parts.names), size, info.bundled_size)
    return BundleResult(
        manifest=manifest_path,
        parts=[destination / n for n in parts.names],
        part_sizes=list(parts.sizes),
        part_digests=list(parts.digests),
        name=prefix, image_type=image_type, arch=arch, size=size,
        bundled_size=info.bundled_size, digest=info.digest, info=info,
    )
