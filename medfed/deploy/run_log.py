"""A site's run log: every ClientApp task the site's app gate let through or refused, one JSON line each,
chained by sha256 (each entry holds the hash of the line before it).

Appends are serialised with ``flock`` (forked ClientApps append concurrently); `verify_run_log` finds
edited, deleted, inserted and reordered entries. It holds no patient identifiers and no paths. A chain
cannot show that its *last* entries, or the whole file, were removed: keep a copy of its last hash
elsewhere where that matters. ``medfed site log`` prints and verifies it.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from medfed.deploy.approval import OUTCOMES, sha256_hex, utc_now
from medfed.exceptions import RunLogError

STATE_DIR = "state"
RUN_LOG_FILE = "run-log.jsonl"
_READ_CHUNK = 1 << 20
GENESIS = "0" * 64  # the "previous hash" of a run log's first entry


def run_log_file(kit_dir: Path) -> Path:
    """A site kit's run log (in the kit's state folder, whatever ``--workdir`` the site runs with)."""
    return Path(kit_dir) / STATE_DIR / RUN_LOG_FILE


RUN_LOG_FIELDS = ("seq", "time", "run_id", "app_sha256", "run_config_sha256", "outcome", "reason", "prev")


def run_config_digest(run_config: Mapping[str, object] | None) -> str | None:
    """sha256 of a run's config (its keys sorted, as compact JSON); None when there is none."""
    if run_config is None:
        return None
    canonical = json.dumps(dict(run_config), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return sha256_hex(canonical.encode("utf-8"))


def _entry_hash(entry: Mapping[str, object]) -> str:
    body = {k: entry[k] for k in RUN_LOG_FIELDS}
    return sha256_hex(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _parse_run_log(data: bytes, where: str) -> list[dict]:
    """The entries of a run log's bytes, the chain verified; RunLogError names the first bad line."""
    entries: list[dict] = []
    prev = GENESIS
    if data and not data.endswith(b"\n"):
        raise RunLogError(f"{where}: the last line is incomplete (a write was cut short, or the file was edited)")
    for number, line in enumerate(data.splitlines(), 1):
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunLogError(f"{where} line {number}: not a JSON entry (edited or corrupt)") from None
        if not isinstance(entry, dict) or set(entry) != {*RUN_LOG_FIELDS, "hash"}:
            raise RunLogError(f"{where} line {number}: not a run-log entry (fields added or removed)")
        if entry["hash"] != _entry_hash(entry):
            raise RunLogError(f"{where} line {number}: its hash does not match its contents (the entry was edited)")
        if entry["prev"] != prev or entry["seq"] != number:
            raise RunLogError(f"{where} line {number}: does not follow line {number - 1} (an entry was deleted, "
                              "inserted or moved)")
        prev = entry["hash"]
        entries.append(entry)
    return entries


def verify_run_log(path: Path) -> list[dict]:
    """The entries of the run log ``path``, its chain verified (RunLogError names the first line that
    was edited, deleted, inserted or moved). A missing log is an empty one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RunLogError(f"{path} cannot be read: {exc}") from None
    return _parse_run_log(data, str(path))


def run_log_head(entries: list[dict]) -> str:
    """The hash a next entry would carry as ``prev`` (keep it elsewhere to detect a truncated log)."""
    return entries[-1]["hash"] if entries else GENESIS


def append_run(path: Path, *, run_id: int | None, app_sha256: str, run_config_sha256: str | None, outcome: str,
               reason: str = "", now: str | None = None) -> dict | None:
    """Append one run to the run log ``path`` (created 0600): returns the new entry, or None when
    this run already has an entry with this outcome (a run is logged once, however many tasks it
    sends). Safe against concurrent appends (``flock``); refuses (RunLogError) to extend a log whose
    chain is broken. ``reason`` must name no path and no patient."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}; got {outcome!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        chunks, offset = [], 0
        while chunk := os.pread(fd, _READ_CHUNK, offset):
            chunks.append(chunk)
            offset += len(chunk)
        entries = _parse_run_log(b"".join(chunks), str(path))
        if run_id is not None and any(e["run_id"] == run_id and e["outcome"] == outcome for e in entries):
            return None
        entry: dict = {"seq": len(entries) + 1, "time": now or utc_now(), "run_id": run_id, "app_sha256": app_sha256,
                       "run_config_sha256": run_config_sha256, "outcome": outcome, "reason": reason,
                       "prev": run_log_head(entries)}
        entry["hash"] = _entry_hash(entry)
        line = (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
        written = os.write(fd, line)
        if written != len(line):
            raise RunLogError(f"{path}: short write ({written} of {len(line)} bytes)")
        os.fsync(fd)
        return entry
    finally:
        os.close(fd)  # releases the lock
