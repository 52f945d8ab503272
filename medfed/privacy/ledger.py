"""The per-site privacy ledger: SQLite, append-only, hash-chained, Ed25519-signed.

Every release of a site (weights that left it after one round: DP-SGD, or ``none`` without DP)
is one row of ``releases``.
Each row carries ``prev_hash`` (the previous row's ``row_hash``; the first row chains to
:func:`genesis_hash` of the site and its public key), ``row_hash`` (sha256 of the canonical
JSON of the row's contents) and ``signature`` (Ed25519 over the raw ``row_hash`` bytes). The
``meta`` table holds the format version, the site, the public key and a signed ``head`` record
naming the last row, so that deleting the *last* row is detected too.

Every row also records ``epsilon_budget``, the site's budget in force when it was written, so an
audit judges each release against its own budget (rows of ledgers written before this column
existed have none; the column is added to such a ledger the first time a site opens it).

The site reads the ledger before every round to rebuild its accountant (:meth:`Ledger.open`
and :meth:`Ledger.entries` verify everything first); an auditor runs :func:`verify_ledger`,
which opens the file read-only and needs only the public key.

The anchor. A site also keeps the head of its ledger *outside* the ledger file: a small JSON file
beside its signing key (:func:`anchor_path_for_key`), signed with that key, recording the site, the
key, the ledger's genesis hash, the last seq and that row's hash. It is replaced atomically after
every append. :meth:`Ledger.open` given the anchor refuses (:class:`LedgerResetError`) a ledger that
is missing, shorter than the anchor or does not hold the anchored row: deleting the ledger file, or
putting back an older copy, would otherwise silently reset the site's budget. :func:`anchor_problems`
is the same check for the auditor.

Threat model. SQL triggers refuse UPDATE, DELETE and out-of-order INSERT, but anyone with
write access to the file can drop them, so verification never relies on them: edits, deletions,
reordering, forged signatures and a replaced key are caught by the chain, the signatures and
the head record. What a lone file cannot show is a rollback to an *older genuine copy* of
itself (old rows with their old signed head), or its deletion: the anchor beside the key catches
both, and the server's round log (``metrics.jsonl``) is a second witness. Whoever holds the private
key can of course re-sign anything, anchor included; only a record kept elsewhere (the server's)
catches that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.exceptions import ConfigError, LedgerError, LedgerResetError, LedgerVerificationError
from medfed.files import fsync_dir, replace_durably, write_private

LEDGER_VERSION = 1
MECHANISM_DP_SGD = "poisson-subsampled-gaussian"
MECHANISM_NONE = "none"
MECHANISM_CENTRAL = "central-gaussian"  # the server's site-level Gaussian mechanism on an aggregate (q = 1)
MECHANISMS = (MECHANISM_DP_SGD, MECHANISM_NONE, MECHANISM_CENTRAL)

_GENESIS_TAG = "medfed-privacy-ledger"
_ANCHOR_TAG = "medfed-privacy-ledger-anchor"
ANCHOR_SUFFIX = ".anchor.json"
_MAX_LISTED_PROBLEMS = 10


@dataclass(frozen=True)
class Release:
    """One DP training release, as the caller supplies it for a new ledger row.

    ``mechanism`` is :data:`MECHANISM_DP_SGD` (``steps`` compositions of the Poisson-subsampled
    Gaussian mechanism) or :data:`MECHANISM_NONE` (weights left the site without DP: an
    uncovered exposure, with sample_rate, noise_multiplier and steps all 0 and ``epsilon_after``
    the DP epsilon so far). ``epsilon_after`` is the site's cumulative DP epsilon after this
    release, as the site's accountant (``accountant``: "rdp", "prv", ...) computed it.
    ``epsilon_budget`` is the site's budget in force when the release was made (None: not
    recorded, as in rows written before the field existed, and in the server's central ledger).
    """

    run_id: str
    server_round: int
    phase: str
    mechanism: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    delta: float
    epsilon_after: float
    accountant: str
    epsilon_budget: float | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class LedgerEntry(Release):
    """A stored ledger row: the release plus its place in the signed hash chain."""

    seq: int
    site: str
    created_at: str
    prev_hash: str
    row_hash: str
    signature: str


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


_RELEASE_FIELDS = tuple(f.name for f in fields(Release))
_HASHED_FIELDS = (*_RELEASE_FIELDS, "seq", "site", "created_at", "prev_hash")
_ENTRY_FIELDS = tuple(f.name for f in fields(LedgerEntry))
_FLOAT_FIELDS = ("sample_rate", "noise_multiplier", "delta", "epsilon_after")
_OPTIONAL_FIELDS = ("epsilon_budget",)  # hashed only when set, so rows written before it existed still verify
_INT_FIELDS = ("server_round", "steps")
_TEXT_FIELDS = ("run_id", "phase", "mechanism", "accountant")

# --------------------------------------------------------------------------- schema

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    (
        "CREATE TABLE releases (seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL, server_round INTEGER NOT NULL, "
        "phase TEXT NOT NULL, mechanism TEXT NOT NULL, sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL, "
        "steps INTEGER NOT NULL, delta REAL NOT NULL, epsilon_after REAL NOT NULL, accountant TEXT NOT NULL, "
        "site TEXT NOT NULL, created_at TEXT NOT NULL, prev_hash TEXT NOT NULL, row_hash TEXT NOT NULL, "
        "signature TEXT NOT NULL, epsilon_budget REAL)"
    ),
)

# Append-only at the SQL level. INSERT OR REPLACE deletes the old row without firing DELETE
# triggers, hence the INSERT triggers: releases only grow by the next seq, meta keys never change
# except the signed head record.
_TRIGGERS = {
    "releases_no_update": "CREATE TRIGGER releases_no_update BEFORE UPDATE ON releases "
    "BEGIN SELECT RAISE(ABORT, 'medfed privacy ledger is append-only: UPDATE of releases refused'); END",
    "releases_no_delete": "CREATE TRIGGER releases_no_delete BEFORE DELETE ON releases "
    "BEGIN SELECT RAISE(ABORT, 'medfed privacy ledger is append-only: DELETE from releases refused'); END",
    "releases_next_seq_only": "CREATE TRIGGER releases_next_seq_only BEFORE INSERT ON releases "
    "WHEN NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM releases) "
    "BEGIN SELECT RAISE(ABORT, 'medfed privacy ledger is append-only: rows must take the next seq'); END",
    "meta_no_delete": "CREATE TRIGGER meta_no_delete BEFORE DELETE ON meta "
    "BEGIN SELECT RAISE(ABORT, 'medfed privacy ledger: DELETE from meta refused'); END",
    "meta_no_overwrite": "CREATE TRIGGER meta_no_overwrite BEFORE INSERT ON meta "
    "WHEN EXISTS (SELECT 1 FROM meta WHERE key = NEW.key) "
    "BEGIN SELECT RAISE(ABORT, 'medfed privacy ledger: meta keys are written once'); END",
    "meta_only_head_changes": "CREATE TRIGGER meta_only_head_changes BEFORE UPDATE ON meta "
    "WHEN OLD.key IS NOT 'head' OR NEW.key IS NOT 'head' "
    "BEGIN SELECT RAISE(ABORT, 'medfed privacy ledger: only the head record in meta may change'); END",
}

_ADD_BUDGET_COLUMN = "ALTER TABLE releases ADD COLUMN epsilon_budget REAL"  # ledgers made before the column existed
_INSERT_ROW = f"INSERT INTO releases ({', '.join(_ENTRY_FIELDS)}) VALUES ({', '.join('?' * len(_ENTRY_FIELDS))})"


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


# --------------------------------------------------------------------------- value rules


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _text_problems(release: Release) -> list[str]:
    problems = []
    for name in ("run_id", "phase", "accountant"):
        value = getattr(release, name)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{name} must be non-empty text, got {value!r}")
    if release.mechanism not in MECHANISMS:
        problems.append(f"mechanism must be one of {', '.join(MECHANISMS)}, got {release.mechanism!r}")
    return problems


def _general_number_problems(release: Release) -> list[str]:
    """Rules on numbers that hold whatever the mechanism."""
    problems = []
    if not _is_int(release.server_round) or release.server_round < 0:
        problems.append(f"server_round must be an integer >= 0, got {release.server_round!r}")
    if not _is_real(release.delta) or not 0 <= release.delta < 1:
        problems.append(f"delta must be a finite number in [0, 1), got {release.delta!r}")
    if not _is_real(release.epsilon_after) or release.epsilon_after < 0:
        problems.append(f"epsilon_after must be a finite number >= 0, got {release.epsilon_after!r}")
    budget = release.epsilon_budget
    if budget is not None and (not _is_real(budget) or budget <= 0):
        problems.append(f"epsilon_budget must be a finite number > 0 (or absent), got {budget!r}")
    return problems


def _mechanism_problems(release: Release) -> list[str]:
    """Rules on sample_rate, noise_multiplier and steps, which depend on the mechanism."""
    rate, noise, steps = release.sample_rate, release.noise_multiplier, release.steps
    if release.mechanism == MECHANISM_NONE:
        problems = []
        if not _is_real(rate) or rate != 0:
            problems.append(f"sample_rate must be 0 for mechanism 'none', got {rate!r}")
        if not _is_real(noise) or noise != 0:
            problems.append(f"noise_multiplier must be 0 for mechanism 'none', got {noise!r}")
        if not _is_int(steps) or steps != 0:
            problems.append(f"steps must be 0 for mechanism 'none', got {steps!r}")
        return problems
    dp = release.mechanism in (MECHANISM_DP_SGD, MECHANISM_CENTRAL)
    min_steps = 1 if dp else 0
    problems = []
    if not _is_real(rate) or not (0 < rate <= 1 if dp else 0 <= rate <= 1):
        problems.append(f"sample_rate must be a number in {'(0, 1]' if dp else '[0, 1]'}, got {rate!r}")
    if not _is_real(noise) or not (noise > 0 if dp else noise >= 0):
        problems.append(f"noise_multiplier must be a finite number {'> 0' if dp else '>= 0'}, got {noise!r}")
    if not _is_int(steps) or steps < min_steps:
        problems.append(f"steps must be an integer >= {min_steps}, got {steps!r}")
    if release.mechanism == MECHANISM_CENTRAL and _is_real(rate) and rate != 1:  # no amplification is claimed
        problems.append(f"sample_rate must be 1 for mechanism {MECHANISM_CENTRAL!r}, got {rate!r}")
    return problems


def _release_problems(release: Release) -> list[str]:
    """Every rule the release's values break, each naming the field (empty when valid)."""
    return [*_text_problems(release), *_general_number_problems(release), *_mechanism_problems(release)]


