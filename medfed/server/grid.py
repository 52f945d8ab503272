"""The ServerApp's Grid in a deployment: replies collected as soon as they arrive, arrays packed.

Flower's deployment Grid (``HttpGrid.send_and_receive``) pushes the messages, then checks
for replies every 3 seconds: a round waits on average 1.5 s, and up to 3 s, after its last reply
has arrived, and SecAgg+ pays that once per stage (four per round). `QuickPollGrid` wraps any
Grid and checks every `REPLY_POLL_SECONDS` instead (the simulation runtime's own Grid polls every
0.1 s); each check is one small request to the SuperLink on the ServerApp's own connection.
It also packs every ArrayRecord of the messages it pushes into one Array and unpacks the replies
it pulls (`medfed.fl.packing`: bit-exact; a message becomes a handful of transport objects instead
of one or two per tensor).

Defence in depth behind the gateway (`medfed.deploy.gateway`), given the centre's registry (run
setting ``site-keys``: each site's SuperNode key fingerprint, in site-id order): messages go only
to nodes whose public key is registered, and a site's identity is the one the registry gives its
node's key, never what the node says about itself. A reply from a node outside the registry, or
whose metrics claim another ``site-id``, becomes an error reply naming both, which the strategy
records as that site's failure and never averages. Everything else is delegated unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import Error, Message, MetricRecord
from flwr.app.typing import MetricRecordValues
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from medfed.constants import MetricKey
from medfed.fl.packing import pack_message, unpack_message

log = logging.getLogger(__name__)
REPLY_POLL_SECONDS = 0.2
UNREGISTERED_NODE = 901  # Error codes of the replies this Grid rewrites (Flower's own are below 100)
WRONG_SITE_ID = 902


def key_fingerprint(public_key: bytes) -> str:
    """SHA-256 (hex) of a SuperNode public key as Flower holds it (PEM SubjectPublicKeyInfo)."""
    return hashlib.sha256(public_key).hexdigest()


def _site_id(value: MetricRecordValues) -> int:
    """A reply's ``site-id`` metric as an int; a list (the reply contract forbids it) raises TypeError, as int() of it
    would."""
    if isinstance(value, list):
        raise TypeError(f"site-id must be a scalar metric, got a list: {value!r}")
    return int(value)


class DeploymentGrid(Grid):
    """``inner`` with packed arrays on the wire, ``send_and_receive`` polling every ``poll_seconds``
    (> 0), and, given ``registry`` [(site, key fingerprint), ...] in site-id order, only registered
    nodes addressed and every reply's site checked against its node's key."""

    def __init__(self, inner: Grid, poll_seconds: float = REPLY_POLL_SECONDS,
                 registry: Sequence[tuple[str, str]] = ()) -> None:
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self.inner = inner
        self.poll_seconds = poll_seconds
        self.registry = {key: (index, site) for index, (site, key) in enumerate(registry)}
        self._sites: dict[int, tuple[int, str]] = {}  # node id -> (site id, site name), from the registry
        self._sent: dict[str, Message] = {}

    def _registered_nodes(self) -> dict[int, tuple[int, str]]:
        """Node id -> (site id, site) for the connected nodes whose key is in the registry; the
        others are logged and left out."""
        for node in self.inner.get_nodes():
            if node.node_id in self._sites:
                continue
            entry = self.registry.get(key_fingerprint(bytes(node.public_key)))
            if entry is None:
                log.warning("node %s (%s) is not in the centre's registry: it is sent nothing", node.node_id,
                            node.name or "no name")
                continue
            self._sites[node.node_id] = entry
        return self._sites

    def site_of(self, node_id: int) -> int | None:
        """The site id the registry gives ``node_id``'s key (None: no registry, or not registered)."""
        if not self.registry:
            return None
        entry = self._registered_nodes().get(node_id)
        return None if entry is None else entry[0]

    def _checked(self, reply: Message) -> Message:
        """``reply``, or an error reply if its node is not registered or it claims another site. An error
        reply is addressed as coming from the node its message was sent to (Flower sends a dead node's
        "node unavailable" on the node's behalf), so the site that failed is named, not "site -1"."""
        if not self.registry:
            return reply
        sent = self._sent.pop(reply.metadata.reply_to_message_id, None)
        if reply.has_error():
            if sent is not None and reply.metadata.src_node_id != sent.metadata.dst_node_id:
                return Message(Error(code=reply.error.code, reason=reply.error.reason), reply_to=sent)
            return reply
        node = reply.metadata.src_node_id
        site = self._registered_nodes().get(node)
        if site is None:
            code, reason = UNREGISTERED_NODE, f"reply from node {node}, whose key is not in the centre's registry"
        else:
            claimed = [record[MetricKey.SITE_ID.value] for record in reply.content.values()
                       if isinstance(record, MetricRecord) and MetricKey.SITE_ID.value in record]
            if all(_site_id(c) == site[0] for c in claimed):
                return reply
            code, reason = WRONG_SITE_ID, (f"node {node} is registered as site {site[1]} (site-id {site[0]}) but its "
                                           f"reply claims site-id {_site_id(claimed[0])}")
        log.warning("reply refused: %s", reason)
        if sent is None:
            raise RuntimeError(f"{reason}; and it answers no message this run sent")
        return Message(Error(code=code, reason=reason), reply_to=sent)

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        if not self.registry:
            return self.inner.get_node_ids()
        registered = self._registered_nodes()
        return [n for n in self.inner.get_node_ids() if n in registered]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if self.registry:
            registered = self._registered_nodes()
            for m in messages:
                if m.metadata.dst_node_id not in registered:
                    raise ValueError(f"node {m.metadata.dst_node_id} is not in the centre's registry")
        ids = list(self.inner.push_messages([pack_message(m) for m in messages]))
        if self.registry:  # kept until the reply arrives (or send_and_receive gives up on it)
            self._sent.update((i, m) for i, m in zip(ids, messages, strict=True) if i)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._checked(unpack_message(m)) for m in self.inner.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; return the replies that arrived before ``timeout`` seconds (None: wait
        for all), checking every ``poll_seconds``. Same contract as Flower's Grid."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_seconds)
        for message_id in pending:  # no reply came: nothing left to check it against
            self._sent.pop(message_id, None)
        return replies
