""":class:`Ledger`, the writer: a site's ledger verified on open, checked against its anchor, and appended to one
signed row per release in one SQLite transaction."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.exceptions import ConfigError, LedgerError, LedgerVerificationError
from medfed.privacy.ledger.anchor import _own_anchor, _reset_error, anchor_problems, write_anchor
from medfed.privacy.ledger.chain import _row_hash, _signed_head, _utc_now, genesis_hash
from medfed.privacy.ledger.keys import _short, public_key_hex
from medfed.privacy.ledger.records import _ENTRY_FIELDS, LedgerEntry, Release, _normalized, _release_problems
from medfed.privacy.ledger.storage import (
    _INSERT_ROW,
    _add_budget_column,
    _connect_read_write,
    _create_ledger_file,
    _immediate_transaction,
    _read_snapshot,
)
from medfed.privacy.ledger.verify import (
    Verification,
    _epsilon_floors,
    _epsilon_regression,
    _raise_floor,
    _verify_snapshot,
)

_MAX_LISTED_PROBLEMS = 10


# --------------------------------------------------------------------------- the writer


def _problem_summary(path: Path, problems: list[str]) -> str:
    """A one-line LedgerError message listing the first problems."""
    shown = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
    more = len(problems) - _MAX_LISTED_PROBLEMS
    tail = f"; and {more} more" if more > 0 else ""
    return f"privacy ledger {path} failed verification ({len(problems)} problem(s)): {shown}{tail}"


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
