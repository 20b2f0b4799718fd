"""Read a bundle back: check it, decrypt, gunzip, untar, and write the image.

Checks, in the order a person would want to hear about them: the manifest is readable;
its signature verifies (when a certificate is given); every part file is there; the
private key opens the bundle's AES key; each part's SHA-1 (checked as the part is read,
and, should the data be undecodable midway, by finishing the part's digest first, so a
corrupt part is named rather than a gzip error); the total encrypted size; the tar
stream's SHA-1; the image size. The first that fails is the error raised. Everything
streams through in bounded memory; zero runs are written as holes, so a sparse image
comes back sparse. The image appears at its final path only when every check passed.

A bundle comes from outside: the manifest's <size> is an upper bound on what it may
write, and so is BAKE_MAX_IMAGE_SIZE (`limits`). A manifest declaring more than the cap
is refused before any part is read, a tar member declaring more than <size> before any
of it is written, and a stream inflating past <size> and tar's headers as soon as it
does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import padding as sympadding

from builder.core import limits
from builder.core.errors import BakeError
from builder.core.log import step
from . import crypto
from .files import os_errors_as_bake_errors, private_directory
from .manifest import Manifest, ManifestPart, parse

log = logging.getLogger("bake.bundle")

CHUNK = 1024 * 1024
TAR_HEADROOM = 64 * 1024    # tar's headers, long names, end blocks and record padding around the image


def read_manifest(path: Path) -> Manifest:
    """Parse the manifest file at `path`; BakeError names the file and the problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BakeError(f"{path}: cannot read the manifest ({e.strerror})") from None
    try:
        return parse(data)
    except BakeError as e:
        raise BakeError(f"{path}: {e}") from None


class PartMismatch(BakeError):
    """A part file differs from what the manifest says of it."""


class _Parts:
    """The encrypted stream, read part after part, each part's SHA-1 checked at its end."""

    def __init__(self, parts: list[ManifestPart], directory: Path):
        self.parts = parts
        self.directory = directory
        self.total = 0
        self._i = -1
        self._f: BinaryIO | None = None
        self._sha1 = hashlib.sha1()

    def path(self, part: ManifestPart) -> Path:
        return self.directory / part.filename

    def _check(self) -> None:
        part = self.parts[self._i]
        got = self._sha1.hexdigest()
        if got != part.sha1:
            raise PartMismatch(f"part {part.index} ({self.path(part)}) does not match the manifest: "
                            f"SHA-1 {got}, manifest says {part.sha1} (corrupt or truncated part)")

    def read(self) -> bytes:
        """The next chunk of ciphertext; b"" at the end of the last part."""
        while True:
            if self._f is not None:
                data = self._f.read(CHUNK)
                if data:
                    self._sha1.update(data)
                    self.total += len(data)
                    return data
                self._f.close()
                self._f = None
                self._check()
            if self._i + 1 >= len(self.parts):
                return b""
            self._i += 1
            self._sha1 = hashlib.sha1()
            path = self.path(self.parts[self._i])
            try:
                # held across read() calls, one part at a time: closed above when the part
                # is read through, or by close()
                self._f = open(path, "rb")  # noqa: SIM115
            except OSError as e:
                raise BakeError(f"part {self._i} ({path}): cannot read it ({e.strerror})") from None

    def check_rest(self) -> None:
        """Finish checking the digests of the part being read and of every later part."""
        while self.read():
            pass

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class StreamTooLong(BakeError):
    """The decrypted stream inflates past what the manifest says it holds."""