def _normalized(release: Release) -> dict[str, Any]:
    """The release's values as plain int/float/str (numpy scalars and the like converted)."""
    values: dict[str, Any] = {name: getattr(release, name) for name in _RELEASE_FIELDS}
    for name in _FLOAT_FIELDS:
        values[name] = float(values[name])
    for name in _INT_FIELDS:
        values[name] = int(values[name])
    for name in _OPTIONAL_FIELDS:
        if values[name] is not None:
            values[name] = float(values[name])
    return values


def _is_utc_iso(text: Any) -> bool:
    """Whether ``text`` is an ISO-8601 time with a zero UTC offset."""
    if not isinstance(text, str):
        return False
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return False
    offset = moment.utcoffset()
    return offset is not None and offset.total_seconds() == 0


# --------------------------------------------------------------------------- reading a ledger file


@dataclass(frozen=True)
class _Snapshot:
    """The raw contents of a ledger file, read in one transaction."""

    meta: dict[str, Any]
    entries: list[LedgerEntry]
    triggers: dict[str, Any]


def _read_snapshot(conn: sqlite3.Connection, path: Path) -> _Snapshot:
    """Meta, rows and triggers, read under one read transaction; LedgerError if not a ledger."""
    try:
        conn.execute("BEGIN")
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = {"meta", "releases"} - tables
            if missing:
                raise LedgerError(f"{path} is not a medfed privacy ledger: no {' or '.join(sorted(missing))} table")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            rows = conn.execute(_select_rows(_has_budget_column(conn))).fetchall()
            triggers = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall())
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise LedgerError(f"{path} cannot be read as a medfed privacy ledger (SQLite: {exc})") from exc
    entries = [LedgerEntry(**dict(zip(_ENTRY_FIELDS, row, strict=True))) for row in rows]
    return _Snapshot(meta=meta, entries=entries, triggers=triggers)


