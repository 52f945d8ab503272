"""Central (site-level) DP: clipping, CSPRNG noise, the accountant, the server's ledger, the strategy's
central-DP part with mocked replies, the sites' clipping, and the settings refused."""

from __future__ import annotations

import math
import random
import secrets
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_metadata
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from medfed.config import CentralDPSettings, RunConfig, run_config
from medfed.constants import CentralDP, Phase
from medfed.exceptions import ConfigError, FederationError
from medfed.privacy.accounting import epsilon_spent
from medfed.privacy.audit import run_audit
from medfed.privacy.central import (
    CENTRAL_ACCOUNTANT,
    CentralLedger,
    add_noise,
    clip_update,
    noise_std,
    secure_standard_normal,
    update_norm,
)
from medfed.privacy.independent import independent_epsilon
from medfed.privacy.ledger import verify_ledger
from medfed.privacy.mechanism import MechanismStep
from medfed.strategies.central_dp import CentralDPAggregation
from medfed.strategies.shared_weights import make_strategy
from medfed.strategies.site_sampling import PoissonSampling
from medfed.task.site_round import clip_for_central_dp

REF = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}


def settings(mode: CentralDP = CentralDP.SERVER_CLIP, z: float = 1.0, c: float = 1.0,
             delta: float = 1e-3) -> CentralDPSettings:
    return CentralDPSettings(mode, z, c, delta)


def central_epsilon(releases: int, s: CentralDPSettings) -> float:
    """Site-level epsilon after ``releases`` aggregates: Gaussian mechanisms without amplification (RDP)."""
    if releases < 1:
        return 0.0
    return epsilon_spent([MechanismStep(s.noise_multiplier, 1.0, releases)], s.delta, CENTRAL_ACCOUNTANT)


# ---- the mechanism -------------------------------------------------------------------------------


def test_clip_update_scales_the_whole_update_to_the_norm_and_keeps_dtypes() -> None:
    # norm sqrt(4*9 + 2*16) = sqrt(68)
    weights = {"w": np.full((2, 2), 3.0, np.float32), "b": np.full(2, 4.0, np.float32)}
    clipped, norm = clip_update(weights, REF, 1.0)
    assert norm == pytest.approx(math.sqrt(68))
    assert update_norm(clipped, REF) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped["w"] / clipped["b"][0], 3 / 4, rtol=1e-6)  # direction kept
    assert clipped["w"].dtype == np.float32
    small, norm = clip_update({"w": np.full((2, 2), 0.1, np.float32), "b": REF["b"]}, REF, 1.0)
    np.testing.assert_array_equal(small["w"], np.full((2, 2), 0.1, np.float32))  # under the norm: unchanged
    assert norm == pytest.approx(0.2)


def test_clip_update_is_relative_to_the_weights_sent() -> None:
    reference = {"w": np.full(4, 10.0, np.float32)}
    clipped, norm = clip_update({"w": np.full(4, 12.0, np.float32)}, reference, 1.0)  # update 2 per coordinate, norm 4
    assert norm == pytest.approx(4.0)
    np.testing.assert_allclose(clipped["w"], np.full(4, 10.5))


def test_noise_std_is_z_c_over_the_updates_averaged() -> None:
    assert noise_std(settings(z=2.0, c=0.5), 4) == pytest.approx(0.25)
    with pytest.raises(FederationError, match="no update"):
        noise_std(settings(), 0)


def test_csprng_normals_have_the_right_moments_and_are_never_repeated() -> None:
    x = secure_standard_normal(400_001)
    assert x.shape == (400_001,)
    assert abs(x.mean()) < 0.01 and x.std() == pytest.approx(1.0, abs=0.01)
    assert np.mean(np.abs(x) > 1.96) == pytest.approx(0.05, abs=0.003)  # Gaussian tails, not uniform ones
    assert not np.array_equal(secure_standard_normal(8), secure_standard_normal(8))  # not seeded


def test_add_noise_has_the_requested_std_and_refuses_integer_arrays() -> None:
    noisy = add_noise({"w": np.zeros(200_000, np.float32)}, 0.5)
    assert noisy["w"].dtype == np.float32 and noisy["w"].std() == pytest.approx(0.5, rel=0.01)
    with pytest.raises(FederationError, match="not floating point"):
        add_noise({"steps": np.zeros(3, np.int64)}, 0.5)


