"""Patch: a site may push to Flower's Fleet API only its own node's reply to the SuperLink.

Flower's ``fleet_handlers.push_messages`` stores a site's push as given; `bind_pushed_replies`
runs `check_pushed_reply` before it (the Fleet router looks the handler up at call time).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)


class ReplyNotBoundToNode(Exception):
    """A Fleet push that is not one reply from the authenticated node to the SuperLink."""


def check_pushed_reply(request: Any) -> None:
    """A site may push only its own node's reply to a message the SuperLink sent it.

    Flower's ``fleet_handlers.push_messages`` stores ``messages_list[0]`` as given: without a
    ``reply_to_message_id`` it becomes a *new instruction* to any node of the run, and as a reply it
    is credited to whatever ``src_node_id`` it names. Its NodeAuth checks only that
    ``request.node`` is the caller's key. So: exactly one message, a reply, from ``request.node``,
    to the SuperLink (node 1); anything else is refused before Flower stores it."""
    from flwr.common.constant import SUPERLINK_NODE_ID

    messages = list(request.messages_list)
    if len(messages) != 1 or len(request.message_object_trees) != 1:
        raise ReplyNotBoundToNode(f"a push carries exactly one message; got {len(messages)}")
    meta = messages[0].metadata
    if not meta.reply_to_message_id:
        raise ReplyNotBoundToNode("a site may push only replies, not new instructions")
    if meta.src_node_id != request.node.node_id or meta.dst_node_id != SUPERLINK_NODE_ID:
        raise ReplyNotBoundToNode(f"node {request.node.node_id} may reply only as itself, to the SuperLink "
                                  f"(got from {meta.src_node_id} to {meta.dst_node_id})")


def bind_pushed_replies() -> None:
    """Run `check_pushed_reply` before Flower's Fleet push handler (patch of flwr's
    ``fleet_handlers.push_messages``, which its Fleet router looks up at call time)."""
    from fastapi import HTTPException
    from flwr.superlink.servicer.fleet import fleet_handlers

    original = fleet_handlers.push_messages
    if getattr(original, "__medfed_bound__", False):
        return
    if list(inspect.signature(original).parameters) != ["request", "state"]:
        raise RuntimeError("flwr's fleet_handlers.push_messages changed its signature: not the flwr medfed pins")

    @functools.wraps(original)
    def push_messages(request: Any, state: Any) -> Any:
        try:
            check_pushed_reply(request)
        except ReplyNotBoundToNode as exc:
            log.warning("refused a Fleet push from node %s: %s", request.node.node_id, exc)
            raise HTTPException(status_code=403, detail=str(exc)) from None
        return original(request=request, state=state)

    push_messages.__medfed_bound__ = True  # type: ignore[attr-defined]
    fleet_handlers.push_messages = push_messages
