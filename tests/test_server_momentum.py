"""FedAvgM's server step (`medfed.strategies.server_momentum`): hand-computed velocities, what it leaves alone,
its place in the shared-weights pipeline, and its velocity through the round checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_metadata
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from medfed.constants import Phase
from medfed.exceptions import ConfigError, FederationError
from medfed.experiment.resume import load_round_checkpoint, save_round_checkpoint
from medfed.strategies.server_momentum import STATE_PREFIX, ServerMomentum, load_velocity, split_momentum_state
from medfed.strategies.shared_weights import make_strategy


def record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def test_lr_1_and_momentum_0_is_fedavg_exactly() -> None:
    step = ServerMomentum(1.0, 0.0, ["w"])
    aggregate = record(w=np.full(3, 0.5, np.float32))
    assert step.is_fedavg and step.step(record(w=np.zeros(3, np.float32)), aggregate) is aggregate


def test_velocity_accumulates_over_rounds_as_hand_computed() -> None:
    step = ServerMomentum(1.0, 0.9, ["w"])
    w = record(w=np.zeros(2, np.float32))
    # round 1: the sites moved the weights by +1: v = 1, w = 0 + 1
    w = step.step(w, record(w=np.ones(2, np.float32)))
    np.testing.assert_allclose(w["w"].numpy(), [1.0, 1.0])
    # round 2: by +1 again: v = 0.9 * 1 + 1 = 1.9, w = 1 + 1.9 = 2.9 (FedAvg would be at 2)
    w = step.step(w, record(w=np.full(2, 2.0, np.float32)))
    np.testing.assert_allclose(w["w"].numpy(), [2.9, 2.9], rtol=1e-6)
    # round 3: the sites move back by -1: v = 0.9 * 1.9 - 1 = 0.71, w = 2.9 + 0.71
    w = step.step(w, record(w=np.full(2, 1.9, np.float32)))
    np.testing.assert_allclose(w["w"].numpy(), [3.61, 3.61], rtol=1e-6)
    assert w["w"].numpy().dtype == np.float32


def test_server_lr_scales_the_step() -> None:
    step = ServerMomentum(2.0, 0.0, ["w"])
    out = step.step(record(w=np.ones(2, np.float32)), record(w=np.full(2, 1.5, np.float32)))
    np.testing.assert_allclose(out["w"].numpy(), [2.0, 2.0])  # 1 + 2 * 0.5


def test_arrays_not_aggregated_and_integer_buffers_are_left_as_they_are() -> None:
    step = ServerMomentum(1.0, 0.9, ["w", "steps"])
    sent = record(w=np.zeros(2, np.float32), head=np.zeros(2, np.float32), steps=np.array([3], np.int64))
    # Flower's example-weighted mean turns an integer array into float64: judged by the dtype sent, not that
    aggregate = record(w=np.ones(2, np.float64), head=np.full(2, 7.0, np.float32), steps=np.array([5.0]))
    out = step.step(sent, aggregate)
    assert list(out.keys()) == ["w", "head", "steps"]
    np.testing.assert_allclose(out["head"].numpy(), 7.0)  # not a shared key: as aggregated (carried over)
    assert out["steps"].numpy().tolist() == [5.0] and set(step.velocity) == {"w"}
    assert out["w"].numpy().dtype == np.float32  # the sent dtype


@pytest.mark.parametrize("lr, momentum, rule", [(0.0, 0.0, "learning rate must be > 0"),
                                                (1.0, 1.0, "momentum must be in [0, 1)"),
                                                (1.0, -0.5, "momentum must be in [0, 1)")])
def test_bad_settings_are_refused(lr: float, momentum: float, rule: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(rule)):
        ServerMomentum(lr, momentum, ["w"])


def test_a_shape_change_is_refused() -> None:
    with pytest.raises(FederationError, match="'w' is \\(3,\\) after aggregation, \\(2,\\) as sent"):
        ServerMomentum(1.0, 0.5, ["w"]).step(record(w=np.zeros(2, np.float32)), record(w=np.zeros(3, np.float32)))


def site_reply(value: float, site: int) -> Message:
    arrays = ArrayRecord({"encoder.w": Array(np.full((2, 3), value, np.float32))})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1, "site-id": site})})
    return Message(content, metadata=make_metadata(dst_node_id=0, src_node_id=site + 10))


def test_the_pipeline_applies_the_step_after_the_mean() -> None:
    sent = record(**{"encoder.w": np.zeros((2, 3), np.float32)})
    strategy = make_strategy("fedavg", phase=Phase.PRETRAIN, shared_keys=["encoder.w"], num_sites=2,
                             fraction_train=1.0, evaluate=False, min_sites=1,
                             server_step=ServerMomentum(3.0, 0.9, ["encoder.w"]))
    strategy._sent = sent
    out, _ = strategy.aggregate_train(1, [site_reply(1.0, 0), site_reply(3.0, 1)])
    assert out is not None
    np.testing.assert_allclose(out["encoder.w"].numpy(), 6.0)  # 0 + 3 * (mean 2 - 0)
    fedavg = make_strategy("fedavg", phase=Phase.PRETRAIN, shared_keys=["encoder.w"], num_sites=2,
                           fraction_train=1.0, evaluate=False, min_sites=1,
                           server_step=ServerMomentum(1.0, 0.0, ["encoder.w"]))
    assert fedavg.server_step is None  # lr 1, momentum 0: no step part at all


def test_the_velocity_goes_through_the_round_checkpoint(tmp_path: Path) -> None:
    def rounds(step: ServerMomentum, start: ArrayRecord, targets: list[float]) -> ArrayRecord:
        for t in targets:
            start = step.step(start, record(w=start["w"].numpy() + np.float32(t)))
        return start

    uninterrupted = rounds(ServerMomentum(1.0, 0.9, ["w"]), record(w=np.zeros(4, np.float32)), [1.0, 0.5, -0.2])
    first = ServerMomentum(1.0, 0.9, ["w"])
    mid = rounds(first, record(w=np.zeros(4, np.float32)), [1.0, 0.5])
    save_round_checkpoint(tmp_path, run_id="r", arm="a", phase=Phase.PRETRAIN, completed_round=2, settings={},
                          weights={**mid.to_torch_state_dict(), **first.state()})
    weights, velocity = split_momentum_state(load_round_checkpoint(tmp_path).weights)
    assert set(weights) == {"w"} and set(velocity) == {STATE_PREFIX + "w"}
    resumed = ServerMomentum(1.0, 0.9, ["w"])
    resumed.load_state(velocity)
    out = rounds(resumed, ArrayRecord({k: Array(v.numpy()) for k, v in weights.items()}), [-0.2])
    np.testing.assert_allclose(out["w"].numpy(), uninterrupted["w"].numpy(), rtol=1e-6)
    # without the velocity the resumed run would differ (the test can tell)
    lost = rounds(ServerMomentum(1.0, 0.9, ["w"]), ArrayRecord({k: Array(v.numpy()) for k, v in weights.items()}),
                  [-0.2])
    assert not np.allclose(lost["w"].numpy(), uninterrupted["w"].numpy())
    with pytest.raises(FederationError, match="not the velocity of a shared array"):
        resumed.load_state({STATE_PREFIX + "projector.w": torch.zeros(1)})
    with pytest.raises(FederationError, match="has no server step"):
        load_velocity(None, velocity)  # a velocity for a run without a server step: not the same run
    load_velocity(None, {})  # nothing to restore: fine
