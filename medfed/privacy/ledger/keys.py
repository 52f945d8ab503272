"""Signing keys of a ledger: a site's Ed25519 private key (loaded, or created atomically with mode 0600),
public keys read from PEM or hex files, and the hex form of a key."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.exceptions import LedgerError
from medfed.files import fsync_dir, write_private

# --------------------------------------------------------------------------- keys


def public_key_hex(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The raw 32-byte Ed25519 public key, in hex."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"expected an Ed25519 key, got {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _short(key_hex: str) -> str:
    """The first 16 hex digits of a key, for messages."""
    return f"{key_hex[:16]}.."


def _read_key_file(path: Path) -> bytes:
    """The bytes of a key file, or LedgerError naming it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"key file {path} cannot be read: {exc.strerror or exc}") from exc


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    """An existing PEM PKCS8 unencrypted Ed25519 private key."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise LedgerError(f"key file {path} is not an unencrypted PEM (PKCS8) Ed25519 private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def _publish(tmp: Path, path: Path) -> bool:
    """Give the finished file ``tmp`` the name ``path`` atomically, never replacing an existing file.

    A hard link fails if ``path`` exists, so two processes creating the same file at once cannot
    clobber each other (os.replace would). Returns False if ``path`` already existed.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # file system without hard links: os.replace, after a (racy) existence check
        if path.exists():
            return False
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return True


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The site's Ed25519 signing key at ``path`` (PEM PKCS8, unencrypted), created if missing.

    A new key is written to a temporary file opened with ``O_CREAT | O_EXCL`` and mode 0600,
    fsynced, then linked into place, so the key file is never visible half-written or with
    wider permissions. Parent folders are created. A file that is not an Ed25519 private key
    raises LedgerError naming the path.
    """
    path = Path(path)
    if path.exists():
        return _load_private_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write_private(tmp, pem, fsync=True)
        if not _publish(tmp, path):  # another process created it meanwhile: use theirs
            return _load_private_key(path)
    except OSError as exc:
        raise LedgerError(f"key file {path} cannot be created: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM SubjectPublicKeyInfo file or a text file of 64 hex digits."""
    path = Path(path)
    data = _read_key_file(path)
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise LedgerError(f"key file {path} is not a PEM Ed25519 public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise LedgerError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 public key")
        return key
    try:
        return _public_key_from_hex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise LedgerError(
            f"key file {path} is neither a PEM public key nor a raw Ed25519 public key in hex (64 hex digits)"
        ) from None


def _public_key_from_hex(text: Any) -> Ed25519PublicKey:
    """A raw Ed25519 public key from 64 hex digits; ValueError otherwise."""
    if not isinstance(text, str) or len(text) != 64:
        raise ValueError("not 64 hex digits")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
