"""The signed per-site privacy ledger: round trip, keys, tamper evidence, validation, crash atomicity."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.exceptions import ConfigError, LedgerError
from medfed.privacy.ledger import (
    LEDGER_VERSION,
    MECHANISM_CENTRAL,
    MECHANISM_DP_SGD,
    MECHANISM_NONE,
    Ledger,
    LedgerEntry,
    Release,
    genesis_hash,
    load_or_create_signing_key,
    load_public_key,
    public_key_hex,
    verify_ledger,
)

REPO = Path(__file__).resolve().parents[1]
SITE = "site-a"


def _release(i: int, **overrides: object) -> Release:
    """A valid DP-SGD release; epsilon grows with ``i``."""
    values: dict[str, object] = {
        "run_id": "run-1",
        "server_round": i,
        "phase": "pretrain",
        "mechanism": MECHANISM_DP_SGD,
        "sample_rate": 0.01,
        "noise_multiplier": 1.1,
        "steps": 100,
        "delta": 1e-5,
        "epsilon_after": 0.1 * (i + 1),
        "accountant": "rdp",
    }
    values.update(overrides)
    return Release(**values)  # type: ignore[arg-type]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _row_count(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM releases").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture()
def key(tmp_path: Path) -> Ed25519PrivateKey:
    return load_or_create_signing_key(tmp_path / "keys" / f"{SITE}.pem")


@pytest.fixture()
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger" / f"{SITE}.sqlite"


@pytest.fixture()
def filled(ledger_path: Path, key: Ed25519PrivateKey) -> tuple[Path, Ed25519PrivateKey, list[LedgerEntry]]:
    """A ledger with three releases, closed."""
    with Ledger.open(ledger_path, key, SITE) as ledger:
        written = [ledger.append(_release(i)) for i in range(3)]
    return ledger_path, key, written


# --------------------------------------------------------------------------- round trip and format


def test_restart_round_trip_keeps_every_field(filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]]) -> None:
    path, key, written = filled
    with Ledger.open(path, key, SITE, create=False) as ledger:
        read = ledger.entries()
        assert ledger.site == SITE and ledger.public_key_hex == public_key_hex(key)
    assert [e.seq for e in read] == [1, 2, 3]
    for before, after in zip(written, read, strict=True):
        for field in fields(LedgerEntry):
            assert getattr(before, field.name) == getattr(after, field.name), field.name
            assert type(getattr(before, field.name)) is type(getattr(after, field.name)), field.name
    assert read[0].prev_hash == genesis_hash(SITE, public_key_hex(key))
    assert all(b.prev_hash == a.row_hash for a, b in itertools.pairwise(read))
    verification = verify_ledger(path, trusted_public_key=key.public_key())
    assert verification.ok, verification.problems
    assert verification.entries == read and verification.site == SITE


def test_reopened_ledger_continues_the_chain(filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]]) -> None:
    path, key, written = filled
    with Ledger.open(path, key, SITE) as ledger:
        entry = ledger.append(
            _release(
                3,
                mechanism=MECHANISM_NONE,
                sample_rate=0,
                noise_multiplier=0,
                steps=0,
                epsilon_after=written[-1].epsilon_after,
            )
        )
        assert entry.seq == 4 and entry.prev_hash == written[-1].row_hash
        assert len(ledger.entries()) == 4
    assert verify_ledger(path).ok


def test_row_hash_signature_and_head_follow_the_documented_format(
    filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]],
) -> None:
    """An auditor can recompute everything from the spec alone: pin the canonical form."""
    path, key, written = filled
    public = key.public_key()
    for entry in written:
        payload = {k: v for k, v in asdict(entry).items() if k not in ("row_hash", "signature")}
        assert payload.pop("epsilon_budget") is None  # an optional field is hashed only when set
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        assert hashlib.sha256(canonical.encode()).hexdigest() == entry.row_hash
        public.verify(bytes.fromhex(entry.signature), bytes.fromhex(entry.row_hash))
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    conn.close()
    assert meta["version"] == str(LEDGER_VERSION) and meta["site"] == SITE
    assert meta["public_key"] == public_key_hex(public)
    head = json.loads(meta["head"])
    assert (head["seq"], head["row_hash"]) == (3, written[-1].row_hash)
    public.verify(bytes.fromhex(head["signature"]), b"head|3|" + written[-1].row_hash.encode())


def test_genesis_hash_binds_site_and_key(key: Ed25519PrivateKey) -> None:
    other = public_key_hex(Ed25519PrivateKey.generate())
    mine = public_key_hex(key)
    assert genesis_hash(SITE, mine) != genesis_hash("site-b", mine)
    assert genesis_hash(SITE, mine) != genesis_hash(SITE, other)
    assert len(genesis_hash(SITE, mine)) == 64


def test_create_is_atomic_and_leaves_no_temporary_files(ledger_path: Path, key: Ed25519PrivateKey) -> None:
    with Ledger.open(ledger_path, key, SITE) as ledger:
        assert ledger.entries() == []
    assert _listing(ledger_path.parent) == [ledger_path.name]
    verification = verify_ledger(ledger_path)
    assert verification.ok and verification.entries == []


def test_open_without_create_refuses_a_missing_file(ledger_path: Path, key: Ed25519PrivateKey) -> None:
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger.open(ledger_path, key, SITE, create=False)
    assert not ledger_path.exists()


def test_closed_ledger_refuses_use(ledger_path: Path, key: Ed25519PrivateKey) -> None:
    ledger = Ledger.open(ledger_path, key, SITE)
    ledger.close()
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.append(_release(0))


# --------------------------------------------------------------------------- keys


def test_signing_key_is_created_private_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "site.pem"
    key = load_or_create_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_key_hex(load_or_create_signing_key(path)) == public_key_hex(key)
    assert _listing(path.parent) == ["site.pem"]


@pytest.mark.parametrize(
    "content",
    [b"not a key\n", b"", b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n", "public-pem"],
)
def test_non_key_file_is_a_ledger_error_naming_the_path(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "site.pem"
    if content == "public-pem":
        content = (
            Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    assert isinstance(content, bytes)
    path.write_bytes(content)
    with pytest.raises(LedgerError, match="site.pem"):
        load_or_create_signing_key(path)
    assert path.read_bytes() == content


def test_public_key_loads_from_pem_or_hex(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    pem = tmp_path / "pub.pem"
    pem.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    hex_file = tmp_path / "pub.hex"
    hex_file.write_text(public_key_hex(key) + "\n")
    assert public_key_hex(load_public_key(pem)) == public_key_hex(key)
    assert public_key_hex(load_public_key(hex_file)) == public_key_hex(key)


@pytest.mark.parametrize("content", [b"abcd\n", b"zz" * 32, b"\xff\xfe", b"-----BEGIN PUBLIC KEY-----\nx\n"])
def test_bad_public_key_file_is_a_ledger_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "pub.key"
    path.write_bytes(content)
    with pytest.raises(LedgerError, match="pub.key"):
        load_public_key(path)
    with pytest.raises(LedgerError, match="missing.key"):
        load_public_key(tmp_path / "missing.key")


# --------------------------------------------------------------------------- tampering


def _raw(path: Path) -> sqlite3.Connection:
    """An attacker's connection: autocommit, append-only triggers dropped."""
    conn = sqlite3.connect(path, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    return conn


def _rows(conn: sqlite3.Connection) -> list[dict[str, object]]:
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM releases ORDER BY seq")]
    conn.row_factory = None
    return rows


def _write_row(conn: sqlite3.Connection, row: dict[str, object]) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO releases ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values())
    )


