"""Packed arrays on the deployment wire (`medfed.fl.packing`): bit-exact, few objects, only where packed."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_metadata
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from medfed.fl.packing import (
    PACKED_SUFFIX,
    is_packed,
    pack_content,
    pack_message,
    packed_transport_mod,
    unpack_content,
    unpack_message,
)
from medfed.models.encoders import InputSpec, build_encoder
from medfed.server.grid import DeploymentGrid


def _mixed() -> ArrayRecord:
    return ArrayRecord({
        "w": Array(np.arange(12, dtype=np.float32).reshape(3, 4) / 7),
        "steps": Array(np.array(5, dtype=np.int64)),  # 0-d
        "mask": Array(np.array([True, False, True])),
        "half": Array(np.array([1.5, -2.25], dtype=np.float16)),
        "empty": Array(np.zeros((0, 3), dtype=np.float64)),
        "cube": Array(np.random.default_rng(0).standard_normal((2, 3, 4, 5))),
    })


def _content(arrays: ArrayRecord) -> RecordDict:
    return RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1, "phase": "pretrain"}),
                       "metrics": MetricRecord({"loss": 1.25})})


def test_round_trip_is_bit_exact_for_every_dtype_and_shape() -> None:
    original = _content(_mixed())
    packed = pack_content(original)
    assert is_packed(packed) and list(packed["arrays"].keys()) == ["packed"]
    back = unpack_content(packed)
    assert list(back.keys()) == ["arrays", "config", "metrics"]
    assert list(back["arrays"].keys()) == list(original["arrays"].keys())  # order kept
    for key, array in original["arrays"].items():
        got = back["arrays"][key]
        assert (got.dtype, got.shape, got.stype, got.data) == (array.dtype, array.shape, array.stype, array.data)
        assert np.array_equal(got.numpy(), array.numpy())
    assert back["arrays"].object_id == original["arrays"].object_id  # the very same Flower objects
    assert back["config"] is original["config"] and back["metrics"] is original["metrics"]


def test_the_default_encoder_travels_as_a_handful_of_objects() -> None:
    state = build_encoder("cnn", InputSpec(1, (28, 28))).state_dict()
    content = RecordDict({"arrays": ArrayRecord(state)})
    before, after = len(get_all_nested_objects(content)), len(get_all_nested_objects(pack_content(content)))
    assert len(state) == 34 and before == 58 and after == 5  # one or two objects per tensor -> one blob


def test_records_without_arrays_are_not_packed() -> None:
    content = RecordDict({"metrics": MetricRecord({"auc": 0.9}), "arrays": ArrayRecord()})
    packed = pack_content(content)
    assert not is_packed(packed)
    assert unpack_content(packed)["metrics"]["auc"] == 0.9


def test_packing_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already holds"):
        pack_content(pack_content(_content(_mixed())))


@pytest.mark.parametrize("damage,match", [
    (lambda m: m.__setitem__("sizes", [*list(m["sizes"])[:-1], int(m["sizes"][-1]) + 1]), "does not match"),
    (lambda m: m.__setitem__("dims", list(m["dims"])[:-1]), "does not match"),
    (lambda m: m.__setitem__("keys", list(m["keys"])[:-1]), "does not match"),
])
def test_a_manifest_that_does_not_match_its_bytes_is_refused(damage, match) -> None:
    packed = pack_content(_content(_mixed()))
    damage(packed.config_records["arrays" + PACKED_SUFFIX])
    with pytest.raises(ValueError, match=match):
        unpack_content(packed)


def test_a_manifest_without_its_arrays_is_refused() -> None:
    packed = pack_content(_content(_mixed()))
    del packed["arrays"]
    with pytest.raises(ValueError, match="manifests without their arrays"):
        unpack_content(packed)


def _message(content: RecordDict) -> Message:
    return Message(content=content, metadata=make_metadata())


def test_the_clientapp_mod_unpacks_for_the_handler_and_packs_the_reply() -> None:
    seen = []

    def handler(msg: Message, ctx: Context) -> Message:
        seen.append(msg.content)
        return Message(content=RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"n": 3.0})}),
                       reply_to=msg)

    original = _content(_mixed())
    reply = packed_transport_mod(_message(pack_content(original)), None, handler)
    assert not is_packed(seen[0]) and seen[0]["arrays"].object_id == original["arrays"].object_id
    assert is_packed(reply.content)
    assert unpack_message(reply).content["arrays"].object_id == original["arrays"].object_id


def test_the_clientapp_mod_leaves_unpacked_messages_alone() -> None:
    """The simulation runtime never packs: its messages and replies pass through untouched."""
    original = _content(_mixed())

    def handler(msg: Message, ctx: Context) -> Message:
        return Message(content=msg.content, reply_to=msg)

    reply = packed_transport_mod(_message(original), None, handler)
    assert not is_packed(reply.content) and reply.content["arrays"] is original["arrays"]


class _WireGrid:
    """Stores what is pushed; replies echo the pushed content, as a site would send arrays back."""

    def __init__(self) -> None:
        self.wire: list[Message] = []

    def push_messages(self, messages):
        self.wire = list(messages)
        return [m.metadata.message_id for m in self.wire]

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        return [Message(content=m.content, reply_to=m) for m in self.wire if m.metadata.message_id in wanted]


def test_the_deployment_grid_packs_what_it_pushes_and_unpacks_what_it_pulls() -> None:
    original = _content(_mixed())
    inner = _WireGrid()
    replies = list(DeploymentGrid(inner, poll_seconds=0.01).send_and_receive([_message(original)], timeout=5))
    assert all(is_packed(m.content) for m in inner.wire)  # on the wire: packed
    assert len(replies) == 1 and not is_packed(replies[0].content)  # to the strategy: as sent
    assert replies[0].content["arrays"].object_id == original["arrays"].object_id


def test_error_messages_pass_both_ways_untouched() -> None:
    from flwr.app import Error

    err = Message(Error(code=1, reason="boom"), reply_to=_message(RecordDict()))
    assert pack_message(err) is err and unpack_message(err) is err and err.has_error()