def _has_budget_column(conn: sqlite3.Connection) -> bool:
    """Whether ``releases`` has the ``epsilon_budget`` column (ledgers made before it existed do not)."""
    return any(row[1] == "epsilon_budget" for row in conn.execute("PRAGMA table_info(releases)"))


def _select_rows(with_budget: bool) -> str:
    """Every row in seq order; NULL as the budget of a ledger without that column."""
    columns = [name if with_budget or name not in _OPTIONAL_FIELDS else f"NULL AS {name}" for name in _ENTRY_FIELDS]
    return f"SELECT {', '.join(columns)} FROM releases ORDER BY seq"


def _meta_text(snapshot: _Snapshot, key: str, path: Path) -> str:
    """A required text value of ``meta``; LedgerError if absent."""
    value = snapshot.meta.get(key)
    if not isinstance(value, str):
        raise LedgerError(f"{path} is not a medfed privacy ledger: meta has no text value for {key!r}")
    return value


def _check_version(snapshot: _Snapshot, path: Path) -> None:
    """Only this format version is read; another one is a LedgerError, not a list of problems."""
    version = _meta_text(snapshot, "version", path)
    if version != str(LEDGER_VERSION):
        raise LedgerError(
            f"{path} is a privacy ledger of version {version!r}; this medfed reads version {LEDGER_VERSION}"
        )


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


