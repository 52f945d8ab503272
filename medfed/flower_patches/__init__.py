"""Every change medfed makes to Flower's internals, in one place, checked against the pinned Flower.

Flower's public API (apps, records, strategies, the simulation) needs no patch. These do, each for a
reason written in its module, each refusing to run when the seam it relies on is gone:

==================  ====================================================================================
`client_tls`        Flower's HTTP clients present the site's/operator's client certificate (mutual TLS)
`fleet_push`        a site may push only its own node's reply to the SuperLink (Fleet ``push_messages``)
`sqlite_scrub`      SQLite ``secure_delete`` on the SuperLink's database (deleted rows overwritten)
`clientapp_seam`    hooks between pulling a ClientApp task and installing its app (the site's app gate)
`superexec`         Flower's SuperExec loop with medfed's executors (token on stdin; warm ClientApps)
`flower_tuning`     shorter object-pull backoff and SuperNode polling (latency only, nothing checked)
`simulation_sweep`  the simulation asks only nodes with a pending message for it (cost per node)
==================  ====================================================================================

`SEAMS` fingerprints the Flower source each patch relies on (sha256 of ``inspect.getsource``), taken
from the pinned ``flwr`` (`FLOWER_VERSION`). `changed_seams` names those that differ in the installed
Flower: after an upgrade each must be read again before the new fingerprint is written here
(tests/test_flower_patches.py fails until then).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect

FLOWER_VERSION = "1.42.0"
"""The flwr the patches were written and checked against (pyproject.toml pins the same)."""

SEAMS: dict[str, str] = {
    "flwr.supercore.protobuf.client:ProtobufClient.__init__": "ea57554c6ab40501",
    "flwr.superlink.servicer.fleet.fleet_handlers:push_messages": "70c2fe927c6693b0",
    "flwr.supercore.sql_mixin:_set_sqlite_pragmas": "6cf87a44250ef3c4",
    "flwr.supernode.runtime.run_clientapp:run_clientapp": "6ce09559f3a2f5dc",
    "flwr.supernode.runtime.run_clientapp:pull_task_input": "5607a23e1673ee87",
    "flwr.supernode.runtime.run_clientapp:install_from_fab": "481bd04cde582322",
    "flwr.supernode.start_client_internal:start_client_internal": "9e89a6eb68fbec68",
    # 1.42.0: only a tracing argument left `task.dispatch`; it still builds its executor with get_executor
    "flwr.supercore.superexec.run_superexec:run_superexec": "91e7a33c5b898f33",
    "flwr.supercore.inflatable.inflatable_utils:pull_objects": "31bb2de46b450e6a",
    "flwr.supercore.inflatable.inflatable_utils:pull_and_inflate_object_from_tree": "139811483a15e4a6",
    "flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue": "953f4bd41a931a77",
    "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState.get_message_ins": "6547c8dcbc62e12f",
}
"""``module:qualified name`` -> the first 16 hex digits of the sha256 of its source in `FLOWER_VERSION`."""


def fingerprint(seam: str) -> str:
    """The first 16 hex digits of the sha256 of the installed Flower's source of ``seam`` (``module:name``)."""
    module_name, _, qualname = seam.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def changed_seams() -> dict[str, tuple[str, str]]:
    """The seams whose installed source differs from the pinned one: ``seam -> (pinned, installed)``."""
    changed = {}
    for seam, pinned in SEAMS.items():
        try:
            now = fingerprint(seam)
        except (ImportError, AttributeError):
            now = "missing"
        if now != pinned:
            changed[seam] = (pinned, now)
    return changed
