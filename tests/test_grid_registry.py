"""The ServerApp's defence in depth (medfed.server.grid.DeploymentGrid with the centre's registry): only
registered nodes are addressed, and a site is who the registry says its node's key is, not what its
reply claims."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from conftest import make_metadata
from flwr.app import Message, MetricRecord, RecordDict

from medfed.server.grid import UNREGISTERED_NODE, WRONG_SITE_ID, DeploymentGrid, key_fingerprint

KEYS = {1: b"key-of-h1", 2: b"key-of-h2", 66: b"rogue-key"}
REGISTRY = [("h1", key_fingerprint(KEYS[1])), ("h2", key_fingerprint(KEYS[2]))]


class _Nodes:
    """Connected nodes 1, 2 (registered as h1, h2) and 66 (a key the centre never registered); each
    node answers with the site-id ``claims`` says it claims."""

    def __init__(self, claims: dict[int, float]) -> None:
        self.claims, self.wire = claims, []

    def get_nodes(self):
        return [SimpleNamespace(node_id=n, public_key=k, name="") for n, k in KEYS.items()]

    def get_node_ids(self):
        return list(KEYS)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, metadata=make_metadata(dst_node_id=dst_node_id, message_type=message_type))

    def push_messages(self, messages):
        self.wire = list(messages)
        for i, m in enumerate(self.wire):
            m.metadata.__dict__["_message_id"] = f"id{i}"
        return [f"id{i}" for i in range(len(self.wire))]

    def pull_messages(self, message_ids):
        replies = []
        for m in self.wire:
            if m.metadata.message_id in set(message_ids):
                node = m.metadata.dst_node_id
                reply = Message(RecordDict({"metrics": MetricRecord({"site-id": self.claims[node],
                                                                     "num-examples": 5.0})}), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = node
                replies.append(reply)
        return replies


def _send(grid: DeploymentGrid, inner: _Nodes, nodes: list[int]) -> list[Message]:
    messages = [inner.create_message(RecordDict(), "train", n, "1") for n in nodes]
    return list(grid.send_and_receive(messages, timeout=5))


def test_only_registered_nodes_are_addressed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    inner = _Nodes({1: 0.0, 2: 1.0, 66: 0.0})
    grid = DeploymentGrid(inner, registry=REGISTRY)
    assert sorted(grid.get_node_ids()) == [1, 2]  # node 66 is connected but never sampled
    with pytest.raises(ValueError, match="node 66 is not in the centre's registry"):
        _send(grid, inner, [1, 66])
    replies = _send(grid, inner, [1, 2])
    assert [r.has_error() for r in replies] == [False, False]


def test_a_reply_claiming_another_sites_id_becomes_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    inner = _Nodes({1: 0.0, 2: 0.0})  # h2's node says it is site 0 (h1)
    replies = _send(DeploymentGrid(inner, registry=REGISTRY), inner, [1, 2])
    honest = [r for r in replies if not r.has_error()]
    errors = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in honest] == [1]  # h1's honest reply passes
    assert len(errors) == 1 and errors[0].error.code == WRONG_SITE_ID
    assert "registered as site h2 (site-id 1) but its reply claims site-id 0" in errors[0].error.reason


def test_a_reply_from_an_unregistered_node_becomes_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    inner = _Nodes({66: 0.0})
    grid = DeploymentGrid(inner, registry=REGISTRY)
    grid._sites.clear()
    message = inner.create_message(RecordDict(), "train", 66, "1")
    ids = list(grid.inner.push_messages([message]))  # pushed behind the grid's back (as a rogue could not)
    grid._sent[ids[0]] = message
    (reply,) = grid.pull_messages(ids)
    assert reply.has_error() and reply.error.code == UNREGISTERED_NODE
    assert "not in the centre's registry" in reply.error.reason


def test_without_a_registry_nothing_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulation and insecure test networks: no keys, no registry; claims pass as before."""
    monkeypatch.setattr(time, "sleep", lambda s: None)
    inner = _Nodes({1: 0.0, 2: 0.0, 66: 3.0})
    grid = DeploymentGrid(inner)
    assert sorted(grid.get_node_ids()) == [1, 2, 66]
    assert not any(r.has_error() for r in _send(grid, inner, [1, 2, 66]))


def test_the_grid_names_the_site_of_a_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """A site that dies mid-round is reported by name (its registered site id), not as site -1."""
    grid = DeploymentGrid(_Nodes({}), registry=REGISTRY)
    assert (grid.site_of(1), grid.site_of(2), grid.site_of(66)) == (0, 1, None)
    assert DeploymentGrid(_Nodes({})).site_of(1) is None