def _rehash(row: dict[str, object]) -> dict[str, object]:
    """What an attacker without the key can do: recompute row_hash (the signature stays stale)."""
    payload = {k: v for k, v in row.items() if k not in ("row_hash", "signature")}
    row = dict(row)
    row["row_hash"] = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return row


def _edit_value(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    conn.execute("UPDATE releases SET epsilon_after = 0.05 WHERE seq = 2")


def _edit_and_rehash(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    row = _rows(conn)[1]
    row["noise_multiplier"] = 5.0
    _write_row(conn, _rehash(row))


def _delete_middle(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    conn.execute("DELETE FROM releases WHERE seq = 2")


def _delete_last(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    conn.execute("DELETE FROM releases WHERE seq = 3")


def _delete_all(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    conn.execute("DELETE FROM releases")


def _swap_contents(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    """Rows 1 and 2 exchange everything but their seq."""
    one, two = _rows(conn)[:2]
    _write_row(conn, {**two, "seq": 1})
    _write_row(conn, {**one, "seq": 2})


def _swap_seq_numbers(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    """Rows 1 and 2 exchange their seq numbers (the same rows, reordered)."""
    conn.execute("UPDATE releases SET seq = -1 WHERE seq = 1")
    conn.execute("UPDATE releases SET seq = 1 WHERE seq = 2")
    conn.execute("UPDATE releases SET seq = 2 WHERE seq = -1")


def _swap_and_fix_up(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    """Swap rows 1 and 2, then repair seq, prev_hash and row_hash so the chain links again."""
    rows = _rows(conn)
    rows[0], rows[1] = rows[1], rows[0]
    prev = genesis_hash(SITE, public_key_hex(key))
    for seq, row in enumerate(rows, start=1):
        fixed = _rehash({**row, "seq": seq, "prev_hash": prev})
        _write_row(conn, fixed)
        prev = fixed["row_hash"]  # type: ignore[assignment]


def _forge_signature(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    row = _rows(conn)[1]
    forged = Ed25519PrivateKey.generate().sign(bytes.fromhex(row["row_hash"])).hex()  # type: ignore[arg-type]
    conn.execute("UPDATE releases SET signature = ? WHERE seq = 2", (forged,))


def _replace_public_key(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    other = public_key_hex(Ed25519PrivateKey.generate())
    conn.execute("UPDATE meta SET value = ? WHERE key = 'public_key'", (other,))


def _garble_public_key(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    conn.execute("UPDATE meta SET value = 'not-a-key' WHERE key = 'public_key'")


def _append_unsigned(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    """A fourth row that chains correctly but is not signed by the site (and the head not moved)."""
    last = _rows(conn)[-1]
    row = _rehash({**last, "seq": 4, "server_round": 3, "epsilon_after": 9.0, "prev_hash": last["row_hash"]})
    _write_row(conn, row)


def _delete_head(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    conn.execute("DELETE FROM meta WHERE key = 'head'")


def _drop_triggers_only(conn: sqlite3.Connection, key: Ed25519PrivateKey) -> None:
    """_raw already dropped them; nothing else changes."""


TAMPERS: list[tuple[str, Callable[[sqlite3.Connection, Ed25519PrivateKey], None], str]] = [
    ("edit epsilon of row 2", _edit_value, "row 2: hash does not match its contents"),
    ("edit row 2 and rehash", _edit_and_rehash, "row 2: signature invalid"),
    ("delete row 2", _delete_middle, "rows jump from seq 1 to 3 (row 2 deleted?)"),
    ("delete the last row", _delete_last, "head record says 3 rows, ledger holds 2"),
    ("delete every row", _delete_all, "head record says 3 rows, ledger holds 0"),
    ("swap contents of rows 1 and 2", _swap_contents, "row 1: hash does not match its contents"),
    ("swap seq numbers of rows 1 and 2", _swap_seq_numbers, "row 1: prev_hash is not the genesis hash"),
    ("swap rows 1 and 2, fix up chain", _swap_and_fix_up, "row 1: signature invalid"),
    ("forge the signature of row 2", _forge_signature, "row 2: signature invalid"),
    ("replace the public key in meta", _replace_public_key, "row 1: prev_hash is not the genesis hash"),
    ("garble the public key in meta", _garble_public_key, "meta public key"),
    ("append an unsigned row 4", _append_unsigned, "row 4: signature invalid"),
    ("delete the head record", _delete_head, "head record missing"),
    ("drop the append-only triggers", _drop_triggers_only, "append-only trigger releases_no_update missing"),
]


@pytest.mark.parametrize(("tamper", "expected"), [(t, e) for _, t, e in TAMPERS], ids=[n for n, _, _ in TAMPERS])
def test_tampering_is_reported_and_blocks_open(
    filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]],
    tamper: Callable[[sqlite3.Connection, Ed25519PrivateKey], None],
    expected: str,
) -> None:
    path, key, _ = filled
    conn = _raw(path)
    tamper(conn, key)
    conn.close()
    before, listing = _sha(path), _listing(path.parent)

    verification = verify_ledger(path)
    assert not verification.ok
    assert any(expected in problem for problem in verification.problems), verification.problems

    with pytest.raises(LedgerError) as caught:
        Ledger.open(path, key, SITE)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value) or "signed by another key" in str(caught.value)
    assert _sha(path) == before and _listing(path.parent) == listing


def test_tampering_with_the_last_row_and_head_is_still_caught(
    filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]],
) -> None:
    """Deleting the last row and rewriting the head without the key: the head signature fails."""
    path, _key, written = filled
    conn = _raw(path)
    conn.execute("DELETE FROM releases WHERE seq = 3")
    head = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'head'").fetchone()[0])
    head.update(seq=2, row_hash=written[1].row_hash)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'head'", (json.dumps(head),))
    conn.close()
    problems = verify_ledger(path).problems
    assert "head record: signature invalid" in problems


def test_another_sites_key_is_refused(filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]]) -> None:
    path, key, _ = filled
    other = Ed25519PrivateKey.generate()
    before = _sha(path)
    with pytest.raises(LedgerError, match="signed by another key"):
        Ledger.open(path, other, SITE)
    with pytest.raises(LedgerError, match="belongs to site 'site-a', not 'site-b'"):
        Ledger.open(path, key, "site-b")
    assert _sha(path) == before
    problems = verify_ledger(path, trusted_public_key=other.public_key()).problems
    assert len(problems) == 1 and "signed by another key" in problems[0]
    assert public_key_hex(key)[:16] in problems[0] and public_key_hex(other)[:16] in problems[0]
    assert verify_ledger(path, trusted_public_key=key.public_key()).ok


def test_ledger_resigned_with_an_attackers_key_needs_the_trusted_key(
    filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]], tmp_path: Path
) -> None:
    """A consistent forgery under a new key verifies on its own; only the trusted key exposes it."""
    _path, key, written = filled
    attacker = Ed25519PrivateKey.generate()
    forged = tmp_path / "forged.sqlite"
    with Ledger.open(forged, attacker, SITE) as ledger:
        for entry in written:
            ledger.append(Release(**{f.name: getattr(entry, f.name) for f in fields(Release)}))
    assert verify_ledger(forged).ok
    assert not verify_ledger(forged, trusted_public_key=key.public_key()).ok
    with pytest.raises(LedgerError, match="signed by another key"):
        Ledger.open(forged, key, SITE)


def test_a_ledger_changed_under_an_open_writer_refuses_to_append(ledger_path: Path, key: Ed25519PrivateKey) -> None:
    first = Ledger.open(ledger_path, key, SITE)
    second = Ledger.open(ledger_path, key, SITE)
    try:
        first.append(_release(0))
        with pytest.raises(LedgerError, match="changed under us"):
            second.append(_release(1))
        with pytest.raises(LedgerError, match="changed under us"):
            second.entries()
        assert _row_count(ledger_path) == 1
        first.append(_release(1))
    finally:
        first.close()
        second.close()
    assert verify_ledger(ledger_path).ok


# --------------------------------------------------------------------------- validation


BAD_RELEASES = [
    ("negative steps", {"steps": -1}, "steps"),
    ("zero steps for DP", {"steps": 0}, "steps"),
    ("fractional steps", {"steps": 1.5}, "steps"),
    ("sample rate 0 for DP", {"sample_rate": 0.0}, "sample_rate"),
    ("sample rate above 1", {"sample_rate": 1.5}, "sample_rate"),
    ("noise 0 for DP", {"noise_multiplier": 0.0}, "noise_multiplier"),
    ("infinite noise", {"noise_multiplier": math.inf}, "noise_multiplier"),
    ("NaN epsilon", {"epsilon_after": math.nan}, "epsilon_after"),
    ("infinite epsilon", {"epsilon_after": math.inf}, "epsilon_after"),
    ("negative epsilon", {"epsilon_after": -0.1}, "epsilon_after"),
    ("delta 1", {"delta": 1.0}, "delta"),
    ("negative delta", {"delta": -1e-5}, "delta"),
    ("unknown mechanism", {"mechanism": "laplace"}, "mechanism"),
    ("empty phase", {"phase": ""}, "phase"),
    ("empty accountant", {"accountant": " "}, "accountant"),
    ("empty run id", {"run_id": ""}, "run_id"),
    ("negative round", {"server_round": -1}, "server_round"),
    ("boolean round", {"server_round": True}, "server_round"),
    ("none with noise", {"mechanism": MECHANISM_NONE, "sample_rate": 0.0, "steps": 0}, "noise_multiplier"),
    ("none with steps", {"mechanism": MECHANISM_NONE, "sample_rate": 0.0, "noise_multiplier": 0.0}, "steps"),
    ("epsilon below the last row's", {"epsilon_after": 0.2}, "cannot decrease"),
    ("central mechanism sampling above 1", {"mechanism": MECHANISM_CENTRAL, "sample_rate": 1.5}, "sample_rate"),
    ("central mechanism without noise", {"mechanism": MECHANISM_CENTRAL, "sample_rate": 1.0, "noise_multiplier": 0.0},
     "noise_multiplier"),
    ("central mechanism without steps", {"mechanism": MECHANISM_CENTRAL, "sample_rate": 1.0, "steps": 0}, "steps"),
]


@pytest.mark.parametrize(
    ("overrides", "field"), [(o, f) for _, o, f in BAD_RELEASES], ids=[n for n, _, _ in BAD_RELEASES]
)
def test_bad_release_values_are_refused_and_nothing_written(
    filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]], overrides: dict[str, object], field: str
) -> None:
    path, key, _ = filled
    before = _sha(path)
    with Ledger.open(path, key, SITE) as ledger:
        with pytest.raises(ConfigError, match=field):
            ledger.append(_release(3, **overrides))
        assert len(ledger.entries()) == 3
        ledger.append(_release(3))  # the object is still usable afterwards
    assert _row_count(path) == 4
    assert before != _sha(path)


def test_epsilon_may_only_fall_with_another_delta_or_accountant(
    filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]],
) -> None:
    """A larger delta gives a smaller epsilon for the same mechanisms; only like is compared with like."""
    path, key, written = filled
    last = written[-1].epsilon_after
    with Ledger.open(path, key, SITE) as ledger:
        ledger.append(_release(3, delta=1e-3, epsilon_after=last / 2))
        ledger.append(_release(4, accountant="prv", epsilon_after=last / 3))
        ledger.append(_release(5, epsilon_after=last * (1 - 1e-12)))  # recomputation round-off
        with pytest.raises(ConfigError, match="below row 4's"):
            ledger.append(_release(6, delta=1e-3, epsilon_after=last / 4))
        with pytest.raises(ConfigError, match="below row 3's"):
            ledger.append(_release(6, epsilon_after=last * 0.999))
    assert verify_ledger(path).ok and _row_count(path) == 6


