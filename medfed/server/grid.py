"""The ServerApp's Grid in a deployment: replies collected as soon as they arrive, arrays packed.

Flower 1.41's deployment Grid (``HttpGrid.send_and_receive``) pushes the messages, then checks
for replies every 3 seconds: a round waits on average 1.5 s, and up to 3 s, after its last reply
has arrived, and SecAgg+ pays that once per stage (four per round). `QuickPollGrid` wraps any
Grid and checks every `REPLY_POLL_SECONDS` instead (the simulation runtime's own Grid polls every
0.1 s); each check is one small request to the SuperLink on the ServerApp's own connection.
It also packs every ArrayRecord of the messages it pushes into one Array and unpacks the replies
it pulls (`medfed.packing`: bit-exact; a message becomes a handful of transport objects instead
of one or two per tensor). Everything else is delegated unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from medfed.packing import pack_message, unpack_message

REPLY_POLL_SECONDS = 0.2


class DeploymentGrid(Grid):
    """``inner`` with packed arrays on the wire and ``send_and_receive`` polling every ``poll_seconds`` (> 0)."""

    def __init__(self, inner: Grid, poll_seconds: float = REPLY_POLL_SECONDS) -> None:
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self.inner = inner
        self.poll_seconds = poll_seconds

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[override]
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages([pack_message(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [unpack_message(m) for m in self.inner.pull_messages(message_ids)]

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
        return replies
