"""Robust aggregation (trimmed mean, median, Krum) and the norm-outlier screen: pinned numbers, then
the same rules through SharedWeightsFedAvg.aggregate_train with mocked Flower replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message
from test_strategy import SENT, good, reply

from medfed.config import RobustSettings
from medfed.constants import AggregationRule, Phase
from medfed.exceptions import ConfigError, FederationError
from medfed.strategies import robust
from medfed.strategies.shared_weights import SiteReport, make_strategy


def u(*values: float, b: float = 0.0) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32), "b": np.array([b], np.float32)}


# ---- the rules on plain numpy -----------------------------------------------------------------

FIVE = [u(1, 10, -3), u(2, 20, 7), u(3, 30, 0), u(4, 40, 5), u(100, -50, 1)]


def test_trimmed_mean_drops_one_value_at_each_end_of_every_coordinate() -> None:
    out = robust.trimmed_mean(FIVE, 0.2)  # floor(0.2 * 5) = 1 per end
    # w[0]: 1 2 3 4 100 -> mean(2, 3, 4) = 3; w[1]: -50 10 20 30 40 -> 20; w[2]: -3 0 1 5 7 -> 2
    np.testing.assert_allclose(out["w"], [3.0, 20.0, 2.0])
    assert out["w"].dtype == np.float32
    assert robust.trim_count(5, 0.2) == 1 and robust.trim_count(5, 0.19) == 0 and robust.trim_count(100, 0.29) == 29


def test_trimmed_mean_with_nothing_to_trim_is_the_mean() -> None:
    np.testing.assert_allclose(robust.trimmed_mean(FIVE, 0.1)["w"], [22.0, 10.0, 2.0])


def test_coordinate_median_odd_and_even_counts() -> None:
    np.testing.assert_allclose(robust.coordinate_median(FIVE)["w"], [3.0, 20.0, 1.0])
    np.testing.assert_allclose(robust.coordinate_median(FIVE[:4])["w"], [2.5, 25.0, 2.5])  # mean of the middle two


def test_non_float_arrays_are_taken_from_the_first_update() -> None:
    updates = [{"w": np.array([float(i)], np.float32), "count": np.array([i], np.int64)} for i in (7, 1, 3)]
    out = robust.coordinate_median(updates)
    assert out["count"].dtype == np.int64 and out["count"].tolist() == [7]
    np.testing.assert_allclose(out["w"], [3.0])


HONEST = [u(1.0, 1.0, b=0.5), u(1.1, 0.9, b=0.5), u(0.9, 1.0, b=0.5), u(1.0, 1.2, b=0.6)]
ATTACK = u(100.0, -100.0, b=50.0)


def test_krum_picks_an_honest_update_when_one_of_five_is_far_off() -> None:
    updates = [*HONEST, ATTACK]
    scores = robust.krum_scores(updates, byzantine=1)  # n - f - 2 = 2 nearest neighbours
    # squared distances: d01 .02, d02 .01, d03 .05, d12 .05, d13 .11, d23 .06; to the attack >= 22452.25
    np.testing.assert_allclose(scores[:4], [0.03, 0.07, 0.06, 0.11], atol=1e-5)
    assert scores[4] > 2 * 22000
    assert robust.krum_selection(updates, 1) == [0]
    out = robust.krum(updates, byzantine=1)
    np.testing.assert_array_equal(out["w"], HONEST[0]["w"])  # Krum returns the chosen update itself


def test_multi_krum_averages_the_m_best_scored_updates() -> None:
    updates = [*HONEST, ATTACK]
    assert robust.krum_selection(updates, 1, select=3) == [0, 2, 1]
    out = robust.krum(updates, byzantine=1, select=3)
    np.testing.assert_allclose(out["w"], [1.0, (1.0 + 1.0 + 0.9) / 3], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.5], rtol=1e-6)


def test_krum_with_too_few_updates_refuses_naming_the_numbers() -> None:
    with pytest.raises(FederationError, match=r"f=1 .*n >= 2f\+3 = 5 .*got n=4"):
        robust.krum(HONEST, byzantine=1)
    with pytest.raises(FederationError, match=r"m=5 .*m <= n - f = 5 - 1 = 4"):
        robust.krum([*HONEST, ATTACK], byzantine=1, select=5)
    assert robust.krum_problem(3, 0) == ""  # f = 0: one neighbour each


def test_norm_screen_flags_a_100x_update_among_four_normal_ones() -> None:
    reference = u(0.0, 0.0, b=0.0)
    normal = [u(1, 0, b=0), u(0, 1, b=0), u(0, 0, b=1), u(1, 0, b=0)]  # distance 1 each
    updates = [*normal, u(100, 0, b=0)]
    flagged = robust.norm_outliers(updates, reference, factor=10)
    assert list(flagged) == [4]
    reason = flagged[4]
    assert "norm-outlier-factor 10" in reason and "L2 distance 100 " in reason and "median 1 of the other 4" in reason
    assert "100x" in reason
    np.testing.assert_allclose(robust.update_distances(updates, reference), [1, 1, 1, 1, 100])
    assert robust.norm_outliers(updates, reference, factor=101) == {}  # 100 is not beyond 101 x 1


def test_norm_screen_judges_each_update_against_the_others_only() -> None:
    reference = u(0.0, 0.0)
    updates = [u(1, 0), u(0, 2), u(10, 0)]  # distances 1, 2, 10
    flagged = robust.norm_outliers(updates, reference, factor=6)
    # 10 > 6 x median(1, 2) = 9; with itself in the median (2) the bar would be 12 and it would pass
    assert list(flagged) == [2] and "median 1.5 of the other 2 updates" in flagged[2]


def test_norm_screen_needs_three_updates() -> None:
    reference = u(0.0, 0.0)
    assert robust.norm_outliers([u(1, 0), u(1000, 0)], reference, factor=2) == {}


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ConfigError, match="aggregation must be one of mean, trimmed-mean, median, krum"):
        RobustSettings(rule="mode")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="trim-fraction"):
        RobustSettings(trim_fraction=0.5)
    with pytest.raises(ConfigError, match="norm-outlier-factor"):
        RobustSettings(norm_outlier_factor=1.0)


# ---- through the strategy, with mocked Flower replies --------------------------------------------


def strategy(aggregation: RobustSettings, shared: list[str] | None = None, reports: list | None = None):
    s = make_strategy(
        "fedavg", phase=Phase.PRETRAIN, shared_keys=shared or list(SENT.keys()), num_sites=5, fraction_train=1.0,
        evaluate=False, observer=(reports.append if reports is not None else None), aggregation=aggregation,
        min_sites=1,  # these rounds go on with the sites that sent a valid update (0 would need all 5)
    )
    s._sent = SENT  # what configure_train would have remembered (all zeros)
    return s


def test_a_norm_outlier_reply_is_rejected_with_its_reason_and_the_rest_averaged() -> None:
    reports: list[SiteReport] = []
    s = strategy(RobustSettings(norm_outlier_factor=10.0), reports=reports)
    replies = [good(1.0, 2, 0), good(2.0, 2, 1), good(3.0, 4, 2), good(500.0, 100, 3)]
    arrays, metrics = s.aggregate_train(1, replies)
    # the mean (weighted 2:2:4) of the other three: (2 + 4 + 12) / 8
    np.testing.assert_allclose(arrays["encoder.w"].numpy(), np.full((2, 3), 2.25))
    assert metrics["total-examples"] == 8 and metrics["train-loss"] == pytest.approx(2.25)
    rejected = [r for r in reports if not r.accepted]
    assert len(rejected) == 1 and rejected[0].site_id == 3 and rejected[0].node_id == 13
    assert "norm-outlier-factor 10" in rejected[0].reason and "other 3 updates" in rejected[0].reason
    assert [r.site_id for r in reports] == [0, 1, 2, 3]  # one report per reply, in reply order


def test_median_resists_a_poisoned_site_the_mean_does_not() -> None:
    honest = [good(1.0, 10, 0), good(1.2, 10, 1), good(0.9, 10, 2), good(1.1, 10, 3)]
    poisoned = good(1000.0, 10, 4)
    median, metrics = strategy(RobustSettings(rule="median")).aggregate_train(1, [*honest, poisoned])
    mean, _ = strategy(RobustSettings()).aggregate_train(1, [*honest, poisoned])
    np.testing.assert_allclose(median["encoder.w"].numpy(), 1.1, rtol=1e-6)  # median of 0.9 1.0 1.1 1.2 1000
    np.testing.assert_allclose(mean["encoder.w"].numpy(), 200.84, rtol=1e-6)  # (1 + 1.2 + 0.9 + 1.1 + 1000) / 5
    assert median["encoder.w"].numpy().dtype == np.float32
    assert metrics["total-examples"] == 50  # metrics still over every accepted reply


def test_median_is_unweighted() -> None:
    out, _ = strategy(RobustSettings(rule="median")).aggregate_train(
        1, [good(1.0, 1000, 0), good(2.0, 1, 1), good(3.0, 1, 2)])
    np.testing.assert_allclose(out["encoder.w"].numpy(), 2.0)  # the example counts do not weigh in


def test_krum_through_the_strategy_and_its_median_fallback_when_sites_are_missing() -> None:
    honest = [good(1.0, 10, 0), good(1.2, 10, 1), good(0.9, 10, 2), good(1.05, 10, 3)]
    out, _ = strategy(RobustSettings(rule="krum")).aggregate_train(1, [*honest, good(-50.0, 10, 4)])
    # scores (2 nearest, squared distances over 9 coordinates): site 0 = 9 * (0.01 + 0.0025) = 0.1125 is the
    # lowest (site 3: 0.225, site 2: 0.2925, site 1: 0.5625)
    np.testing.assert_allclose(out["encoder.w"].numpy(), 1.0)
    # a site lost this round: 4 updates are too few for Krum with f = 1 (2f+3 = 5); the round still completes,
    # with the coordinate-wise median of the four (1.0, 1.2, 0.9, 1.05 -> 1.025)
    out, _ = strategy(RobustSettings(rule="krum")).aggregate_train(2, honest)
    np.testing.assert_allclose(out["encoder.w"].numpy(), 1.025)


def test_frozen_weights_are_carried_over_under_robust_aggregation() -> None:
    heads = [reply({"encoder.b": np.full(3, v, np.float32)}, {"num-examples": 2, "site-id": i}, node=10 + i)
             for i, v in enumerate([5.0, 6.0, 7.0, 8.0, 90.0])]
    out, _ = strategy(RobustSettings(rule="trimmed-mean", trim_fraction=0.2),
                      shared=["encoder.b"]).aggregate_train(1, heads)
    assert list(out.keys()) == list(SENT.keys()) and isinstance(out, ArrayRecord)
    np.testing.assert_allclose(out["encoder.b"].numpy(), 7.0)  # mean of 6 7 8 after dropping 5 and 90
    np.testing.assert_allclose(out["encoder.w"].numpy(), 0.0)  # not sent, kept from the global model
    assert out["encoder.w"].numpy().dtype == np.float32 and isinstance(out["encoder.w"], Array)


def test_robust_aggregation_does_not_depend_on_reply_order() -> None:
    """The float rules sort each coordinate anyway; a non-float array is taken from the first update, so it
    shows whether replies are put in site order before aggregating (here: site 0's counter, whatever the order)."""
    values = [(0.1, 3, 0), (0.7, 5, 1), (0.3, 7, 2), (0.9, 11, 3), (0.2, 2, 4)]
    sent = ArrayRecord({**{k: SENT[k] for k in SENT.keys()}, "encoder.count": Array(np.zeros(1, np.int64))})

    def with_counter(v: float, n: int, site: int) -> Message:
        msg = good(v, n, site)
        msg.content["arrays"]["encoder.count"] = Array(np.full(1, 100 + site, np.int64))
        return msg

    for rule in ("trimmed-mean", "median", "krum"):
        settings = RobustSettings(rule=rule, norm_outlier_factor=5.0)
        results = []
        for order in (values, list(reversed(values))):
            s = strategy(settings, shared=list(sent.keys()))
            s._sent = sent
            results.append(s.aggregate_train(1, [with_counter(v, n, site) for v, n, site in order])[0])
        forward, backward = results
        assert np.array_equal(forward["encoder.w"].numpy(), backward["encoder.w"].numpy()), rule
        assert np.array_equal(forward["encoder.count"].numpy(), backward["encoder.count"].numpy()), rule
        if rule != "krum":  # Krum keeps the one best-scored update, whose counter is its own
            assert forward["encoder.count"].numpy().tolist() == [100], rule


def test_settings_come_from_the_run_config() -> None:
    from medfed.config import RunConfig, run_config

    cfg = run_config(aggregation="krum", krum_byzantine=1, krum_select=2, norm_outlier_factor=3.0)
    assert cfg.robust == RobustSettings(AggregationRule.KRUM, 0.2, 1, 2, 3.0)
    assert RunConfig().robust == RobustSettings()  # mean, screen off
    assert run_config(aggregation="trimmed-mean", num_sites=10, trim_fraction=0.1).sites_per_round == 10