def test_numpy_like_numbers_are_stored_as_plain_values(ledger_path: Path, key: Ed25519PrivateKey) -> None:
    np = pytest.importorskip("numpy")
    release = _release(0, steps=np.int64(7), sample_rate=np.float32(0.5), epsilon_after=np.float64(1.25))
    with Ledger.open(ledger_path, key, SITE) as ledger:
        entry = ledger.append(release)
    assert type(entry.steps) is int and type(entry.sample_rate) is float and entry.steps == 7
    with Ledger.open(ledger_path, key, SITE) as ledger:
        assert ledger.entries() == [entry]


def test_a_bad_site_name_is_a_config_error(ledger_path: Path, key: Ed25519PrivateKey) -> None:
    with pytest.raises(ConfigError, match="site"):
        Ledger.open(ledger_path, key, "")
    assert not ledger_path.exists()


# --------------------------------------------------------------------------- triggers


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE releases SET epsilon_after = 0 WHERE seq = 2",
        "DELETE FROM releases WHERE seq = 3",
        "INSERT OR REPLACE INTO releases SELECT * FROM releases WHERE seq = 1",
        (
            "INSERT INTO releases SELECT 9, run_id, server_round, phase, mechanism, sample_rate, noise_multiplier, "
            "steps, delta, epsilon_after, accountant, site, created_at, prev_hash, row_hash, signature, epsilon_budget "
            "FROM releases WHERE seq = 1"
        ),
        "UPDATE meta SET value = 'site-b' WHERE key = 'site'",
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('public_key', 'x')",
        "DELETE FROM meta WHERE key = 'head'",
    ],
)
def test_sql_triggers_refuse_rewrites(
    filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]], statement: str
) -> None:
    path, _, _ = filled
    before = _sha(path)
    conn = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(sqlite3.IntegrityError, match="medfed privacy ledger"):
        conn.execute(statement)
    conn.close()
    assert _sha(path) == before
    assert verify_ledger(path).ok


