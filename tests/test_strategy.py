"""Shared-weights FedAvg over mocked Flower replies: weighted averaging and the reply contract."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_metadata
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from medfed.constants import Phase
from medfed.exceptions import FederationError
from medfed.strategies.shared_weights import SiteReport, check_reply, make_strategy
from medfed.task.calibration import HIST_NEGATIVE, score_histograms

SENT = ArrayRecord({"encoder.w": Array(np.zeros((2, 3), np.float32)), "encoder.b": Array(np.zeros(3, np.float32))})


def reply(arrays: dict[str, np.ndarray] | None, metrics: dict, node: int = 1) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(content, metadata=make_metadata(dst_node_id=0, src_node_id=node))


def good(value: float, n: int, site: int) -> Message:
    arrays = {"encoder.w": np.full((2, 3), value, np.float32), "encoder.b": np.full(3, value, np.float32)}
    return reply(arrays, {"num-examples": n, "site-id": site, "train-loss": value}, node=site + 10)


def strategy(shared: list[str] | None = None, reports: list | None = None, min_sites: int = 1):
    s = make_strategy(
        "fedavg", phase=Phase.PRETRAIN, shared_keys=shared or list(SENT.keys()), num_sites=3, fraction_train=1.0,
        evaluate=False, observer=(reports.append if reports is not None else None),
        min_sites=min_sites,  # 1: rounds go on with the sites that sent a valid update (0 would need all 3)
    )
    s._sent = SENT  # what configure_train would have remembered
    return s


def test_example_weighted_average_of_two_sites() -> None:
    arrays, metrics = strategy().aggregate_train(1, [good(0.0, 1, 0), good(4.0, 3, 1)])
    np.testing.assert_allclose(arrays["encoder.w"].numpy(), np.full((2, 3), 3.0))  # (0*1 + 4*3) / 4
    assert metrics["train-loss"] == pytest.approx(3.0) and metrics["total-examples"] == 4


BROKEN = {
    "extra projector array": (
        {"encoder.w": np.zeros((2, 3), np.float32), "encoder.b": np.zeros(3, np.float32),
         "projector.w": np.zeros((3, 3), np.float32)},
        {"num-examples": 5, "site-id": 2},
        "unexpected ['projector.w']",
    ),
    "missing array": (
        {"encoder.w": np.zeros((2, 3), np.float32)}, {"num-examples": 5, "site-id": 2}, "missing ['encoder.b']"),
    "wrong shape": (
        {"encoder.w": np.zeros((3, 2), np.float32), "encoder.b": np.zeros(3, np.float32)},
        {"num-examples": 5, "site-id": 2},
        "expected float32(2, 3)",
    ),
    "NaN": (
        {"encoder.w": np.full((2, 3), np.nan, np.float32), "encoder.b": np.zeros(3, np.float32)},
        {"num-examples": 5, "site-id": 2},
        "NaN or infinite",
    ),
    "list metric (e.g. labels)": (
        {"encoder.w": np.zeros((2, 3), np.float32), "encoder.b": np.zeros(3, np.float32)},
        {"num-examples": 5, "site-id": 2, "labels": [0, 1, 1]},
        "is a list",
    ),
    "fractional example count": (
        {"encoder.w": np.zeros((2, 3), np.float32), "encoder.b": np.zeros(3, np.float32)},
        {"num-examples": 2.5, "site-id": 2},
        "num-examples must be a whole number > 0",
    ),
    "NaN example count": (
        {"encoder.w": np.zeros((2, 3), np.float32), "encoder.b": np.zeros(3, np.float32)},
        {"num-examples": float("nan"), "site-id": 2},
        "num-examples must be a whole number > 0",
    ),
    "no example count": (
        {"encoder.w": np.zeros((2, 3), np.float32), "encoder.b": np.zeros(3, np.float32)},
        {"site-id": 2},
        "'num-examples' missing",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_reply_is_rejected_logged_and_not_averaged(case: str) -> None:
    arrays, metrics, reason = BROKEN[case]
    assert reason in check_reply(reply(arrays, metrics).content, SENT, list(SENT.keys()))
    reports: list[SiteReport] = []
    out, _ = strategy(reports=reports).aggregate_train(1, [good(2.0, 1, 0), reply(arrays, metrics, node=12)])
    np.testing.assert_allclose(out["encoder.w"].numpy(), 2.0)  # only the good site counted
    rejected = [r for r in reports if not r.accepted]
    assert len(rejected) == 1 and reason in rejected[0].reason and rejected[0].site_id == 2


def test_all_replies_invalid_or_failed_raises() -> None:
    failed = Message(Error(code=0, reason="site crashed"), metadata=make_metadata(dst_node_id=0, src_node_id=11))
    with pytest.raises(FederationError, match="no valid site update.*site crashed"):
        strategy().aggregate_train(3, [failed])


def test_frozen_weights_are_carried_over_for_a_linear_probe() -> None:
    head_only = reply({"encoder.b": np.full(3, 5.0, np.float32)}, {"num-examples": 2, "site-id": 0})
    out, _ = strategy(shared=["encoder.b"]).aggregate_train(1, [head_only])
    assert list(out.keys()) == list(SENT.keys())
    np.testing.assert_allclose(out["encoder.b"].numpy(), 5.0)
    np.testing.assert_allclose(out["encoder.w"].numpy(), 0.0)  # not sent, kept from the global model


def test_fedprox_sends_proximal_mu_to_sites(flwr_task_identity: None) -> None:
    s = make_strategy("fedprox", phase=Phase.FINETUNE, shared_keys=["a"], num_sites=2, fraction_train=1.0,
                      evaluate=True, proximal_mu=0.1)

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    messages = list(s.configure_train(1, SENT, ConfigRecord({"phase": "finetune"}), Grid()))
    assert len(messages) == 2
    assert messages[0].content["config"]["proximal-mu"] == pytest.approx(0.1)


def test_a_second_update_from_the_same_site_is_rejected() -> None:
    reports: list[SiteReport] = []
    out, _ = strategy(reports=reports).aggregate_train(1, [good(2.0, 1, 0), good(8.0, 1, 0)])
    np.testing.assert_allclose(out["encoder.w"].numpy(), 2.0)
    assert [r.accepted for r in reports] == [True, False] and "second update from site 0" in reports[1].reason


def test_evaluate_replies_carrying_arrays_are_not_aggregated() -> None:
    reports: list[SiteReport] = []
    s = strategy(reports=reports)
    honest = reply(None, {"num-examples": 10, "site-id": 0, "auc": 0.8})
    leaky = reply({"encoder.w": np.zeros((2, 3), np.float32)}, {"num-examples": 30, "site-id": 1, "auc": 0.2}, node=11)
    metrics = s.aggregate_evaluate(1, [honest, leaky])
    assert metrics["auc"] == pytest.approx(0.8)
    assert [r.accepted for r in reports] == [True, False] and "must not carry arrays" in reports[1].reason


def test_evaluate_histograms_set_the_rounds_threshold_and_malformed_ones_are_rejected() -> None:
    """Two sites' validation histograms are pooled into the round's threshold; a site whose histograms do not
    add up to its num-examples is rejected (its counts are not pooled), and the lists never enter the averages."""
    reports: list[SiteReport] = []
    s = strategy(reports=reports)

    def site_hist(z: list[float], labels: list[int], site: int, extra: int = 0) -> Message:
        p = 1 / (1 + np.exp(-np.array(z)))
        hist = score_histograms(np.array(labels)[:, None], np.stack([1 - p, p], 1))
        hist[HIST_NEGATIVE][0] += extra
        return reply(None, {"num-examples": len(z), "site-id": site, "auc": 1.0, **hist}, node=site + 10)

    a = site_hist([0.5, 0.6, 1.5, 1.7], [0, 0, 1, 1], 0)
    b = site_hist([0.7, 0.8, 1.3, 1.9], [0, 0, 1, 1], 1)
    forged = site_hist([3.0, 3.0], [0, 0], 2, extra=5)
    metrics = s.aggregate_evaluate(4, [b, forged, a])
    assert [r.accepted for r in reports] == [True, False, True]
    assert "count 7 cases but the site evaluated 2" in reports[1].reason
    t = s.thresholds[4]
    assert (t.positives, t.negatives, t.youden_j) == (4, 4, pytest.approx(1.0))
    assert 0.8 < np.log(t.probability / (1 - t.probability)) <= 1.3
    assert set(metrics) == {"auc"}
    assert strategy().thresholds == {}


def test_a_site_evaluated_on_its_test_share_is_recorded_apart_and_not_averaged() -> None:
    reports: list[SiteReport] = []
    s = strategy(reports=reports)
    on_val = reply(None, {"num-examples": 4, "site-id": 0, "auc": 0.8})
    on_test = reply(None, {"num-examples": 2, "site-id": 1, "auc": 0.2, "evaluated-on-test": 1.0}, node=11)
    metrics = s.aggregate_evaluate(2, [on_test, on_val])
    assert metrics is not None and dict(metrics) == {"auc": pytest.approx(0.8)}  # the val site's alone
    assert [(r.kind, r.site_id, r.accepted) for r in reports] == [("evaluate-on-test", 1, True), ("evaluate", 0, True)]
    assert s.evaluated_sites[2] == [0, 1]
    assert s.aggregate_evaluate(3, [on_test]) is None and 3 not in s.thresholds  # no val reply: no average


def test_default_fractions_keep_evaluating_every_site() -> None:
    s = make_strategy("fedavg", phase=Phase.FINETUNE, shared_keys=["a"], num_sites=5, fraction_train=1.0,
                      evaluate=True)
    assert (s.fraction_evaluate, s.min_evaluate_nodes) == (1.0, 5)
    sampled = make_strategy("fedavg", phase=Phase.FINETUNE, shared_keys=["a"], num_sites=100, fraction_train=0.1,
                            evaluate=True, fraction_evaluate=0.25)
    assert (sampled.fraction_evaluate, sampled.min_evaluate_nodes, sampled.min_train_nodes) == (0.25, 25, 10)


def test_aggregation_does_not_depend_on_reply_order() -> None:
    values = [(0.1, 3, 0), (0.7, 5, 1), (0.3, 7, 2), (0.9, 11, 3)]
    forward, _ = strategy().aggregate_train(1, [good(v, n, s) for v, n, s in values])
    backward, _ = strategy().aggregate_train(1, [good(v, n, s) for v, n, s in reversed(values)])
    assert np.array_equal(forward["encoder.w"].numpy(), backward["encoder.w"].numpy())  # bitwise


# ---- privacy: refusals and the max-epsilon aggregate --------------------------------


def refusal(site: int, epsilon: float) -> Message:
    content = RecordDict({
        "metrics": MetricRecord(
            {"site-id": site, "refused": 1.0, "epsilon": epsilon, "delta": 1e-5, "epsilon-budget": 3.0}),
        "refusal": ConfigRecord({"reason": f"site {site} refuses the round: epsilon would reach 3.2 > budget 3"}),
    })
    return Message(content, metadata=make_metadata(dst_node_id=0, src_node_id=site + 10))


def private(value: float, n: int, site: int, epsilon: float) -> Message:
    msg = good(value, n, site)
    metrics = msg.content["metrics"]
    metrics["epsilon"], metrics["delta"] = epsilon, 1e-5
    return msg


def test_epsilon_aggregates_as_the_max_over_sites_not_the_weighted_mean() -> None:
    _, metrics = strategy().aggregate_train(1, [private(0.0, 100, 0, 0.5), private(1.0, 1, 1, 2.5)])
    assert metrics["epsilon"] == pytest.approx(2.5)  # a weighted mean would say ~0.52
    assert metrics["delta"] == pytest.approx(1e-5)


def test_a_refusing_site_is_recorded_and_the_round_goes_on_with_the_others() -> None:
    reports: list[SiteReport] = []
    arrays, metrics = strategy(reports=reports).aggregate_train(2, [private(2.0, 4, 0, 1.0), refusal(1, 2.9)])
    np.testing.assert_allclose(arrays["encoder.w"].numpy(), np.full((2, 3), 2.0))  # only site 0 averaged
    assert metrics["refused-sites"] == 1
    refused = [r for r in reports if not r.accepted]
    assert len(refused) == 1 and refused[0].site_id == 1 and refused[0].reason.startswith("refused: ")
    assert refused[0].metrics["epsilon"] == pytest.approx(2.9)


def test_when_every_site_refuses_the_global_model_is_kept() -> None:
    arrays, metrics = strategy().aggregate_train(3, [refusal(0, 2.9), refusal(1, 2.95)])
    assert arrays is None and metrics["refused-sites"] == 2  # Flower keeps the previous global arrays


def test_a_refusal_that_carries_arrays_is_not_a_refusal() -> None:
    msg = good(1.0, 2, 0)
    msg.content["refusal"] = ConfigRecord({"reason": "sneaky"})
    with pytest.raises(FederationError):  # treated as a normal reply, which breaks the contract (extra record)
        strategy().aggregate_train(1, [msg])


def test_min_sites_sets_the_sites_a_round_waits_for_and_the_valid_updates_it_needs() -> None:
    s = make_strategy("fedavg", phase=Phase.FINETUNE, shared_keys=list(SENT.keys()), num_sites=3, fraction_train=1.0,
                      evaluate=True, min_sites=2)
    assert (s.min_available_nodes, s.min_train_nodes, s.min_evaluate_nodes) == (2, 2, 2)
    s._sent = SENT
    arrays, _ = s.aggregate_train(1, [good(1.0, 1, 0), good(3.0, 1, 1)])  # the third site died: 2 >= 2
    np.testing.assert_allclose(arrays["encoder.w"].numpy(), 2.0)
    with pytest.raises(FederationError, match="1 valid site update\\(s\\), fewer than min-sites 2"):
        s.aggregate_train(2, [good(1.0, 1, 0)])



def test_min_sites_0_needs_every_site_to_answer_with_a_valid_update_or_a_refusal() -> None:
    every = strategy(min_sites=0)  # the default: every site connected, and every site's answer
    assert (every.min_available_nodes, every.min_train_nodes, every.min_updates) == (3, 3, 3)
    arrays, _ = every.aggregate_train(1, [good(1.0, 1, 0), good(3.0, 1, 1), good(5.0, 1, 2)])
    np.testing.assert_allclose(arrays["encoder.w"].numpy(), 3.0)
    with pytest.raises(FederationError,
                       match="2 valid site update\\(s\\), fewer than min-sites 3 \\(min-sites 0: every site"):
        every.aggregate_train(2, [good(1.0, 1, 0), good(3.0, 1, 1)])  # the third site died
    broken = good(5.0, 1, 2)
    broken.content["arrays"]["encoder.b"] = Array(np.full(3, np.nan, np.float32))
    with pytest.raises(FederationError, match="2 valid site update\\(s\\), fewer than min-sites 3.*NaN"):
        every.aggregate_train(3, [good(1.0, 1, 0), good(3.0, 1, 1), broken])  # an invalid update is no update
    # a site at its privacy budget answers with a refusal: recorded, not waited for; the round goes on
    arrays, metrics = every.aggregate_train(4, [private(1.0, 1, 0, 0.5), private(3.0, 1, 1, 0.5), refusal(2, 2.9)])
    np.testing.assert_allclose(arrays["encoder.w"].numpy(), 2.0)
    assert metrics["refused-sites"] == 1
    with pytest.raises(FederationError,
                       match="1 valid site update\\(s\\) and 1 refusal\\(s\\), fewer than min-sites 3"):
        every.aggregate_train(5, [good(1.0, 1, 0), refusal(2, 2.9)])
    sampled = make_strategy("fedavg", phase=Phase.FINETUNE, shared_keys=list(SENT.keys()), num_sites=4,
                            fraction_train=0.5, evaluate=False)
    # every site sampled
    assert (sampled.min_available_nodes, sampled.min_train_nodes, sampled.min_updates) == (4, 2, 2)