def test_central_epsilon_golden_values_and_the_independent_accountant_agrees() -> None:
    # z = 1, 10 releases, delta 1e-3: Gaussian RDP 10 alpha / 2 under Opacus' orders and conversion.
    assert central_epsilon(10, settings()) == pytest.approx(15.458661866213822, rel=1e-9)
    assert central_epsilon(0, settings()) == 0.0
    for z, t in ((1.0, 10), (4.0, 50), (0.8, 3)):
        ours = central_epsilon(t, settings(z=z))
        theirs = independent_epsilon([(z, 1.0, t)], 1e-3, "rdp")
        assert ours == pytest.approx(theirs, rel=0.01), (z, t)
    assert central_epsilon(20, settings(z=4.0)) < central_epsilon(20, settings(z=2.0))


def test_the_central_ledger_composes_across_phases_and_the_audit_recomputes_it(tmp_path: Path) -> None:
    ledger = CentralLedger(tmp_path, "run-1/federated", settings(z=2.0))
    eps = [ledger.record("pretrain", 1), ledger.record("pretrain", 2), ledger.record("finetune", 1)]
    assert eps == pytest.approx([central_epsilon(k, settings(z=2.0)) for k in (1, 2, 3)])
    verification = verify_ledger(tmp_path / "central.ledger.sqlite")
    assert verification.ok and verification.site == "central"
    assert [(e.phase, e.server_round, e.sample_rate, e.steps) for e in verification.entries] == [
        ("pretrain", 1, 1.0, 1), ("pretrain", 2, 1.0, 1), ("finetune", 1, 1.0, 1)]
    report = run_audit([tmp_path], budget=0.5)  # a site budget never applies to the server's ledger
    assert report.ok, [s.problems for s in report.sites]
    assert report.sites[0].recomputed["rdp"] == pytest.approx(eps[-1], rel=0.01)
    assert (tmp_path / "central.pub").is_file()


# ---- through medfed's strategy with its central-DP part (mocked replies) ---------------------------

SENT = ArrayRecord({"enc.w": Array(np.zeros(4, np.float32)), "head.w": Array(np.ones(2, np.float32)),
                    "frozen.w": Array(np.full(3, 7.0, np.float32))})
SHARED = ["enc.w", "head.w"]


def reply(site: int, enc: float, head: float = 1.0, n: int = 10) -> Message:
    arrays = ArrayRecord({"enc.w": Array(np.full(4, enc, np.float32)), "head.w": Array(np.full(2, head, np.float32))})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n, "site-id": site})})
    return Message(content, metadata=make_metadata(dst_node_id=0, src_node_id=site + 10))


def wrapped(tmp_path: Path, mode: CentralDP, z: float = 1e-6, c: float = 1.0, reports: list | None = None,
            releases: list | None = None):
    s = settings(mode, z=z, c=c)
    central = CentralDPAggregation(
        s, CentralLedger(tmp_path, "r", s), Phase.FINETUNE,
        (lambda rnd, figures: releases.append((rnd, figures))) if releases is not None else None)
    strategy = make_strategy("fedavg", phase=Phase.FINETUNE, shared_keys=SHARED, num_sites=3, fraction_train=1.0,
                             evaluate=False, observer=reports.append if reports is not None else None, central=central,
                             min_sites=1)  # rounds go on with the sites that sent a valid update (0 would need all 3)
    strategy._sent = SENT
    return strategy, strategy


def test_server_clip_clips_each_update_averages_unweighted_and_leaves_frozen_weights_alone(tmp_path: Path) -> None:
    releases: list = []
    outer, _ = wrapped(tmp_path, CentralDP.SERVER_CLIP, releases=releases)
    assert outer.central is not None and outer.rule is None
    # site 0: update norm 2 on enc (4 x 1.0) -> clipped to 0.5 per coordinate; site 1: norm 0.2, kept;
    # weights 10 vs 1000
    arrays, _ = outer.aggregate_train(1, [reply(0, 1.0, n=10), reply(1, 0.1, n=1000)])
    np.testing.assert_allclose(arrays["enc.w"].numpy(), np.full(4, (0.5 + 0.1) / 2), atol=1e-4)  # not example-weighted
    np.testing.assert_allclose(arrays["head.w"].numpy(), np.ones(2), atol=1e-4)
    np.testing.assert_array_equal(arrays["frozen.w"].numpy(), np.full(3, 7.0, np.float32))  # no noise on frozen weights
    assert list(arrays.keys()) == list(SENT.keys())
    (rnd, figures), = releases
    assert rnd == 1 and figures["sites"] == 2 and figures["noise-std"] == pytest.approx(1e-6 / 2)
    assert figures["central-epsilon"] == pytest.approx(central_epsilon(1, settings(z=1e-6)))


