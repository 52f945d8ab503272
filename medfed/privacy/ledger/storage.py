"""The ledger's SQLite file: its schema and append-only triggers, creating a file atomically, opening it for
writing, write transactions, and reading its raw contents in one transaction (read-only, or from a crashed
writer's hot journal rolled back in a private copy)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.exceptions import LedgerError
from medfed.privacy.ledger.chain import _signed_head, _utc_now, genesis_hash
from medfed.privacy.ledger.keys import _publish, public_key_hex
from medfed.privacy.ledger.records import _ENTRY_FIELDS, _OPTIONAL_FIELDS, LEDGER_VERSION, LedgerEntry

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


# --------------------------------------------------------------------------- writing a ledger file


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
