"""The bundle's cryptography: RSA key wrapping and signing, AES-128-CBC.

Key files are read into memory and parsed, never copied, and their paths and contents
never reach a log or an error message beyond the path the user gave.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from builder.core.errors import BakeError

AES_BLOCK = 16


def load_certificate_key(path: str | os.PathLike) -> rsa.RSAPublicKey:
    """The RSA public key of an X.509 certificate (PEM or DER) or of a PEM public key.

    Validity dates are not checked: clouds use certificates only as key containers.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BakeError(f"{path}: cannot read certificate ({e.strerror})") from None
    # any kind of public key until the check below: only an RSA one is returned
    key: object = None
    for load in (x509.load_pem_x509_certificate, x509.load_der_x509_certificate):
        try:
            key = load(data).public_key()
            break
        except ValueError:
            continue
    if key is None:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise BakeError(f"{path}: not an X.509 certificate") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise BakeError(f"{path}: the certificate's key is not an RSA key")
    return key


def load_private_key(path: str | os.PathLike) -> rsa.RSAPrivateKey:
    """An unencrypted RSA private key from a PEM (PKCS#1 or PKCS#8) or DER file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BakeError(f"{path}: cannot read private key ({e.strerror})") from None
    key = None
    for load in (serialization.load_pem_private_key, serialization.load_der_private_key):
        try:
            key = load(data, password=None)
            break
        except TypeError:
            raise BakeError(f"{path}: the private key is protected by a passphrase; give an unencrypted key") from None
        except (ValueError, UnsupportedAlgorithm):
            continue
    if key is None:
        raise BakeError(f"{path}: not a private key in PEM or DER form")
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BakeError(f"{path}: not an RSA private key")
    return key


def same_key(public: rsa.RSAPublicKey, private: rsa.RSAPrivateKey) -> bool:
    """Whether `public` is the public half of `private`."""
    return public.public_numbers() == private.public_key().public_numbers()


def wrap(public: rsa.RSAPublicKey, secret_hex: str) -> str:
    """RSA PKCS#1 v1.5 encryption of the ASCII hex string `secret_hex`, as lowercase hex."""
    return public.encrypt(secret_hex.encode("ascii"), padding.PKCS1v15()).hex()


def unwrap(private: rsa.RSAPrivateKey, wrapped_hex: str) -> bytes | None:
    """The 16-byte AES key or IV inside `wrapped_hex`, or None when `private` cannot open it.

    The wrapped value is a 32-character hex string; anything else (which is also what a
    wrong key yields under implicit rejection) counts as "cannot open".
    """
    try:
        plain = private.decrypt(bytes.fromhex(wrapped_hex), padding.PKCS1v15())
    except ValueError:
        return None
    text = plain.strip().decode("ascii", "replace")
    if not re.fullmatch(r"[0-9a-fA-F]{32}", text):
        return None
    return bytes.fromhex(text)


def sign(private: rsa.RSAPrivateKey, data: bytes) -> str:
    """RSASSA-PKCS1-v1_5 with SHA-1 over `data`, as lowercase hex (`openssl dgst -sha1 -sign`)."""
    return private.sign(data, padding.PKCS1v15(), hashes.SHA1()).hex()


def verify(public: rsa.RSAPublicKey, data: bytes, signature_hex: str) -> bool:
    """Whether `signature_hex` is a valid RSA-SHA1 signature of `data` by `public`."""
    try:
        public.verify(bytes.fromhex(signature_hex), data, padding.PKCS1v15(), hashes.SHA1())
        return True
    except (InvalidSignature, ValueError):
        return False


def encryptor(key: bytes, iv: bytes):
    """An AES-128-CBC encryptor (no padding applied: the writer pads the last block)."""
    return Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()


def decryptor(key: bytes, iv: bytes):
    """An AES-128-CBC decryptor (no padding removed: the reader checks it)."""
    return Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()


def pkcs7_pad(total: int) -> bytes:
    """The PKCS#7 padding after `total` plaintext bytes (1 to 16 bytes, as openssl enc adds)."""
    n = AES_BLOCK - total % AES_BLOCK
    return bytes([n]) * n
