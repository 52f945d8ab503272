"""What an audit (`medfed.privacy.audit`) reads: the ledgers (and anchors) in a run directory, a folder or a
file, the run's config, and the anchors found for the audit with the ledgers that used them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.exceptions import LedgerError
from medfed.privacy.ledger import ANCHOR_SUFFIX, Anchor, read_anchor

LEDGER_GLOB = "*.ledger.sqlite"
ANCHOR_GLOB = f"*{ANCHOR_SUFFIX}"


def find_ledgers(target: Path, pattern: str = LEDGER_GLOB) -> list[Path]:
    """Ledgers (or, with ``pattern``, other files such as anchors) in a run directory (its ledgers/ or the
    ledger-dir of its config), a folder, or a file."""
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise LedgerError(f"audit target {str(target)!r} does not exist")
    found = sorted(target.rglob(pattern))
    config = _run_config(target)
    if config and config.get("ledger-dir"):
        external = Path(str(config["ledger-dir"])).expanduser()
        if external.is_dir():
            found += sorted(p for p in external.rglob(pattern) if p not in found)
    return found


@dataclass
class _Anchors:
    """The anchors found for an audit, by the public key they belong to, and which ledgers used them."""

    by_key: dict[str, Anchor] = field(default_factory=dict)
    expected: set[str] = field(default_factory=set)  # keys whose ledger must be among those audited
    used: set[str] = field(default_factory=set)  # keys whose ledger was audited
    problems: list[str] = field(default_factory=list)

    def add(self, path: Path, *, expected: bool) -> None:
        """Read one anchor file (an unreadable or forged one is a problem of the audit)."""
        try:
            anchor = read_anchor(path)
        except LedgerError as exc:
            self.problems.append(f"anchor {path}: {exc}")
            return
        if expected:
            self.expected.add(anchor.public_key_hex)
        known = self.by_key.get(anchor.public_key_hex)
        if known is None or anchor.seq > known.seq:  # copies of one key's anchor: the furthest one counts
            self.by_key[anchor.public_key_hex] = anchor

    def for_ledger(self, public_key: str) -> Anchor | None:
        self.used.add(public_key)
        return self.by_key.get(public_key)

    def orphans(self) -> list[str]:
        """Anchors that record releases but whose ledger was not audited: the ledger was deleted (or replaced by
        one signed with another key)."""
        return [
            f"anchor {a.path}: the key {a.public_key_hex[:16]}.. of site {a.site!r} signed a ledger with {a.seq} "
            f"release(s) (it was at {a.ledger}), but no readable ledger signed by that key was found (deleted, "
            "unreadable, or replaced by a ledger of another key?)"
            for a in sorted(self.by_key.values(), key=lambda a: str(a.path))
            if a.seq > 0 and a.public_key_hex in self.expected and a.public_key_hex not in self.used
        ]


def _collect_anchors(targets: Sequence[Path], anchors: Path | None) -> _Anchors:
    """Anchors beside the ledgers of every target (a run directory or folder: every anchor under it must find its
    ledger; a ledger file: the anchors in its folder are used if they match) and those given with ``--anchors``."""
    found = _Anchors()
    for target in targets:
        if target.is_dir():
            for path in find_ledgers(target, ANCHOR_GLOB):
                found.add(path, expected=True)
        elif target.is_file():
            for path in sorted(target.parent.glob(ANCHOR_GLOB)):
                found.add(path, expected=False)
    if anchors is not None:
        if not anchors.exists():
            raise LedgerError(f"anchors {str(anchors)!r} do not exist")
        for path in [anchors] if anchors.is_file() else sorted(anchors.rglob(ANCHOR_GLOB)):
            found.add(path, expected=True)
    return found


def _run_config(target: Path) -> dict[str, Any] | None:
    path = target / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path}: not a readable run config ({exc})") from exc
