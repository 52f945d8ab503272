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

The package, lowest layer first: :mod:`.records` (row format and value rules), :mod:`.keys` (signing keys),
:mod:`.chain` (canonical hashing and signing), :mod:`.storage` (the SQLite file), :mod:`.verify` (checks and
:func:`verify_ledger`), :mod:`.anchor` (the anchor beside the key) and :mod:`.writer` (:class:`Ledger`).
"""

from __future__ import annotations

from medfed.privacy.ledger.anchor import (
    ANCHOR_SUFFIX,
    Anchor,
    anchor_path_for_key,
    anchor_problems,
    check_ledger_not_reset,
    read_anchor,
    write_anchor,
)
from medfed.privacy.ledger.chain import genesis_hash
from medfed.privacy.ledger.keys import load_or_create_signing_key, load_public_key, public_key_hex
from medfed.privacy.ledger.records import (
    LEDGER_VERSION,
    MECHANISM_CENTRAL,
    MECHANISM_DP_SGD,
    MECHANISM_NONE,
    MECHANISMS,
    LedgerEntry,
    Release,
)
from medfed.privacy.ledger.verify import Verification, verify_ledger
from medfed.privacy.ledger.writer import Ledger

__all__ = [
    "ANCHOR_SUFFIX",
    "LEDGER_VERSION",
    "MECHANISMS",
    "MECHANISM_CENTRAL",
    "MECHANISM_DP_SGD",
    "MECHANISM_NONE",
    "Anchor",
    "Ledger",
    "LedgerEntry",
    "Release",
    "Verification",
    "anchor_path_for_key",
    "anchor_problems",
    "check_ledger_not_reset",
    "genesis_hash",
    "load_or_create_signing_key",
    "load_public_key",
    "public_key_hex",
    "read_anchor",
    "verify_ledger",
    "write_anchor",
]