class _Plain:
    """The decrypted, gunzipped tar stream as a file object for tarfile, hashing all of it."""

    def __init__(self, parts: _Parts, key: bytes, iv: bytes, limit: int):
        self.parts = parts
        self.limit = limit  # the most the stream may inflate to
        self._dec = crypto.decryptor(key, iv)
        self._unpad = sympadding.PKCS7(128).unpadder()
        self._inflate: "zlib._Decompress | None" = zlib.decompressobj(31)
        self._input = b""  # decrypted gzip bytes not yet given to the decompressor
        self._ended = False  # no more ciphertext
        self._buf = bytearray()
        self.sha1 = hashlib.sha1()
        self.size = 0

    def _more_input(self) -> bool:
        if self._ended:
            return False
        data = self.parts.read()
        if data:
            self._input = self._unpad.update(self._dec.update(data))
        else:
            self._ended = True
            try:
                self._input = self._unpad.update(self._dec.finalize()) + self._unpad.finalize()
            except ValueError:
                raise BakeError("the decrypted bundle ends with bad padding: the parts are truncated "
                                "or the key does not belong to them") from None
        return True

    def _fill(self, want: int) -> bool:
        """Decompress up to `want` more bytes into the buffer; False at the end of the stream."""
        out = b""
        if self._inflate is not None and self._inflate.eof:
            # the gzip member ended: what follows is another member, or zero padding
            self._input = self._inflate.unused_data + self._input
            self._inflate = None
        if self._inflate is not None and self._inflate.unconsumed_tail:
            out = self._inflate.decompress(self._inflate.unconsumed_tail, want)
        else:
            if not self._input and not self._more_input():
                if self._inflate is None:
                    return False
                # no input left: only output zlib still holds back may come out
                out = self._inflate.decompress(b"", want)
                if not out and not self._inflate.eof:
                    raise BakeError("the compressed image ends early: the bundle is truncated")
                data = None
            else:
                data, self._input = self._input, b""
            if data is not None:
                if self._inflate is None:
                    if data.count(0) == len(data):
                        return True
                    self._inflate = zlib.decompressobj(31)
                out = self._inflate.decompress(data, want)
        if out:
            self.size += len(out)
            if self.size > self.limit:
                raise StreamTooLong(f"the bundle's data inflates to more than {self.limit} bytes, more than its "
                                    "image and tar's headers can be: refused as it was read")
            self.sha1.update(out)
            self._buf += out
        return True

    def read(self, n: int | None = -1) -> bytes:
        want = CHUNK if n is None or n < 0 else n
        while len(self._buf) < want and self._fill(max(want - len(self._buf), 65536)):
            pass
        if n is None or n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def drain(self) -> None:
        """Read (and hash) whatever tarfile left unread: end blocks and record padding."""
        while self.read(CHUNK):
            pass


def _open_bundle_key(m: Manifest, private_key: Path) -> tuple[bytes, bytes]:
    private = crypto.load_private_key(private_key)
    for who in ("user", "ec2"):
        wrapped_key, wrapped_iv = getattr(m, f"{who}_encrypted_key"), getattr(m, f"{who}_encrypted_iv")
        if not wrapped_key or not wrapped_iv:
            continue
        key, iv = crypto.unwrap(private, wrapped_key), crypto.unwrap(private, wrapped_iv)
        if key and iv:
            return key, iv
    raise BakeError(f"{private_key}: this private key cannot open the bundle (neither its user_encrypted_key "
                    "nor its ec2_encrypted_key was made for it): wrong key")


def opens_user_key(m: Manifest, private_key: Path) -> bool:
    """Whether `private_key` opens the bundle's `user_encrypted_key` and `_iv`, that is,
    whether the bundle was sealed to this key's certificate (the bundling user's).

    Only the user pair is tried: the `ec2_encrypted_*` pair is sealed to the cloud's
    certificate and opens only with the cloud's own key. False tells a bundle made for
    another certificate apart from a damaged one, before any part is read."""
    if not m.user_encrypted_key or not m.user_encrypted_iv:
        return False
    private = crypto.load_private_key(private_key)
    return crypto.unwrap(private, m.user_encrypted_key) is not None and \
        crypto.unwrap(private, m.user_encrypted_iv) is not None


_ZEROS = bytes(CHUNK)


def _write_sparse(out: BinaryIO, data: bytes) -> None:
    if (data == _ZEROS) if len(data) == CHUNK else (data.count(0) == len(data)):
        out.seek(len(data), os.SEEK_CUR)
    else:
        out.write(data)