def test_the_noise_on_the_mean_has_std_z_c_over_n(tmp_path: Path) -> None:
    outer, inner = wrapped(tmp_path, CentralDP.SERVER_CLIP, z=1.0, c=1.0)
    big = ArrayRecord({"enc.w": Array(np.zeros(100_000, np.float32))})
    inner.shared_keys, inner._sent = ["enc.w"], big

    def r(site: int) -> Message:
        content = RecordDict({"arrays": ArrayRecord({"enc.w": Array(np.zeros(100_000, np.float32))}),
                              "metrics": MetricRecord({"num-examples": 5, "site-id": site})})
        return Message(content, metadata=make_metadata(dst_node_id=0, src_node_id=site + 10))

    arrays, _ = outer.aggregate_train(1, [r(0), r(1), r(2), r(3)])
    assert arrays["enc.w"].numpy().std() == pytest.approx(0.25, rel=0.02)  # z C / n = 1 / 4


def test_a_malformed_update_is_rejected_before_clipping_not_a_crash(tmp_path: Path) -> None:
    reports: list = []
    outer, _ = wrapped(tmp_path, CentralDP.SERVER_CLIP, reports=reports)
    bad = reply(2, 0.0)
    bad.content["arrays"]["enc.w"] = Array(np.zeros(5, np.float32))  # wrong shape: Flower's wrapper would raise
    arrays, _ = outer.aggregate_train(1, [reply(0, 0.1), reply(1, 0.1), bad])
    assert [r.accepted for r in reports] == [True, True, False] and "expected float32(4,)" in reports[2].reason
    np.testing.assert_allclose(arrays["enc.w"].numpy(), np.full(4, 0.1), atol=1e-4)


def test_client_clip_sends_flowers_clipping_norm_and_rejects_an_unclipped_update(tmp_path: Path,
                                                                                  flwr_task_identity: object) -> None:
    reports: list = []
    outer, _ = wrapped(tmp_path, CentralDP.CLIENT_CLIP, c=0.5, reports=reports)

    class ThreeNodeGrid:
        def get_node_ids(self) -> list[int]:
            return [11, 12, 13]

    messages = list(outer.configure_train(1, SENT, ConfigRecord({"phase": "finetune"}), ThreeNodeGrid()))
    assert messages and all(m.content["config"]["clipping_norm"] == 0.5 for m in messages)
    arrays, _ = outer.aggregate_train(1, [reply(0, 0.2), reply(1, 1.0)])  # norms 0.4 (clipped) and 2.0 (not)
    assert [r.accepted for r in reports] == [True, False]
    assert "above the central-dp clipping norm 0.5" in reports[1].reason
    np.testing.assert_allclose(arrays["enc.w"].numpy(), np.full(4, 0.2), atol=1e-4)


def test_the_site_clips_its_update_to_the_norm_it_is_sent() -> None:
    cfg = run_config(central_dp="client-clip", central_dp_clipping_norm=1.0)
    incoming = {"w": torch.zeros(4), "frozen": torch.ones(2)}
    shared = {"w": torch.full((4,), 3.0)}  # norm 6
    clipped = clip_for_central_dp(cfg, {"clipping_norm": 1.0}, shared, incoming)
    assert float(clipped["w"].norm()) == pytest.approx(1.0, rel=1e-6) and set(clipped) == {"w"}
    assert clip_for_central_dp(RunConfig(), {}, shared, incoming) is shared  # off: untouched
    with pytest.raises(ConfigError, match="clipping norm 2"):
        clip_for_central_dp(cfg, {"clipping_norm": 2.0}, shared, incoming)


# ---- DP-FedAvg's Poisson sampling of sites (fraction-train < 1) --------------------------------------------


