"""A hospital's own certificate and node key must not let it act for another hospital's node through
Flower's Fleet push (found in review: Flower 1.41-1.42 stores a pushed message as given). Flower's real
SuperLink app behind medfed's gateway middleware, in process (the ASGI TLS extension filled as the
gateway's protocol fills it), a real SQLite link state, real node keys and signatures."""

from __future__ import annotations

import asyncio
from base64 import b64encode
from pathlib import Path

import pytest


@pytest.fixture()
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.superlink.main import create_app
    from flwr.superlink.servicer.fleet import fleet_handlers

    from medfed.deploy.authorization import Policy, supernode_key_wire_bytes
    from medfed.deploy.gateway import federation_guard
    from medfed.deploy.provision import ProvisionPlan, provision
    from medfed.flower_patches.fleet_push import bind_pushed_replies

    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "superlink.db"))
    monkeypatch.setattr(fleet_handlers, "push_messages", fleet_handlers.push_messages)  # restored after the test
    bind_pushed_replies()
    kits = provision(ProvisionPlan(sites=["h1", "h2"], out=tmp_path / "kits"))
    app = create_app()
    guard = federation_guard(app, Policy.for_app(kits / "server" / "supernodes", app))
    state = app.state.linkstate_factory.state()
    wire = {s: supernode_key_wire_bytes((kits / s / "supernode-auth.pub").read_bytes()) for s in ("h1", "h2")}
    keys = {s: serialization.load_ssh_private_key((kits / s / "supernode-auth.key").read_bytes(), None)
            for s in ("h1", "h2")}
    node = {}
    for s in ("h1", "h2"):
        node[s] = state.create_node("aid", s, wire[s], 30)
        state.activate_node(node[s], 30)
    run_id = state.create_run("medfed", "1.0", "ab" * 32, {}, NOOP_FEDERATION_ID, None, "aid", "serverapp")
    tasks = state.get_tasks(run_ids=[run_id])
    task_id = tasks[0].task_id if tasks else state.create_task("serverapp", run_id)
    state.claim_task(task_id)
    state.activate_task(task_id)
    return dict(kits=kits, guard=guard, state=state, wire=wire, keys=keys, node=node, run_id=run_id, task_id=task_id)


def _push(f: dict, site: str, message) -> int:
    """Push ``message`` as ``site`` (its certificate, its node, its signed key header); returns the status."""
    import httpx
    from flwr.app.message.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=no-name-in-module
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.supercore.date import now
    from flwr.supercore.inflatable.inflatable_object import get_object_tree, no_object_id_recompute
    from flwr.supercore.primitives.asymmetric import sign_message

    with no_object_id_recompute():
        message.metadata.__dict__["_message_id"] = message.object_id
        request = PushMessagesRequest(node=Node(node_id=f["node"][site]),
                                      messages_list=[message_to_proto(remove_content_from_message(message))],
                                      message_object_trees=[get_object_tree(message)])
    pem = (f["kits"] / site / "site.crt").read_text()

    async def app(scope, receive, send) -> None:
        scope.setdefault("extensions", {})["tls"] = {"client_cert_chain": [pem], "server_cert": None}
        await f["guard"](scope, receive, send)

    stamp = now().isoformat()
    headers = {"flwr-public-key": b64encode(f["wire"][site]).decode(), "flwr-timestamp": stamp,
               "flwr-signature": b64encode(sign_message(f["keys"][site], stamp.encode())).decode(),
               "content-type": "application/protobuf", "accept": "application/protobuf"}

    async def call() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://x") as client:
            response = await client.post("/v1/fleet/push-messages", content=request.SerializeToString(),
                                         headers=headers)
            return response.status_code

    return asyncio.run(call())


def _instruction(f: dict, dst: int):
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = f["run_id"], SUPERLINK_NODE_ID, f["task_id"]
    message = Message(RecordDict({"config": ConfigRecord({"phase": "attacker-chosen"})}), dst_node_id=dst,
                      message_type="train")
    message.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    message.metadata.__dict__["_run_id"] = f["run_id"]
    return message


def test_a_site_cannot_queue_an_instruction_for_another_sites_node(fleet: dict) -> None:
    injected = _instruction(fleet, fleet["node"]["h2"])
    assert _push(fleet, "h1", injected) == 403
    assert fleet["state"].get_message_ins(node_id=fleet["node"]["h2"], limit=10) == []


def test_a_site_cannot_answer_for_another_sites_node(fleet: dict) -> None:
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        no_object_id_recompute,
    )
    from flwr.supercore.task_identity import TaskIdentity

    state, run_id = fleet["state"], fleet["run_id"]
    ins = _instruction(fleet, fleet["node"]["h2"])  # the centre's real instruction to h2
    with no_object_id_recompute():
        ins.metadata.__dict__["_message_id"] = ins.object_id
        session = state.start_session(run_id)
        state.store_message_and_object_tree(ins, get_object_tree(ins), session)
        for object_id, obj in get_all_nested_objects(ins).items():
            state.store_object(run_id, session, object_id, obj.deflate())
    TaskIdentity.node_id = fleet["node"]["h2"]
    forged = Message(RecordDict({"metrics": MetricRecord({"site-id": 1, "accuracy": 0.99})}), reply_to=ins)
    forged.metadata.__dict__["_src_node_id"] = fleet["node"]["h2"]  # h1 claims to be h2
    assert _push(fleet, "h1", forged) == 403
    assert list(state.get_message_res({ins.metadata.message_id}, run_id)) == []
    honest = Message(RecordDict({"metrics": MetricRecord({"site-id": 1})}), reply_to=ins)
    honest.metadata.__dict__["_src_node_id"] = fleet["node"]["h2"]
    assert _push(fleet, "h2", honest) == 200  # h2 answering its own instruction passes


def test_the_push_rule_in_isolation() -> None:
    from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=no-name-in-module
    from flwr.proto.message_pb2 import Message, Metadata, ObjectTree  # pylint: disable=no-name-in-module
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module

    from medfed.flower_patches.fleet_push import ReplyNotBoundToNode, check_pushed_reply

    def request(n: int = 1, reply_to: str = "m1", src: int = 7, dst: int = 1) -> PushMessagesRequest:
        meta = Metadata(reply_to_message_id=reply_to, src_node_id=src, dst_node_id=dst)
        return PushMessagesRequest(node=Node(node_id=7), messages_list=[Message(metadata=meta)] * n,
                                   message_object_trees=[ObjectTree()] * n)

    check_pushed_reply(request())
    for bad, match in ((request(n=2), "exactly one"), (request(n=0), "exactly one"),
                       (request(reply_to=""), "only replies"), (request(src=8), "only as itself"),
                       (request(dst=9), "only as itself")):
        with pytest.raises(ReplyNotBoundToNode, match=match):
            check_pushed_reply(bad)


def test_the_gateway_refuses_to_run_beside_flowers_unauthenticated_grpc_apis() -> None:
    from medfed.deploy.gateway import refuse_flower_backdoors

    refuse_flower_backdoors({})
    for name in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
        with pytest.raises(SystemExit, match=name):
            refuse_flower_backdoors({name: "1"})


def test_flower_processes_medfed_starts_never_inherit_the_grpc_switches(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    from medfed.deploy.processes import flower_env

    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_FLEET_API", "1")
    env = flower_env(tmp_path)
    assert "FLWR_INTERNAL_GRPC_CONTROL_API" not in env and "FLWR_INTERNAL_GRPC_FLEET_API" not in env