def unbundle(manifest: Path, *, private_key: Path, source_dir: Path | None, destination: Path,
             cert: Path | None = None) -> Path:
    """Check and decode the bundle described by `manifest`; return the image written.

    Parts are looked for in `source_dir` (default: the manifest's directory). With
    `cert`, the manifest's signature must verify against that certificate's key. The
    image is written to `destination/<image name>` (created 0600; `destination` is
    created when missing). A BakeError names the first thing that does not match.
    """
    manifest, destination = Path(manifest), Path(destination)
    source = Path(source_dir) if source_dir is not None else manifest.parent
    m = read_manifest(manifest)

    if cert is not None:
        public = crypto.load_certificate_key(cert)
        if not m.signature or not m.signed_bytes:
            raise BakeError(f"{manifest}: the manifest is not signed")
        if not crypto.verify(public, m.signed_bytes, m.signature):
            raise BakeError(f"{manifest}: the manifest's signature does not verify with {cert}: "
                            "the manifest was edited or signed with another key")
    for part in m.parts:
        if not (source / part.filename).is_file():
            raise BakeError(f"part {part.index} ({part.filename}) is missing from {source}: the bundle is incomplete")
    if not m.parts:
        raise BakeError(f"{manifest}: the manifest lists no parts")
    cap = limits.max_image_bytes()
    if m.size > cap:
        raise limits.over_cap(f"{manifest}: its <size> declares an image of {m.size} bytes,", cap)
    key, iv = _open_bundle_key(m, private_key)

    private_directory(destination)
    target = destination / m.name
    with os_errors_as_bake_errors(f"writing into {destination}"):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{m.name}.", suffix=".partial", dir=destination)
    tmp = Path(tmp_name)
    parts = _Parts(m.parts, source)
    try:
        with os_errors_as_bake_errors(f"unbundling {manifest}"), step(f"Unbundling {m.name}"), \
                os.fdopen(fd, "wb") as out:
            plain = _Plain(parts, key, iv, m.size + TAR_HEADROOM + 2 * len(m.name.encode()))
            written = 0
            try:
                with tarfile.open(fileobj=plain, mode="r|", bufsize=CHUNK) as tar:  # type: ignore[call-overload]
                    member = tar.next()
                    if member is None or not member.isreg():
                        raise BakeError(f"{manifest}: the bundle's tar stream holds no regular file")
                    if member.size > m.size:
                        raise BakeError(f"{manifest}: the bundle's image declares {member.size} bytes but the "
                                        f"manifest's <size> says {m.size}: refused before writing any of it")
                    data_in = tar.extractfile(member)
                    assert data_in is not None
                    while chunk := data_in.read(CHUNK):
                        written += len(chunk)
                        if written > m.size:    # the member was checked: this is a second line of defence
                            raise BakeError(f"{manifest}: the image grows past the manifest's <size> of {m.size} "
                                            "bytes; refused as it was written")
                        _write_sparse(out, chunk)
                    while tar.next() is not None:  # read past any further members (hashed all the same)
                        pass
                plain.drain()
            except PartMismatch:
                raise
            except (zlib.error, tarfile.TarError, EOFError, BakeError) as e:
                parts.check_rest()  # a corrupt part is the real cause: name it
                if isinstance(e, StreamTooLong):
                    raise StreamTooLong(f"{manifest}: {e}") from None
                if isinstance(e, BakeError):
                    raise
                raise BakeError(f"{manifest}: the decrypted data is not a gzipped tar stream ({e}); "
                                "wrong key, or the manifest does not belong to these parts") from None
            out.truncate(written)
        if parts.total != m.bundled_size:
            raise BakeError(f"{manifest}: <bundled_size> says {m.bundled_size} bytes but the parts hold {parts.total}")
        if plain.sha1.hexdigest() != m.digest:
            raise BakeError(f"{manifest}: the tar stream's SHA-1 is {plain.sha1.hexdigest()} "
                            f"but the manifest's <digest> says {m.digest}")
        if written != m.size:
            raise BakeError(f"{manifest}: the image is {written} bytes but the manifest's <size> says {m.size}")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        parts.close()
    log.info("unbundled %s: %d bytes", target, written)
    return target
