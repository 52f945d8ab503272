"""Canonical hashing and Ed25519 signing of ledger rows: canonical JSON, the genesis hash that binds a chain to
its site and public key, row hashes, the signed head record, and signature checks."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.privacy.ledger.records import _HASHED_FIELDS, _OPTIONAL_FIELDS, LEDGER_VERSION, LedgerEntry

_GENESIS_TAG = "medfed-privacy-ledger"


# --------------------------------------------------------------------------- hashing and signing


def _sha256_json(payload: dict[str, Any]) -> str:
    """sha256 hex of canonical JSON: sorted keys, no spaces, floats via repr (json's own)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=_odd_value)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _odd_value(value: Any) -> str:
    """JSON stand-in for a value no ledger writes (e.g. a BLOB planted in a row): hashes, never matches."""
    return f"<{type(value).__name__}>{value!r}"


def genesis_hash(site: str, public_key_hex: str) -> str:
    """The ``prev_hash`` of a ledger's first row: binds the chain to its site and public key."""
    return _sha256_json({"ledger": _GENESIS_TAG, "version": LEDGER_VERSION, "site": site, "public_key": public_key_hex})


def _row_hash(entry: LedgerEntry) -> str:
    """sha256 over every release field plus seq, site, created_at and prev_hash (an optional field only
    when set: a row written before ``epsilon_budget`` existed hashes as it did then)."""
    payload = {name: getattr(entry, name) for name in _HASHED_FIELDS}
    for name in _OPTIONAL_FIELDS:
        if payload[name] is None:
            del payload[name]
    return _sha256_json(payload)


def _head_message(seq: int, row_hash: str) -> bytes:
    """What the head record's signature covers."""
    return b"head|" + str(seq).encode("ascii") + b"|" + row_hash.encode("ascii")


def _signed_head(key: Ed25519PrivateKey, seq: int, row_hash: str) -> str:
    """The meta ``head`` value: JSON of the last seq, its row_hash, and a signature over both."""
    signature = key.sign(_head_message(seq, row_hash)).hex()
    return json.dumps({"seq": seq, "row_hash": row_hash, "signature": signature}, sort_keys=True)


def _signature_ok(key: Ed25519PublicKey, signature_hex: Any, message: bytes) -> bool:
    """Whether ``signature_hex`` is a valid signature of ``message`` by ``key``."""
    try:
        key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _row_signature_ok(key: Ed25519PublicKey, entry: LedgerEntry) -> bool:
    """Whether the row's signature covers its stored row_hash."""
    try:
        message = bytes.fromhex(entry.row_hash)
    except (ValueError, TypeError):
        return False
    return _signature_ok(key, entry.signature, message)


def _utc_now() -> str:
    """The current time, ISO-8601 in UTC."""
    return datetime.now(UTC).isoformat(timespec="microseconds")
