"""The anchor: a ledger's head recorded outside the ledger file, beside the signing key and signed with it,
and the refusal (:class:`~medfed.exceptions.LedgerResetError`) of a ledger that is missing or behind it."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.exceptions import LedgerError, LedgerResetError, LedgerVerificationError
from medfed.files import replace_durably
from medfed.privacy.ledger.chain import _signature_ok, _utc_now, genesis_hash
from medfed.privacy.ledger.keys import _public_key_from_hex, _short, public_key_hex
from medfed.privacy.ledger.records import LedgerEntry, _is_int

_ANCHOR_TAG = "medfed-privacy-ledger-anchor"
ANCHOR_SUFFIX = ".anchor.json"


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
