"""Bundles written the way other tools write them, to prove the reader takes them all.

A deliberately separate, minimal writer (it shares no code with builder.bundle): it
takes any tar stream, and lets a test choose the XML declaration, the attribute quotes,
the part naming style and whether a zero-length last part is listed, as the various
euca2ools and ec2-ami-tools releases do.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

DECLARATIONS = {
    "ec2-ami-tools": "<?xml version='1.0'?>",
    "euca2ools-3": "<?xml version='1.0' encoding='ASCII'?>\n",
    "euca2ools-2": '<?xml version="1.0" ?>',
    "none": "",
}


def _pub(cert: Path):
    return x509.load_pem_x509_certificate(cert.read_bytes()).public_key()


def forge_bundle(tar_stream: bytes, directory: Path, *, name: str, size: int, user_cert: Path, user_key: Path,
                 cloud_cert: Path, part_size: int = 4096, quote: str = "'", declaration: str = "ec2-ami-tools",
                 part_names: str = "%02d", empty_last_part: bool = False, parts_count: int | None = None) -> Path:
    """Write `tar_stream` as a bundle in `directory`; return the manifest path."""
    directory.mkdir(parents=True, exist_ok=True)
    key, iv = os.urandom(16).hex(), os.urandom(16).hex()
    gz = gzip.compress(tar_stream, compresslevel=9, mtime=0)
    pad = 16 - len(gz) % 16
    enc = Cipher(algorithms.AES(bytes.fromhex(key)), modes.CBC(bytes.fromhex(iv))).encryptor()
    ciphertext = enc.update(gz + bytes([pad]) * pad) + enc.finalize()
    chunks = [ciphertext[i:i + part_size] for i in range(0, len(ciphertext), part_size)]
    if empty_last_part:
        chunks.append(b"")
    q = quote
    parts_xml = []
    for i, chunk in enumerate(chunks):
        filename = f"{name}.part." + (part_names % i)
        (directory / filename).write_bytes(chunk)
        parts_xml.append(f"<part index={q}{i}{q}><filename>{filename}</filename>"
                         f"<digest algorithm={q}SHA1{q}>{hashlib.sha1(chunk).hexdigest()}</digest></part>")
    user, cloud = _pub(user_cert), _pub(cloud_cert)

    def seal(pub, secret: str) -> str:
        return pub.encrypt(secret.encode(), padding.PKCS1v15()).hex()

    mc = "<machine_configuration><architecture>i386</architecture><kernel_id>eki-00000001</kernel_id></machine_configuration>"
    image = (f"<image><name>{name}</name><user>123456789012</user><type>machine</type>"
             f"<digest algorithm={q}SHA1{q}>{hashlib.sha1(tar_stream).hexdigest()}</digest>"
             f"<size>{size}</size><bundled_size>{len(ciphertext)}</bundled_size>"
             f"<ec2_encrypted_key algorithm={q}AES-128-CBC{q}>{seal(cloud, key)}</ec2_encrypted_key>"
             f"<user_encrypted_key algorithm={q}AES-128-CBC{q}>{seal(user, key)}</user_encrypted_key>"
             f"<ec2_encrypted_iv>{seal(cloud, iv)}</ec2_encrypted_iv>"
             f"<user_encrypted_iv>{seal(user, iv)}</user_encrypted_iv>"
             f"<parts count={q}{len(chunks) if parts_count is None else parts_count}{q}>{''.join(parts_xml)}</parts></image>")
    private = serialization.load_pem_private_key(user_key.read_bytes(), password=None)
    signature = private.sign((mc + image).encode(), padding.PKCS1v15(), hashes.SHA1()).hex()
    text = (DECLARATIONS[declaration] + "<manifest><version>2007-10-10</version><bundler><name>other</name>"
            "<version>1</version><release>0</release></bundler>" + mc + image
            + f"<signature>{signature}</signature></manifest>")
    manifest = directory / f"{name}.manifest.xml"
    manifest.write_text(text)
    return manifest
