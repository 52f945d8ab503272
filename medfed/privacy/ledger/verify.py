"""Verifying a ledger: the pure checks of its key, triggers, rows (seq, hash chain, row hashes, signatures,
value rules, cumulative epsilon never decreasing) and signed head record, and :func:`verify_ledger`, which
checks a file read-only with only the public key."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.exceptions import LedgerError
from medfed.privacy.ledger.chain import _head_message, _row_hash, _row_signature_ok, _signature_ok, genesis_hash
from medfed.privacy.ledger.keys import _public_key_from_hex, _short, public_key_hex
from medfed.privacy.ledger.records import LedgerEntry, Release, _is_int, _is_real, _is_utc_iso, _release_problems
from medfed.privacy.ledger.storage import (
    _TRIGGERS,
    _check_version,
    _meta_text,
    _read_only_snapshot,
    _recovered_snapshot,
    _Snapshot,
)


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_ledger` found: the rows as stored and every problem, each naming its row."""

    path: Path
    site: str
    public_key_hex: str
    entries: list[LedgerEntry]
    problems: list[str]

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


# --------------------------------------------------------------------------- checks (pure)


def _key_problems(stored_hex: str, trusted: Ed25519PublicKey | None) -> tuple[list[str], Ed25519PublicKey | None]:
    """Problems with the stored key, and the key to check signatures with (None if none usable).

    Signatures are checked with the stored key (so a consistent ledger of another site reads as
    that, not as N bad signatures); a trusted key that differs is one problem of its own.
    """
    problems = []
    try:
        stored: Ed25519PublicKey | None = _public_key_from_hex(stored_hex)
    except ValueError:
        stored = None
        problems.append(f"meta public key {stored_hex[:80]!r} is not a raw Ed25519 public key in hex (replaced?)")
    if trusted is not None:
        trusted_hex = public_key_hex(trusted)
        if trusted_hex != stored_hex:
            problems.append(
                f"signed by key {_short(stored_hex)} but the trusted key is {_short(trusted_hex)} "
                "(signed by another key, or the ledger's key was replaced)"
            )
    key = stored if stored is not None else trusted
    if key is None:
        problems.append("signatures cannot be checked: no usable public key")
    return problems, key


def _trigger_problems(triggers: dict[str, Any]) -> list[str]:
    """The append-only triggers must be present and unaltered; no others may exist."""
    problems = [
        f"append-only trigger {name} missing or altered (dropped?)"
        for name, sql in _TRIGGERS.items()
        if triggers.get(name) != sql
    ]
    problems += [f"unexpected trigger {name} in the ledger" for name in sorted(set(triggers) - set(_TRIGGERS))]
    return problems


def _sequence_problem(entry: LedgerEntry, expected_seq: int, previous: LedgerEntry | None) -> str | None:
    """A gap before ``entry`` in the seq numbering, if any."""
    if entry.seq == expected_seq:
        return None
    if entry.seq < expected_seq:
        return f"row {entry.seq}: seq must be 1 or more"
    gap = f"row {expected_seq}" if entry.seq == expected_seq + 1 else f"rows {expected_seq}-{entry.seq - 1}"
    if previous is None:
        return f"rows start at seq {entry.seq}, not 1 ({gap} deleted?)"
    return f"rows jump from seq {previous.seq} to {entry.seq} ({gap} deleted?)"


def _chain_problem(entry: LedgerEntry, previous: LedgerEntry | None, genesis: str) -> str | None:
    """``entry.prev_hash`` must be the previous row's row_hash (the genesis hash for the first)."""
    if previous is None:
        if entry.prev_hash != genesis:
            return (
                f"row {entry.seq}: prev_hash is not the genesis hash of this site and key "
                "(first row replaced or reordered, or site/key changed?)"
            )
        return None
    if entry.prev_hash != previous.row_hash:
        return f"row {entry.seq}: prev_hash does not chain to row {previous.seq} (deleted or reordered?)"
    return None


# Cumulative epsilon never decreases, but only (epsilon, delta) pairs from the same accountant at
# the same delta are comparable: a site that moves to a larger delta legitimately reports a smaller
# epsilon. A relative slack of 1e-9 absorbs recomputation round-off (e.g. a "none" row repeating
# the DP epsilon so far), far below any accounting difference.
_EPSILON_SLACK = 1e-9

_EpsilonFloors = dict[tuple[Any, Any], tuple[int, float]]


def _epsilon_regression(release: Release, floors: _EpsilonFloors) -> str | None:
    """Why ``release.epsilon_after`` is below an earlier row's at the same delta and accountant, if it is."""
    floor = floors.get((release.delta, release.accountant))
    if floor is None or not _is_real(release.epsilon_after):
        return None
    seq, epsilon = floor
    if release.epsilon_after >= epsilon - _EPSILON_SLACK * max(1.0, abs(epsilon)):
        return None
    return (
        f"epsilon_after {release.epsilon_after!r} is below row {seq}'s {epsilon!r} at the same delta and accountant "
        "(cumulative epsilon cannot decrease)"
    )


def _raise_floor(floors: _EpsilonFloors, entry: LedgerEntry) -> None:
    """Note ``entry``'s epsilon as the floor for later rows with its delta and accountant."""
    if _is_real(entry.epsilon_after):
        key = (entry.delta, entry.accountant)
        if key not in floors or entry.epsilon_after >= floors[key][1]:
            floors[key] = (entry.seq, float(entry.epsilon_after))


