"""FedEMA and FedU, how a site takes the global encoder (`medfed.selfsup.federated`): pinned numbers for the EMA and
its autoscaler, FedU's gate, and what is kept for the next round."""

from __future__ import annotations

import math

import pytest
import torch

from medfed.constants import MetricKey, SSLAggregation
from medfed.selfsup.federated import (
    EMA_SCALE,
    OWN_ENCODER,
    keep_after_round,
    l2_distance,
    shared_predictor,
    split_prefixed,
    start_round,
)


def state(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(list(values)), "steps": torch.tensor(3)}  # an integer buffer is taken, never averaged


def kept_encoder(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {OWN_ENCODER + k: v for k, v in s.items()}


def test_the_first_round_at_a_site_starts_from_the_global_encoder_under_every_option() -> None:
    for how in SSLAggregation:
        start = start_round(how, state(1.0, 2.0), {}, tau=0.7, fedu_threshold=0.05)
        assert torch.equal(start.encoder["w"], torch.tensor([1.0, 2.0])) and start.take_global_predictor
        assert start.metrics == {}


def test_fedema_autoscaler_gives_tau_first_then_scales_with_the_divergence() -> None:
    global_1, own_1 = state(3.0, 4.0), state(0.0, 0.0)  # distance 5
    start = start_round("fedema", global_1, kept_encoder(own_1), tau=0.7, fedu_threshold=0.05)
    assert start.metrics[MetricKey.EMA_DECAY] == pytest.approx(0.7)  # lambda = 0.7 / 5
    assert float(start.kept[EMA_SCALE]) == pytest.approx(0.14)
    assert torch.allclose(start.encoder["w"], torch.tensor([0.9, 1.2]))  # 0.7 * 0 + 0.3 * (3, 4)
    assert int(start.encoder["steps"]) == 3
    assert start.metrics[MetricKey.SSL_DIVERGENCE] == pytest.approx(1.0)  # ||g - w|| / ||g|| = 5 / 5
    # next round: lambda kept; distance 2.5 -> mu = 0.35; distance 10 -> mu capped at 1 (keeps its own)
    later = start_round("fedema", state(1.5, 2.0), kept_encoder(own_1) | {EMA_SCALE: start.kept[EMA_SCALE]},
                        tau=0.7, fedu_threshold=0.05)
    assert later.metrics[MetricKey.EMA_DECAY] == pytest.approx(0.35)
    assert torch.allclose(later.encoder["w"], 0.65 * torch.tensor([1.5, 2.0]))
    far = start_round("fedema", state(6.0, 8.0), kept_encoder(own_1) | {EMA_SCALE: start.kept[EMA_SCALE]},
                      tau=0.7, fedu_threshold=0.05)
    assert far.metrics[MetricKey.EMA_DECAY] == 1.0 and torch.equal(far.encoder["w"], torch.zeros(2))


def test_fedu_takes_the_global_predictor_only_below_the_threshold() -> None:
    own = kept_encoder(state(1.0, 0.0))
    near = start_round("fedu", state(1.0, 0.04), own, tau=0.7, fedu_threshold=0.05)  # relative 0.04 / 1.0008
    far = start_round("fedu", state(1.0, 0.06), own, tau=0.7, fedu_threshold=0.05)
    assert near.take_global_predictor and not far.take_global_predictor
    assert near.metrics[MetricKey.PREDICTOR_TAKEN] == 1.0 and far.metrics[MetricKey.PREDICTOR_TAKEN] == 0.0
    for start in (near, far):  # the encoder is always the global one under FedU
        assert torch.equal(start.encoder["w"], start_round("fedavg", start.encoder, {}, tau=1, fedu_threshold=1)
                           .encoder["w"])
    assert far.metrics[MetricKey.SSL_DIVERGENCE] == pytest.approx(0.06 / math.sqrt(1.0036))


def test_what_a_site_keeps_for_its_next_round() -> None:
    encoder = state(5.0, 6.0)
    assert keep_after_round("fedavg", encoder, kept_encoder(state(0.0, 0.0))) == {}
    kept = keep_after_round("fedema", encoder, {EMA_SCALE: torch.tensor(0.2)})
    _, own = split_prefixed(kept, OWN_ENCODER)
    assert torch.equal(own["w"], encoder["w"]) and float(kept[EMA_SCALE]) == pytest.approx(0.2)
    assert l2_distance(encoder, own) == 0.0


def test_only_byol_has_a_predictor_to_share() -> None:
    from medfed.models.encoders import CNNEncoder, InputSpec
    from medfed.selfsup.methods import SSLSettings
    from medfed.selfsup.registry import build_method

    encoder = CNNEncoder(InputSpec(1, (28, 28)), width=8)
    combined = build_method(["simclr", "byol"], [1.0, 1.0], encoder, SSLSettings())
    assert shared_predictor(combined) is combined.parts[1].predictor
    with pytest.raises(ValueError, match="needs BYOL"):
        shared_predictor(build_method(["simclr"], [1.0], encoder, SSLSettings()))


def test_a_global_encoder_unlike_the_sites_own_is_refused_before_any_arithmetic() -> None:
    from medfed.exceptions import ConfigError

    own = kept_encoder(state(1.0, 2.0))
    for bad, rule in (({"w": torch.tensor(1.0), "steps": torch.tensor(3)}, "is torch.float32()"),
                      ({"w": torch.tensor([1.0, 2.0])}, "other arrays than this site's"),
                      (state(float("nan"), 1.0), "NaN or infinite"),
                      (state(0.0, 0.0), "all zeros")):
        with pytest.raises(ConfigError, match=rule):
            start_round("fedema", bad, own, tau=0.7, fedu_threshold=0.05)


def test_the_autoscaler_waits_while_the_global_encoder_is_the_sites_own() -> None:
    own = state(1.0, 2.0)
    start = start_round("fedema", own, kept_encoder(own), tau=0.7, fedu_threshold=0.05)
    assert EMA_SCALE not in start.kept and start.metrics[MetricKey.EMA_DECAY] == 0.0  # lambda not fixed at 0


def test_a_site_keeps_as_its_own_only_what_it_released() -> None:
    from medfed.selfsup.federated import OWN_NORMS, rekeep

    local = {OWN_ENCODER + "w": torch.ones(2), OWN_NORMS + "w": torch.ones(2), "projector.0.weight": torch.ones(1)}
    clipped = {"w": torch.tensor([0.1, 0.2])}
    out = rekeep(local, clipped)
    assert torch.equal(out[OWN_ENCODER + "w"], clipped["w"]) and torch.equal(out[OWN_NORMS + "w"], clipped["w"])
    assert torch.equal(out["projector.0.weight"], torch.ones(1))  # never sent: stays as trained


def test_kept_state_belongs_to_one_run_and_its_settings() -> None:
    from medfed.exceptions import ConfigError
    from medfed.task.site_state import StateStamp

    stamp = StateStamp.of("run-a/arm", {"ssl-aggregation": "fedema"})
    sealed = stamp.seal({"x": torch.ones(1)})
    assert stamp.open(sealed) == {"x": torch.ones(1)}
    assert StateStamp.of("run-b/arm", {"ssl-aggregation": "fedema"}).open(sealed) is None  # another run: dropped
    assert stamp.open({"x": torch.ones(1)}) is None  # unstamped (older medfed): dropped
    with pytest.raises(ConfigError, match="settings differ from those of its earlier rounds"):
        StateStamp.of("run-a/arm", {"ssl-aggregation": "fedu"}).open(sealed)