def _file_uri(path: Path, **params: str) -> str:
    """A SQLite URI for ``path`` (quoted, so '?', '#' and '%' in names are safe)."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"file:{urllib.parse.quote(str(path.absolute()))}?{query}"


def _read_only_snapshot(path: Path) -> _Snapshot:
    """Read ``path`` with a read-only connection; creates and changes nothing."""
    try:
        conn = sqlite3.connect(_file_uri(path, mode="ro"), uri=True, isolation_level=None, timeout=30)
    except sqlite3.Error as exc:
        raise LedgerError(f"{path} cannot be opened read-only (SQLite: {exc})") from exc
    try:
        return _read_snapshot(conn, path)
    finally:
        conn.close()


def _recovered_snapshot(path: Path) -> _Snapshot:
    """Read a ledger left with a hot journal by a crashed writer, without touching it.

    A read-only connection may not roll the journal back (SQLITE_READONLY_ROLLBACK), so the file
    and its journal are copied to a private temporary folder, rolled back there by SQLite, and
    read: that is exactly the last committed state, which the next writer would also restore.
    """
    journal = path.with_name(path.name + "-journal")
    with tempfile.TemporaryDirectory(prefix="medfed-ledger-") as tmp:
        copy = Path(tmp) / "ledger.sqlite"
        try:
            shutil.copyfile(path, copy)
            if journal.exists():
                shutil.copyfile(journal, copy.with_name(copy.name + "-journal"))
            conn = sqlite3.connect(copy, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(
                f"{path} has an unfinished transaction and cannot be copied to recover it: {exc}"
            ) from exc
        try:
            return _read_snapshot(conn, path)
        finally:
            conn.close()


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


# --------------------------------------------------------------------------- the anchor (outside the ledger)


def anchor_path_for_key(key_path: Path) -> Path:
    """Where the anchor of the ledger signed with the key at ``key_path`` lives: beside the key, named after it
    (``site-0.ed25519.pem`` -> ``site-0.ed25519.anchor.json``). One key signs one ledger."""
    key_path = Path(key_path)
    return key_path.with_name(key_path.name.removesuffix(".pem") + ANCHOR_SUFFIX)


@dataclass(frozen=True)
class Anchor:
    """A ledger's head as recorded outside it, signed by the ledger's key: the key has signed ``seq`` releases,
    the last with ``row_hash``."""

    path: Path
    site: str
    public_key_hex: str
    genesis: str
    seq: int
    row_hash: str
    ledger: str  # where the ledger was when the anchor was last written (a site-local path, for messages)
    updated_at: str


_ANCHOR_SIGNED = ("site", "public_key", "genesis", "seq", "row_hash", "ledger", "updated_at")
_ANCHOR_WRITE_LOCK = threading.Lock()  # replace_durably's temporary name is per process


def _anchor_message(payload: dict[str, Any]) -> bytes:
    """What an anchor's signature covers: its tag and every field but the signature, as canonical JSON."""
    body = json.dumps({k: payload.get(k) for k in _ANCHOR_SIGNED}, sort_keys=True, separators=(",", ":"))
    return _ANCHOR_TAG.encode("ascii") + b"|" + body.encode("utf-8")