def test_sampled_central_epsilon_golden_value_is_below_the_unsampled_one_and_the_audit_agrees(tmp_path: Path) -> None:
    # q = 0.1, z = 1, 10 releases, delta 1e-5: the Poisson-subsampled Gaussian (RDP, Opacus' orders and conversion)
    sampled = epsilon_spent([MechanismStep(1.0, 0.1, 1)] * 10, 1e-5, CENTRAL_ACCOUNTANT)
    unsampled = epsilon_spent([MechanismStep(1.0, 1.0, 1)] * 10, 1e-5, CENTRAL_ACCOUNTANT)
    assert sampled == pytest.approx(3.4413244589250014, rel=1e-9)
    assert unsampled == pytest.approx(19.05359753163139, rel=1e-9) and sampled < unsampled / 5
    assert independent_epsilon([(1.0, 0.1, 1)] * 10, 1e-5, "rdp") == pytest.approx(sampled, rel=1e-6)
    ledger = CentralLedger(tmp_path, "run-1/federated", settings(delta=1e-5))
    eps = [ledger.record("finetune", rnd, sample_rate=0.1) for rnd in range(1, 11)]
    assert eps[-1] == pytest.approx(sampled, rel=1e-9)
    verification = verify_ledger(tmp_path / "central.ledger.sqlite")
    assert verification.ok and [e.sample_rate for e in verification.entries] == [0.1] * 10
    report = run_audit([tmp_path])
    assert report.ok, [s.problems for s in report.sites]
    assert report.sites[0].recomputed["rdp"] == pytest.approx(sampled, rel=0.01)


def test_poisson_sampling_draws_each_site_independently_with_probability_q() -> None:
    q, nodes, rounds = 0.3, list(range(10)), 4000
    sampling = PoissonSampling(q, len(nodes), rng=random.Random(0))  # injected: the default is the OS CSPRNG
    draws = [set(sampling.draw(nodes)) for _ in range(rounds)]
    for node in nodes:  # each site: Bernoulli(q); 0.03 is over 4 standard errors (sqrt(0.21 / 4000) = 0.0072)
        assert sum(node in d for d in draws) / rounds == pytest.approx(q, abs=0.03)
    for a, b in combinations(nodes, 2):  # pairs: q^2 = 0.09 (a fixed-size sample of 3 would give 0.067)
        assert sum(a in d and b in d for d in draws) / rounds == pytest.approx(q * q, abs=0.02)
    sizes = [len(d) for d in draws]  # the sample's size varies: Binomial(10, 0.3), empty with probability 0.028
    assert min(sizes) == 0 and max(sizes) >= 7 and np.mean(sizes) == pytest.approx(3.0, abs=0.1)
    assert sizes.count(0) / rounds == pytest.approx(0.7**10, abs=0.01)
    default = PoissonSampling(0.5, 200)
    assert isinstance(default.rng, secrets.SystemRandom) and default.expected_sites == 100
    assert default.draw(range(200)) != default.draw(range(200))  # not seeded (equal with probability 2^-200)
    with pytest.raises(ConfigError, match="rate in"):
        PoissonSampling(1.0, 10)


def sampled_strategy(tmp_path: Path, mode: CentralDP = CentralDP.SERVER_CLIP, *, num_sites: int = 10,
                     fraction: float = 0.5, z: float = 1e-6, releases: list | None = None, reports: list | None = None):
    s = settings(mode, z=z, c=1.0, delta=1e-3)
    central = CentralDPAggregation(s, CentralLedger(tmp_path, "r", s), Phase.FINETUNE,
                                   (lambda rnd, figures: releases.append(figures)) if releases is not None else None)
    strategy = make_strategy("fedavg", phase=Phase.FINETUNE, shared_keys=SHARED, num_sites=num_sites,
                             fraction_train=fraction, evaluate=False, central=central, min_sites=num_sites,
                             observer=reports.append if reports is not None else None)
    strategy._sent = SENT
    return strategy


class NodeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_configure_train_asks_flower_for_every_site_and_keeps_the_poisson_sample(tmp_path: Path,
                                                                                  flwr_task_identity: object) -> None:
    strategy = sampled_strategy(tmp_path, CentralDP.CLIENT_CLIP)
    assert strategy.fraction_train == 1.0 and strategy.central is not None  # Flower addresses all; central samples
    assert strategy.central.sampling == PoissonSampling(0.5, 10) and strategy.min_updates == 0
    nodes = list(range(100, 110))
    strategy.central = replace(strategy.central, sampling=PoissonSampling(0.5, 10, rng=random.Random(3)))
    expected = PoissonSampling(0.5, 10, rng=random.Random(3))
    messages = list(strategy.configure_train(1, SENT, ConfigRecord({"phase": "finetune"}), NodeGrid(nodes)))
    kept = [m.metadata.dst_node_id for m in messages]
    assert 0 < len(kept) < 10 and strategy.central.sampled[1] == len(kept)
    assert all(m.content["config"]["clipping_norm"] == 1.0 for m in messages)
    assert len(set(kept)) == len(kept) and set(kept) <= set(nodes)
    assert len(expected.draw(range(10))) == len(kept)  # one Bernoulli draw per node asked, nothing else
    never = replace(strategy.central.sampling, rng=random.Random(0), rate=1e-9)
    strategy.central = replace(strategy.central, sampling=never)
    assert list(strategy.configure_train(2, SENT, ConfigRecord({"phase": "finetune"}), NodeGrid(nodes))) == []


def test_the_release_divides_by_the_expected_count_not_by_the_sites_that_answered(tmp_path: Path) -> None:
    releases: list = []
    reports: list = []
    strategy = sampled_strategy(tmp_path, releases=releases, reports=reports)  # N = 10, q = 0.5: q N = 5
    failed = Message(Error(code=0, reason="site crashed"), metadata=make_metadata(dst_node_id=0, src_node_id=19))
    # 3 of 10 sites answer (one more was sampled and crashed): enc updates 0.1, 0.1 and 1.0 (norm 2: clipped to 0.5)
    arrays, metrics = strategy.aggregate_train(1, [reply(0, 0.1), reply(1, 0.1), reply(2, 1.0), failed])
    np.testing.assert_allclose(arrays["enc.w"].numpy(), np.full(4, (0.1 + 0.1 + 0.5) / 5), atol=1e-4)  # not / 3
    np.testing.assert_allclose(arrays["head.w"].numpy(), np.ones(2), atol=1e-4)
    np.testing.assert_array_equal(arrays["frozen.w"].numpy(), np.full(3, 7.0, np.float32))
    assert [r.accepted for r in reports] == [True, True, True, False] and "crashed" in reports[3].reason
    (figures,) = releases
    assert figures["sites"] == 3 and figures["sample-rate"] == 0.5 and figures["expected-sites"] == 5
    assert figures["noise-std"] == pytest.approx(1e-6 / 5)
    assert figures["central-epsilon"] == pytest.approx(epsilon_spent([MechanismStep(1e-6, 0.5, 1)], 1e-3, "rdp"))
    assert metrics is not None and metrics["sites"] == 3
    (row,) = verify_ledger(tmp_path / "central.ledger.sqlite").entries
    assert row.sample_rate == 0.5 and row.steps == 1


def test_client_clip_under_sampling_is_clipped_again_by_the_server(tmp_path: Path) -> None:
    strategy = sampled_strategy(tmp_path, CentralDP.CLIENT_CLIP, z=1e-9)
    # norm 1 + 1e-5 x 0.9 passes the check's float tolerance (1e-5); the server clips it to C = 1: 0.5 / (q N) = 0.1
    arrays, _ = strategy.aggregate_train(1, [reply(0, (1 + 9e-6) / 2)])
    np.testing.assert_allclose(arrays["enc.w"].numpy(), np.full(4, 0.1), rtol=0, atol=1e-7)  # unclipped: 0.1000009


def test_an_empty_poisson_sample_still_releases_the_noise_alone(tmp_path: Path) -> None:
    releases: list = []
    strategy = sampled_strategy(tmp_path, z=1.0, releases=releases, num_sites=100, fraction=0.04)  # q N = 4
    big = ArrayRecord({"enc.w": Array(np.zeros(100_000, np.float32)), "frozen.w": Array(np.full(3, 7.0, np.float32))})
    strategy._sent = big
    assert strategy.central is not None
    strategy.shared_keys = ["enc.w"]
    strategy.central = replace(strategy.central, shared_keys=("enc.w",))
    arrays, metrics = strategy.aggregate_train(1, [])  # nobody sampled: no reply, no failure, a release
    noise = arrays["enc.w"].numpy()
    assert noise.dtype == np.float32 and noise.std() == pytest.approx(0.25, rel=0.02)  # z C / (q N) = 1 / 4
    np.testing.assert_array_equal(arrays["frozen.w"].numpy(), np.full(3, 7.0, np.float32))
    assert metrics is not None and metrics["sites"] == 0
    (figures,) = releases
    assert figures["sites"] == 0 and figures["noise-std"] == pytest.approx(0.25)
    assert len(verify_ledger(tmp_path / "central.ledger.sqlite").entries) == 1  # accounted like any release


