"""Patch: SQLite ``secure_delete`` on every connection Flower's SuperLink opens.

Deleted rows (messages carrying weights, run settings) are overwritten with zeros instead of lingering in
free pages of the SuperLink's database file; the WAL file is truncated after each checkpoint.
"""

from __future__ import annotations


def scrub_deleted_rows() -> None:
    """SQLite ``secure_delete`` on every connection Flower opens (deleted rows are overwritten with
    zeros) and a WAL file truncated after each checkpoint. Patches flwr's pragma list."""
    from flwr.supercore import sql_mixin

    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not isinstance(pragmas, tuple):
        raise RuntimeError("flwr.supercore.sql_mixin.SQLITE_PRAGMAS is gone: not the flwr medfed pins")
    extra = (("secure_delete", "ON"), ("journal_size_limit", "0"))
    sql_mixin.SQLITE_PRAGMAS = tuple(p for p in pragmas if p[0] not in dict(extra)) + extra