def write_anchor(path: Path, signing_key: Ed25519PrivateKey, site: str, ledger: Path, seq: int, row_hash: str) -> None:
    """Record, signed, that ``signing_key`` has signed ``seq`` releases of ``site``'s ledger, the last with
    ``row_hash`` (the genesis hash for none). The file is replaced atomically and durably."""
    key_hex = public_key_hex(signing_key)
    payload: dict[str, Any] = {
        "format": _ANCHOR_TAG, "site": site, "public_key": key_hex, "genesis": genesis_hash(site, key_hex),
        "seq": int(seq), "row_hash": row_hash, "ledger": str(ledger), "updated_at": _utc_now(),
    }
    payload["signature"] = signing_key.sign(_anchor_message(payload)).hex()
    data = (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _ANCHOR_WRITE_LOCK:
            replace_durably(path, lambda tmp: tmp.write_bytes(data))
    except OSError as exc:
        raise LedgerError(f"privacy ledger anchor {path} cannot be written: {exc.strerror or exc}") from exc


def read_anchor(path: Path) -> Anchor:
    """An anchor file, checked: well-formed, its genesis that of its site and key, signed by its key.

    LedgerError if it cannot be read; LedgerVerificationError, naming the path, if it is malformed or its
    signature does not hold (edited or forged)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LedgerError(f"privacy ledger anchor {path} cannot be read: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError):
        raise LedgerVerificationError(f"privacy ledger anchor {path} is not valid JSON (edited?)") from None
    texts = ("site", "public_key", "genesis", "row_hash", "ledger", "updated_at", "signature")
    if (not isinstance(raw, dict) or raw.get("format") != _ANCHOR_TAG or not _is_int(raw.get("seq"))
            or raw["seq"] < 0 or not all(isinstance(raw.get(k), str) for k in texts)):
        raise LedgerVerificationError(
            f"privacy ledger anchor {path} is malformed (not a medfed ledger anchor, or edited)")
    try:
        key = _public_key_from_hex(raw["public_key"])
    except ValueError:
        raise LedgerVerificationError(
            f"privacy ledger anchor {path}: its public key is not 64 hex digits (edited?)") from None
    if not _signature_ok(key, raw["signature"], _anchor_message(raw)):
        raise LedgerVerificationError(f"privacy ledger anchor {path}: signature invalid (edited or forged?)")
    if raw["genesis"] != genesis_hash(raw["site"], raw["public_key"]):
        raise LedgerVerificationError(f"privacy ledger anchor {path}: genesis hash is not that of its site and key")
    return Anchor(path=path, site=raw["site"], public_key_hex=raw["public_key"], genesis=raw["genesis"], seq=raw["seq"],
                  row_hash=raw["row_hash"], ledger=raw["ledger"], updated_at=raw["updated_at"])


def anchor_problems(anchor: Anchor, site: str, key_hex: str, entries: list[LedgerEntry]) -> list[str]:
    """Why a verified ledger (of ``site``, signed by ``key_hex``, holding ``entries``) is not the one ``anchor``
    records: another key or site, fewer releases than the key signed, or another row where the anchored row should
    be. Empty when the ledger holds the anchored row (it may hold more: an anchor update lost in a crash)."""
    if anchor.public_key_hex != key_hex:
        return [f"the anchor {anchor.path} is of key {_short(anchor.public_key_hex)}, not the ledger's key "
                f"{_short(key_hex)} (key replaced?)"]
    if anchor.site != site:
        return [f"the anchor {anchor.path} is of site {anchor.site!r}, not the ledger's site {site!r}"]
    held = entries[-1].seq if entries else 0
    if held < anchor.seq:
        return [f"it holds {held} release(s) but its key already signed {anchor.seq} (anchor {anchor.path}): "
                "deleted, reset or rolled back to an older copy"]
    if anchor.seq > 0:
        row = next((e for e in entries if e.seq == anchor.seq), None)
        if row is None or row.row_hash != anchor.row_hash:
            return [f"its row {anchor.seq} is not the row {anchor.seq} its key signed (anchor {anchor.path}): "
                    "another ledger signed with the same key"]
    return []


def _own_anchor(anchor_path: Path, site: str, key_hex: str) -> Anchor | None:
    """The site's anchor at ``anchor_path`` (None if there is none yet); LedgerResetError if it records another key
    or site: the key beside it was replaced after signing releases."""
    if not anchor_path.exists():
        return None
    anchor = read_anchor(anchor_path)
    if anchor.public_key_hex != key_hex or anchor.site != site:
        raise LedgerResetError(
            f"the privacy ledger anchor {anchor_path} records {anchor.seq} release(s) of site {anchor.site!r} signed "
            f"by key {_short(anchor.public_key_hex)}, but this site is {site!r} with key {_short(key_hex)}: the "
            "signing key was replaced after it signed a ledger; restore the key and its ledger from backup"
        )
    return anchor


def _reset_error(path: Path, anchor: Anchor, what: str) -> LedgerResetError:
    """The refusal to use a ledger that is missing or behind its anchor, with the rule and the way out."""
    return LedgerResetError(
        f"privacy ledger {path} refused: {what}. This site's signing key already signed a ledger with {anchor.seq} "
        f"release(s) (anchor {anchor.path}; that ledger was at {anchor.ledger}); restore the ledger from backup (its "
        "latest copy). A fresh or older ledger would reset the site's privacy budget"
    )


def check_ledger_not_reset(path: Path, signing_key: Ed25519PrivateKey, site: str, anchor_path: Path) -> None:
    """For a site about to plan a round from an empty history because its ledger file ``path`` is missing:
    LedgerResetError if the anchor says its key has already signed releases."""
    anchor = _own_anchor(Path(anchor_path), site, public_key_hex(signing_key))
    if anchor is not None and anchor.seq > 0 and not Path(path).exists():
        raise _reset_error(Path(path), anchor, "it does not exist")


# --------------------------------------------------------------------------- the writer


def _problem_summary(path: Path, problems: list[str]) -> str:
    """A one-line LedgerError message listing the first problems."""
    shown = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
    more = len(problems) - _MAX_LISTED_PROBLEMS
    tail = f"; and {more} more" if more > 0 else ""
    return f"privacy ledger {path} failed verification ({len(problems)} problem(s)): {shown}{tail}"


@contextlib.contextmanager
def _immediate_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE (the write lock up front) ... COMMIT, or ROLLBACK on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _create_ledger_file(path: Path, signing_key: Ed25519PrivateKey, site: str) -> None:
    """Build an empty ledger in a temporary file beside ``path``, fsync it, and link it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    key_hex = public_key_hex(signing_key)
    meta = {
        "version": str(LEDGER_VERSION),
        "site": site,
        "public_key": key_hex,
        "created_at": _utc_now(),
        "head": _signed_head(signing_key, 0, genesis_hash(site, key_hex)),
    }
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in (*_SCHEMA, *_TRIGGERS.values()):
                conn.execute(statement)
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
            conn.execute("COMMIT")
        finally:
            conn.close()
        os.chmod(tmp, 0o644)  # no secrets inside; auditors may read it
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        _publish(tmp, path)  # False: another process created it meanwhile; Ledger.open verifies theirs
    except (OSError, sqlite3.Error) as exc:
        raise LedgerError(f"privacy ledger {path} cannot be created: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _connect_read_write(path: Path) -> sqlite3.Connection:
    """A connection that may write ``path`` but never creates it; explicit transactions only."""
    try:
        return sqlite3.connect(
            _file_uri(path, mode="rw"), uri=True, isolation_level=None, timeout=30, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise LedgerError(f"privacy ledger {path} cannot be opened for writing (SQLite: {exc})") from exc


def _add_budget_column(conn: sqlite3.Connection, path: Path) -> None:
    """Give a ledger made before ``epsilon_budget`` existed that column (its old rows keep NULL and their hashes)."""
    if _has_budget_column(conn):
        return
    try:
        with _immediate_transaction(conn):
            if not _has_budget_column(conn):  # another process may have added it meanwhile
                conn.execute(_ADD_BUDGET_COLUMN)
    except sqlite3.Error as exc:
        raise LedgerError(f"privacy ledger {path}: the epsilon_budget column cannot be added (SQLite: {exc})") from exc


def _insert_row(conn: sqlite3.Connection, entry: LedgerEntry, head: str) -> None:
    """Insert the row and move the signed head record to it (inside the caller's transaction)."""
    conn.execute(_INSERT_ROW, [getattr(entry, name) for name in _ENTRY_FIELDS])
    if conn.execute("UPDATE meta SET value = ? WHERE key = 'head'", (head,)).rowcount != 1:
        raise LedgerError("the ledger's head record is missing")


class Ledger:
    """A site's privacy ledger, verified on open, appended to one signed row per DP release.

    Use :meth:`open`; the object is also a context manager that closes the file.
    """

    path: Path
    site: str
    public_key_hex: str

    def __init__(
        self, path: Path, site: str, signing_key: Ed25519PrivateKey, conn: sqlite3.Connection, verified: Verification,
        anchor: Path | None = None,
    ) -> None:
        """Private: use :meth:`Ledger.open`."""
        self.path = path
        self.site = site
        self.public_key_hex = public_key_hex(signing_key)
        self.anchor = anchor
        self._key = signing_key
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._remember_tail(verified.entries, genesis_hash(site, self.public_key_hex))

    def _remember_tail(self, entries: list[LedgerEntry], genesis: str) -> None:
        """Note the last verified row: appends check the file still ends there."""
        last = entries[-1] if entries else None
        self._tail_seq = last.seq if last else 0
        self._tail_hash = last.row_hash if last else genesis
        self._epsilon_floors = _epsilon_floors(entries)

    @classmethod
    def open(
        cls, path: Path, signing_key: Ed25519PrivateKey, site: str, *, create: bool = True, anchor: Path | None = None
    ) -> Ledger:
        """Open (verifying everything) or create the ledger of ``site`` at ``path``.

        A missing file is created when ``create`` (atomically: built in a temporary file in the
        same folder, fsynced, linked into place), else LedgerError. An existing file must verify
        without a single problem with its own stored key, and that key and its site must be
        ``signing_key``'s and ``site``; otherwise LedgerVerificationError naming the rows and rules,
        and nothing is written to the file.

        With ``anchor`` (the file beside the key, :func:`anchor_path_for_key`) the ledger must also
        hold every release the anchor records: a missing ledger is not re-created, and a shorter or
        different one is refused, when the key has already signed releases (LedgerResetError naming
        the ledger, the anchor and the count). The anchor is written if absent or behind, and after
        every append.
        """
        path = Path(path)
        if not isinstance(site, str) or not site.strip():
            raise ConfigError(f"site must be non-empty text, got {site!r}")
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise LedgerError(f"the signing key for {path} must be an Ed25519 private key")
        key_hex = public_key_hex(signing_key)
        anchored = _own_anchor(Path(anchor), site, key_hex) if anchor is not None else None
        if not path.exists():
            if not create:
                raise LedgerError(f"privacy ledger {path} does not exist")
            if anchored is not None and anchored.seq > 0:
                raise _reset_error(path, anchored, "it does not exist")
            _create_ledger_file(path, signing_key, site)
        conn = _connect_read_write(path)
        try:
            verified = cls._verify_for_site(conn, path, site, key_hex)
            if anchored is not None:
                behind = anchor_problems(anchored, site, key_hex, verified.entries)
                if behind:
                    raise _reset_error(path, anchored, behind[0])
            # DELETE (rollback-journal) mode, not WAL: the ledger stays one self-contained file an
            # auditor can copy and read with mode=ro without -wal/-shm side files; a site has one
            # writer, so WAL's reader/writer concurrency buys nothing. With synchronous=FULL every
            # COMMIT is durable and atomic: a crash leaves a hot journal that the next connection
            # (or verify_ledger, in a private copy) rolls back to the last committed state.
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA synchronous=FULL")
            _add_budget_column(conn, path)
            ledger = cls(path, site, signing_key, conn, verified, None if anchor is None else Path(anchor))
            if anchor is not None and (anchored is None or anchored.seq < ledger._tail_seq):
                ledger._write_anchor()  # first open with an anchor, or an anchor update lost in a crash
        except BaseException:
            conn.close()
            raise
        return ledger

    @staticmethod
    def _verify_for_site(conn: sqlite3.Connection, path: Path, site: str, key_hex: str) -> Verification:
        """Verify the file through ``conn`` and check it is ``site``'s, signed by ``key_hex``."""
        verification = _verify_snapshot(_read_snapshot(conn, path), path, None)
        problems = list(verification.problems)
        if verification.public_key_hex != key_hex:
            problems.insert(
                0,
                f"signed by another key: the ledger's key is {_short(verification.public_key_hex)} "
                f"but this site's signing key is {_short(key_hex)}",
            )
        if verification.site != site:
            problems.insert(0, f"the ledger belongs to site {verification.site!r}, not {site!r}")
        if problems:
            raise LedgerVerificationError(_problem_summary(path, problems))
        return verification

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"privacy ledger {self.path} is closed")
        return self._conn

    def entries(self) -> list[LedgerEntry]:
        """Every row, re-verified, and checked to end where this object last wrote or verified."""
        with self._lock:
            verified = self._verify_for_site(self._connection(), self.path, self.site, self.public_key_hex)
            last = verified.entries[-1] if verified.entries else None
            genesis = genesis_hash(self.site, self.public_key_hex)
            last_seq, last_hash = (last.seq, last.row_hash) if last else (0, genesis)
            if (last_seq, last_hash) != (self._tail_seq, self._tail_hash):
                raise LedgerError(
                    f"privacy ledger {self.path} changed under us: it ends at row {last_seq}, "
                    f"but this process last verified or wrote row {self._tail_seq}; reopen it"
                )
        return verified.entries

    def append(self, release: Release) -> LedgerEntry:
        """Validate ``release``, then add it as the next signed row, in one SQLite transaction.

        Invalid values raise ConfigError naming the field and rule, and nothing is written. If the
        file's last row is not the one this object last verified or wrote, LedgerError.
        """
        if not isinstance(release, Release):
            raise ConfigError(f"append needs a Release, got {type(release).__name__}")
        problems = _release_problems(release)
        if problems:
            raise ConfigError(f"release not written to privacy ledger {self.path}: {'; '.join(problems)}")
        with self._lock:
            conn = self._connection()
            try:
                with _immediate_transaction(conn):
                    entry = self._append_in_transaction(conn, release)
            except sqlite3.Error as exc:
                raise LedgerError(
                    f"privacy ledger {self.path}: append failed, nothing written (SQLite: {exc})"
                ) from exc
            self._tail_seq, self._tail_hash = entry.seq, entry.row_hash
            _raise_floor(self._epsilon_floors, entry)
            if self.anchor is not None:
                self._write_anchor()
        return entry

    def _write_anchor(self) -> None:
        """Record the ledger's current tail in the anchor beside the key."""
        if self.anchor is None:
            return
        try:
            write_anchor(self.anchor, self._key, self.site, self.path, self._tail_seq, self._tail_hash)
        except LedgerError as exc:
            raise LedgerError(f"privacy ledger {self.path}: row {self._tail_seq} is recorded but {exc}") from exc

    def _append_in_transaction(self, conn: sqlite3.Connection, release: Release) -> LedgerEntry:
        """Check the tail, build, sign and insert the next row (the caller commits)."""
        tail = conn.execute("SELECT seq, row_hash FROM releases ORDER BY seq DESC LIMIT 1").fetchone()
        tail_seq, tail_hash = tuple(tail) if tail else (0, genesis_hash(self.site, self.public_key_hex))
        if (tail_seq, tail_hash) != (self._tail_seq, self._tail_hash):
            raise LedgerError(
                f"privacy ledger {self.path} changed under us: it ends at row {tail_seq}, but this process "
                f"last verified row {self._tail_seq}; nothing written, reopen it to re-verify"
            )
        values = _normalized(release)
        regression = _epsilon_regression(Release(**values), self._epsilon_floors)
        if regression:
            raise ConfigError(f"release not written to privacy ledger {self.path}: {regression}")
        unsigned = LedgerEntry(
            **values,
            seq=tail_seq + 1,
            site=self.site,
            created_at=_utc_now(),
            prev_hash=tail_hash,
            row_hash="",
            signature="",
        )
        row_hash = _row_hash(unsigned)
        signature = self._key.sign(bytes.fromhex(row_hash)).hex()
        entry = LedgerEntry(**{**asdict(unsigned), "row_hash": row_hash, "signature": signature})
        _insert_row(conn, entry, _signed_head(self._key, entry.seq, row_hash))
        return entry

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, site={self.site!r}, key={_short(self.public_key_hex)})"