def test_every_sampled_site_refusing_or_failing_still_releases_and_never_fails_the_round(tmp_path: Path) -> None:
    releases: list = []
    strategy = sampled_strategy(tmp_path, releases=releases)
    failed = Message(Error(code=0, reason="gone"), metadata=make_metadata(dst_node_id=0, src_node_id=12))
    arrays, _ = strategy.aggregate_train(1, [failed])  # min-sites 10 does not gate a Poisson round
    np.testing.assert_allclose(arrays["enc.w"].numpy(), np.zeros(4), atol=1e-4)
    assert releases[0]["sites"] == 0


def test_fraction_one_keeps_every_site_the_mean_over_arrivals_and_q_1(tmp_path: Path) -> None:
    releases: list = []
    strategy, _ = wrapped(tmp_path, CentralDP.SERVER_CLIP, releases=releases)
    assert strategy.central is not None and strategy.central.sampling is None and strategy.fraction_train == 1.0
    strategy.aggregate_train(1, [reply(0, 0.1), reply(1, 0.1)])
    assert releases[0][1]["sample-rate"] == 1.0 and "expected-sites" not in releases[0][1]
    assert [e.sample_rate for e in verify_ledger(tmp_path / "central.ledger.sqlite").entries] == [1.0]


# ---- settings the config refuses ------------------------------------------------------------------

REFUSED = {
    "secagg+ with a robust rule": (dict(secure_aggregation="secagg+", aggregation="median"), "robust rule needs every"),
    "secagg+ with the norm screen": (
        dict(secure_aggregation="secagg+", norm_outlier_factor=3.0), "norm-outlier-factor"),
    "secagg+ with server clipping": (
        dict(secure_aggregation="secagg+", central_dp="server-clip"), "use central-dp client-clip"),
    "secagg+ with one site": (dict(secure_aggregation="secagg+", num_sites=1), "at least 2 sites"),
    "secagg+ with central dp sampling sites": (
        dict(secure_aggregation="secagg+", central_dp="client-clip", num_sites=10, fraction_train=0.5),
        "use fraction-train 1 with secagg"),
    "the norm screen with central dp sampling sites": (
        dict(central_dp="server-clip", norm_outlier_factor=3.0, num_sites=10, fraction_train=0.5),
        "cannot be combined with norm-outlier-factor"),
    "unknown secure aggregation": (dict(secure_aggregation="secagg"), "secure-aggregation must be one of"),
    "unknown central dp": (dict(central_dp="local"), "central-dp must be one of"),
    "central dp with a robust rule": (dict(central_dp="server-clip", aggregation="median"), "sensitivity of the mean"),
    "zero noise": (
        dict(central_dp="server-clip", central_dp_noise_multiplier=0.0), "central-dp-noise-multiplier must be > 0"),
    "zero clipping norm": (
        dict(central_dp="client-clip", central_dp_clipping_norm=0.0), "central-dp-clipping-norm must be > 0"),
    "delta not below 1/sites": (dict(central_dp="server-clip", central_dp_delta=0.2), "central-dp-delta must be in"),
    "shares fraction above 1": (dict(secagg_num_shares=3.0), "secagg-num-shares"),
    "threshold 0": (dict(secagg_threshold=0.0), "secagg-threshold"),
    "clipping range 0": (dict(secagg_clipping_range=0.0), "secagg-clipping-range"),
}


@pytest.mark.parametrize("changes,message", REFUSED.values(), ids=REFUSED.keys())
def test_combinations_that_cannot_work_are_refused_naming_the_rule(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_config(**changes)


def test_the_combinations_that_work_are_accepted() -> None:
    run_config(secure_aggregation="secagg+", central_dp="client-clip")
    run_config(secure_aggregation="secagg+", dp="finetune")
    run_config(central_dp="server-clip", strategy="fedprox", proximal_mu=0.1)
    run_config(central_dp="server-clip", num_sites=10, fraction_train=0.3)
    run_config(secure_aggregation="secagg+", central_dp="client-clip", num_sites=10, fraction_train=1.0)