# --------------------------------------------------------------------------- verify_ledger is read-only


def test_verify_ledger_changes_nothing(filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]]) -> None:
    path, _, _ = filled
    before, listing, mtime = _sha(path), _listing(path.parent), path.stat().st_mtime_ns
    for _ in range(2):
        assert verify_ledger(path).ok
    assert _sha(path) == before and _listing(path.parent) == listing and path.stat().st_mtime_ns == mtime


def test_verify_ledger_works_on_a_read_only_copy(filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]]) -> None:
    path, _, _ = filled
    path.chmod(0o444)
    try:
        assert verify_ledger(path).ok
    finally:
        path.chmod(0o644)


def test_verify_ledger_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="nothing.sqlite"):
        verify_ledger(tmp_path / "nothing.sqlite")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("kind", ["text", "random", "empty", "other-sqlite"])
def test_verify_ledger_refuses_a_file_that_is_no_ledger(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "ledger.sqlite"
    if kind == "text":
        path.write_text("hello, not a database\n" * 100)
    elif kind == "random":
        path.write_bytes(os.urandom(8192))
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
    before = _sha(path)
    with pytest.raises(LedgerError, match="ledger.sqlite"):
        verify_ledger(path)
    with pytest.raises(LedgerError, match="ledger.sqlite"):
        Ledger.open(path, Ed25519PrivateKey.generate(), SITE)
    assert _sha(path) == before and _listing(tmp_path) == ["ledger.sqlite"]


# --------------------------------------------------------------------------- crash atomicity


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


_APPEND_FOREVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from medfed.privacy.ledger import Ledger, Release, load_or_create_signing_key
    key = load_or_create_signing_key(Path(sys.argv[1]))
    with Ledger.open(Path(sys.argv[2]), key, "site-a", create=False) as ledger:
        i = len(ledger.entries())
        while True:
            ledger.append(Release("run-1", i, "pretrain", "poisson-subsampled-gaussian", 0.01, 1.1, 100, 1e-5,
                                  0.01 * (i + 1), "rdp"))
            i += 1
            print(i, flush=True)
    """
)


@pytest.mark.parametrize("delay_s", [0.0, 0.003, 0.011])
def test_killed_writer_leaves_a_contiguous_verified_prefix(
    ledger_path: Path, key: Ed25519PrivateKey, tmp_path: Path, delay_s: float
) -> None:
    key_path = tmp_path / "keys" / f"{SITE}.pem"
    Ledger.open(ledger_path, key, SITE).close()
    proc = subprocess.Popen(
        [sys.executable, "-c", _APPEND_FOREVER, str(key_path), str(ledger_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_subprocess_env(),
        text=True,
    )
    try:
        done = 0
        deadline = time.monotonic() + 20
        while done < 20 and time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                break
            done = int(line)
        assert done >= 20, proc.stderr.read() if proc.stderr else ""
        time.sleep(delay_s)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    verification = verify_ledger(ledger_path, trusted_public_key=key.public_key())
    assert verification.ok, verification.problems
    rows = verification.entries
    assert len(rows) >= done
    assert [e.seq for e in rows] == list(range(1, len(rows) + 1))
    assert all(e.epsilon_after == pytest.approx(0.01 * e.seq) and e.server_round == e.seq - 1 for e in rows)
    with Ledger.open(ledger_path, key, SITE) as ledger:
        assert ledger.entries() == rows
        assert ledger.append(_release(len(rows), epsilon_after=1e3)).seq == len(rows) + 1


_CRASH_BEFORE_COMMIT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import medfed.privacy.ledger as m
    import medfed.privacy.ledger.writer as writer
    original = writer._insert_row
    def insert_then_die(conn, entry, head):
        original(conn, entry, head)
        # spill dirty pages to the file so the crash leaves a hot journal behind
        conn.execute("PRAGMA cache_size = 1")
        conn.execute("CREATE TABLE junk (x)")
        for _ in range(2000):
            conn.execute("INSERT INTO junk VALUES (?)", ("x" * 500,))
        os._exit(9)
    writer._insert_row = insert_then_die
    key = m.load_or_create_signing_key(Path(sys.argv[1]))
    with m.Ledger.open(Path(sys.argv[2]), key, "site-a") as ledger:
        ledger.append(m.Release("run-1", 3, "pretrain", "poisson-subsampled-gaussian", 0.01, 1.1, 100, 1e-5,
                                5.0, "rdp"))
    """
)