def _epsilon_floors(entries: list[LedgerEntry]) -> _EpsilonFloors:
    """The highest epsilon so far per (delta, accountant), with the row holding it."""
    floors: _EpsilonFloors = {}
    for entry in entries:
        _raise_floor(floors, entry)
    return floors


def _content_problems(entry: LedgerEntry, site: str, floors: _EpsilonFloors) -> list[str]:
    """Site, timestamp and value rules of one row, and epsilon never decreasing."""
    problems = []
    if entry.site != site:
        problems.append(f"site {entry.site!r} is not the ledger's site {site!r}")
    if not _is_utc_iso(entry.created_at):
        problems.append(f"created_at {entry.created_at!r} is not an ISO-8601 UTC time")
    problems += _release_problems(entry)
    regression = _epsilon_regression(entry, floors)
    return [*problems, regression] if regression else problems


def _row_problems(entries: list[LedgerEntry], site: str, genesis: str, key: Ed25519PublicKey | None) -> list[str]:
    """Every problem of the rows, in seq order."""
    problems: list[str] = []
    previous: LedgerEntry | None = None
    floors: _EpsilonFloors = {}
    expected_seq = 1
    for entry in entries:
        gap = _sequence_problem(entry, expected_seq, previous)
        chain = _chain_problem(entry, previous, genesis)
        problems += [p for p in (gap, chain) if p]
        if _row_hash(entry) != entry.row_hash:
            problems.append(f"row {entry.seq}: hash does not match its contents (edited?)")
        if key is not None and not _row_signature_ok(key, entry):
            problems.append(f"row {entry.seq}: signature invalid")
        problems += [f"row {entry.seq}: {p}" for p in _content_problems(entry, site, floors)]
        _raise_floor(floors, entry)
        previous = entry
        expected_seq = entry.seq + 1
    return problems


def _head_problems(head_text: Any, entries: list[LedgerEntry], genesis: str, key: Ed25519PublicKey | None) -> list[str]:
    """The signed head record must name the last row (seq and row_hash)."""
    if head_text is None:
        return ["head record missing (meta edited?)"]
    try:
        head = json.loads(head_text)
        seq, row_hash, signature = head["seq"], head["row_hash"], head["signature"]
        if not _is_int(seq) or not isinstance(row_hash, str) or not row_hash.isascii():
            raise TypeError
    except (ValueError, TypeError, KeyError):
        return ["head record is malformed (meta edited?)"]
    problems = []
    if key is not None and not _signature_ok(key, signature, _head_message(seq, row_hash)):
        problems.append("head record: signature invalid")
    last_seq = entries[-1].seq if entries else 0
    last_hash = entries[-1].row_hash if entries else genesis
    if seq > last_seq:
        problems.append(f"head record says {seq} rows, ledger holds {last_seq} (last row deleted?)")
    elif seq < last_seq:
        problems.append(f"head record says {seq} rows, ledger holds {last_seq} (row {last_seq} added without the key?)")
    elif row_hash != last_hash:
        problems.append(f"head record does not match row {last_seq}'s hash (last row replaced?)")
    return problems


def _verify_snapshot(snapshot: _Snapshot, path: Path, trusted: Ed25519PublicKey | None) -> Verification:
    """Check a snapshot completely; structural faults raise LedgerError, tampering is listed."""
    _check_version(snapshot, path)
    site = _meta_text(snapshot, "site", path)
    stored_hex = _meta_text(snapshot, "public_key", path)
    problems, key = _key_problems(stored_hex, trusted)
    genesis = genesis_hash(site, stored_hex)
    problems += _trigger_problems(snapshot.triggers)
    problems += _row_problems(snapshot.entries, site, genesis, key)
    problems += _head_problems(snapshot.meta.get("head"), snapshot.entries, genesis, key)
    return Verification(path=path, site=site, public_key_hex=stored_hex, entries=snapshot.entries, problems=problems)


# --------------------------------------------------------------------------- verify_ledger (read-only)


def verify_ledger(path: Path, trusted_public_key: Ed25519PublicKey | None = None) -> Verification:
    """Check a ledger file completely, read-only, without the private key.

    Checks, in seq order: contiguous seq from 1, the prev_hash chain from the genesis hash,
    every row_hash recomputed, every signature (with the stored key; a ``trusted_public_key``
    that differs is a problem of its own), value rules (known mechanism, ranges, epsilon never
    decreasing), the append-only triggers, and the signed head record naming the last row.
    Tampering is reported in ``problems``; a missing, unreadable or non-ledger file raises
    LedgerError naming the path. Nothing is created or modified (a crashed writer's hot
    journal is rolled back in a private temporary copy).
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"privacy ledger {path} does not exist (or is not a file)")
    try:
        snapshot = _read_only_snapshot(path)
    except LedgerError as exc:
        cause = exc.__cause__
        if getattr(cause, "sqlite_errorcode", None) != sqlite3.SQLITE_READONLY_ROLLBACK:
            raise
        snapshot = _recovered_snapshot(path)
    return _verify_snapshot(snapshot, path, trusted_public_key)