def test_crash_inside_the_append_transaction_leaves_the_old_ledger(
    filled: tuple[Path, Ed25519PrivateKey, list[LedgerEntry]], tmp_path: Path
) -> None:
    path, key, written = filled
    key_path = tmp_path / "keys" / f"{SITE}.pem"
    result = subprocess.run(
        [sys.executable, "-c", _CRASH_BEFORE_COMMIT, str(key_path), str(path)],
        capture_output=True,
        text=True,
        env=_subprocess_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 9, result.stderr
    journal = path.with_name(path.name + "-journal")
    assert journal.exists()  # the hot journal a crashed writer leaves
    before, listing = _sha(path), _listing(path.parent)

    verification = verify_ledger(path)  # rolls back in a private copy, not in place
    assert verification.ok, verification.problems
    assert verification.entries == written
    assert _sha(path) == before and _listing(path.parent) == listing

    with Ledger.open(path, key, SITE) as ledger:  # the writer rolls the journal back for real
        assert ledger.entries() == written
        assert ledger.append(_release(3)).seq == 4
    assert not journal.exists()
    assert verify_ledger(path).ok


def test_release_and_entry_are_frozen() -> None:
    release = _release(0)
    with pytest.raises(AttributeError):
        release.steps = 5  # type: ignore[misc]
    assert replace(release, steps=5).steps == 5
