"""A thousand simulated sites (issue 15): the partition of a small train split into many sites, sites without
validation data (evaluated on their test share, kept out of the threshold and the validation averages),
federated evaluation of a sampled fraction of sites, central DP's accounting under client sampling, and a real
simulation whose cost follows the sites sampled per round, not the federation."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, make_metadata
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from medfed.config import CentralDPSettings, run_config
from medfed.constants import CentralDP, MetricKey, Phase, TaskType
from medfed.data.partition import SPLIT_FILE, describe_sizes, make_site_plan, size_distribution, summarize
from medfed.data.site import site_from_split
from medfed.exceptions import SplitError
from medfed.experiment.phases import ArmContext
from medfed.experiment.prepare import prepare
from medfed.experiment.recorder import TEST_SHARE_SPLIT, Recorder
from medfed.privacy.accounting import epsilon_spent
from medfed.privacy.central import CENTRAL_ACCOUNTANT, CentralLedger
from medfed.privacy.guard import open_signed_ledger
from medfed.privacy.mechanism import MechanismStep
from medfed.simulations.launcher import simulate
from medfed.strategies.central_dp import CentralDPAggregation
from medfed.strategies.shared_weights import SiteReport, make_strategy
from medfed.task.algo import SiteAlgo
from medfed.task.calibration import HISTOGRAM_KEYS
from medfed.task.model_setup import new_classifier
from medfed.task.site_round import evaluate_site

pytestmark = pytest.mark.usefixtures("shared_data")


@functools.lru_cache(maxsize=1)
def pneumonia() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(SHARED_DATA / "pneumoniamnist.npz") as npz:
        return tuple(npz[f"{s}_labels"].astype(np.int64) for s in ("train", "val", "test"))  # type: ignore[return-value]


def plan_of(num_sites: int, **kw: object):
    train, val, test = pneumonia()
    return make_site_plan(train, val, TaskType.BINARY, test_labels=test, scheme=str(kw.pop("scheme", "iid")),
                          num_sites=num_sites, alpha=0.5, label_fraction=0.1, seed=0, **kw)  # type: ignore[arg-type]


def counts(values: list[int]) -> dict[int, int]:
    sizes, n = np.unique(values, return_counts=True)
    return dict(zip(sizes.tolist(), n.tolist(), strict=True))


# ---- the partition ------------------------------------------------------------------------------------------


def test_4708_train_images_into_1000_sites() -> None:
    """PneumoniaMNIST's 4708 train (1214 normal, 3494 pneumonia), 524 val and 624 test images into 1000 IID sites:
    each class is cut into near-equal parts (1 or 2 normal, 3 or 4 pneumonia a site), so 4 to 6 images a site;
    530 sites get no val image and are still sites."""
    plan = plan_of(1000)
    train, val, test = pneumonia()
    assert plan.num_sites == len(plan.sites) == 1000 and plan.min_site_size == 4  # automatic: 4708 // 1000
    assert counts([len(s.train) for s in plan.sites]) == {4: 410, 5: 472, 6: 118}
    assert counts([len(s.labelled) for s in plan.sites]) == {1: 1000}
    assert counts([len(s.val) for s in plan.sites]) == {0: 530, 1: 416, 2: 54}
    assert counts([len(s.test) for s in plan.sites]) == {0: 476, 1: 424, 2: 100}
    for split, labels in (("train", train), ("val", val), ("test", test)):
        parts = [getattr(s, split) for s in plan.sites]
        assert sorted(np.concatenate(parts).astype(int).tolist()) == list(range(len(labels)))  # each image once
        per_class = np.array([np.bincount(labels[p, 0], minlength=2) if len(p) else [0, 0] for p in parts])
        assert (per_class.max(axis=0) - per_class.min(axis=0) <= 1).all()  # near-equal per class
    dist = size_distribution(summarize(plan, train, val, TaskType.BINARY))
    assert dist["sites"] == 1000 and dist["sites_without_val"] == 530
    assert dist["train"] == {"min": 4.0, "q1": 4.0, "median": 5.0, "q3": 5.0, "max": 6.0}
    assert dist["val"] == {"min": 0.0, "q1": 0.0, "median": 0.0, "q3": 1.0, "max": 2.0}
    assert describe_sizes(dist) == ("1000 sites, images per site: train 4-6 (median 5), labelled 1-1 (median 1), "
                                    "val 0-2 (median 0), test 0-2 (median 1); 530 site(s) without val (evaluated "
                                    "on their test share)")


def test_a_min_site_size_given_is_honoured_strictly_and_its_refusal_names_the_setting() -> None:
    with pytest.raises(SplitError) as err:
        plan_of(1000, min_site_size=5)
    message = str(err.value)
    assert "cannot give 1000 sites at least 5 training image(s) each" in message
    assert "at most 4 each" in message and "lower min-site-size (0: automatic) or num-sites" in message
    assert "alpha" not in message  # an iid refusal is not about alpha
    with pytest.raises(SplitError, match="gives its smallest site 4, fewer than min-site-size 5") as iid:
        plan_of(900, min_site_size=5)  # 4708 // 900 = 5, but the iid cut's smallest site has 4
    assert "alpha" not in str(iid.value)
    with pytest.raises(SplitError, match="raise alpha"):  # a non-iid refusal still says how
        plan_of(1000, scheme="dirichlet", min_site_size=4)


@pytest.mark.parametrize("scheme", ["dirichlet", "quantity"])
def test_the_default_skewed_partition_of_1000_sites_deals_each_site_its_automatic_floor_first(scheme: str) -> None:
    """`medfed simulate --num-sites 1000` with the default dirichlet partition: Dir(0.5) shares alone leave about one
    site in ten without a train image, so with min-site-size automatic every site is dealt 4 images IID and the rest
    (708) is cut by the skewed shares; the plan says so. A 5-site plan never needs the floor (unchanged)."""
    train, _, _ = pneumonia()
    plan = plan_of(1000, scheme=scheme)
    assert plan.iid_floor == plan.min_site_size == 4
    sizes = [len(s.train) for s in plan.sites]
    assert min(sizes) == 4 and sum(sizes) == len(train) and max(sizes) > 6  # the rest went where the shares said
    assert sorted(np.concatenate([s.train for s in plan.sites]).astype(int).tolist()) == list(range(len(train)))
    assert plan_of(5, scheme=scheme).iid_floor == 0


def test_min_site_size_automatic() -> None:
    assert plan_of(5).min_site_size == 10  # the default: 10, so a 5-site partition is what it was
    assert plan_of(300).min_site_size == 10
    assert plan_of(1000).min_site_size == 4
    with pytest.raises(SplitError, match="cannot give 4709 sites at least 1 training image.*lower num-sites$"):
        plan_of(4709)


# ---- federated evaluation: sampled, and sites without val data --------------------------------------------


class Grid:
    def __init__(self, n: int) -> None:
        self.nodes = list(range(100, 100 + n))

    def get_node_ids(self) -> list[int]:
        return self.nodes


@pytest.mark.parametrize("fraction_evaluate, expected", [(0.0, 10), (0.05, 50), (1.0, 1000)])
def test_fraction_evaluate_samples_that_many_sites(flwr_task_identity: None, fraction_evaluate: float,
                                                   expected: int) -> None:
    s = make_strategy("fedavg", phase=Phase.FINETUNE, shared_keys=["a"], num_sites=1000, fraction_train=0.01,
                      evaluate=True, fraction_evaluate=fraction_evaluate)
    sent = ArrayRecord({"a": Array(np.zeros(2, np.float32))})
    grid = Grid(1000)
    evaluate = list(s.configure_evaluate(1, sent, ConfigRecord({"phase": "finetune"}), grid))
    train = list(s.configure_train(1, sent, ConfigRecord({"phase": "finetune"}), grid))
    assert len(evaluate) == expected and len({m.metadata.dst_node_id for m in evaluate}) == expected
    assert len(train) == 10


def test_no_federated_evaluation_without_evaluate(flwr_task_identity: None) -> None:
    s = make_strategy("fedavg", phase=Phase.PRETRAIN, shared_keys=["a"], num_sites=1000, fraction_train=0.01,
                      evaluate=False, fraction_evaluate=0.5)
    assert list(s.configure_evaluate(1, ArrayRecord({"a": Array(np.zeros(2, np.float32))}), ConfigRecord(),
                                     Grid(1000))) == []


@pytest.fixture()
def many_sites(tmp_path: Path, data_path_env: Path) -> tuple[ArmContext, object, object]:
    """BreastMNIST (546 train, 78 val, 156 test) in 100 IID sites: 4 to 6 train images each, 37 without val."""
    cfg = run_config(data="breastmnist", num_sites=100, partition="iid", width=8, baselines="none")
    prep = prepare(cfg)
    assert prep.plan is not None
    prep.plan.save(tmp_path / SPLIT_FILE)
    ctx = ArmContext("test", prep.cfg, tmp_path, prep.data.path, prep.test, Recorder(tmp_path / "m.jsonl"))
    return ctx, prep.plan, prep.data


def test_a_site_without_val_is_evaluated_on_its_test_share_and_kept_out_of_calibration(many_sites) -> None:
    ctx, plan, _ = many_sites
    no_val = [s for s in plan.sites if not s.val]
    with_val = [s for s in plan.sites if s.val]
    assert len(no_val) == 37 and len(with_val) == 63
    state = new_classifier(ctx.cfg, ctx.test.spec, ctx.test.task, ctx.test.num_classes, None).state_dict()
    config = ctx.message_config(Phase.FINETUNE)
    site = next(s for s in no_val if len(s.test) >= 2)
    on_test = evaluate_site(config, state, {"partition-id": site.site_id})
    assert on_test[MetricKey.EVALUATED_ON_TEST] == 1.0
    assert on_test[MetricKey.NUM_EXAMPLES] == len(site.test) and on_test[MetricKey.SITE_ID] == site.site_id
    assert "eval-loss" in on_test and not set(HISTOGRAM_KEYS) & set(on_test)  # metrics, no histograms
    raw = json.loads((ctx.run_dir / SPLIT_FILE).read_text())  # a site with neither val nor test images
    empty = no_val[-1].site_id
    raw["sites"][empty]["test"] = []
    (ctx.run_dir / SPLIT_FILE).write_text(json.dumps(raw))
    assert evaluate_site(config, state, {"partition-id": empty}) == {  # nothing to evaluate, and it says so
        MetricKey.NUM_EXAMPLES: 0.0, MetricKey.SITE_ID: float(empty), MetricKey.EVALUATED_ON_TEST: 1.0}
    on_val = evaluate_site(config, state, {"partition-id": with_val[0].site_id})
    assert MetricKey.EVALUATED_ON_TEST not in on_val and set(HISTOGRAM_KEYS) <= set(on_val)
    assert on_val[MetricKey.NUM_EXAMPLES] == len(with_val[0].val)

    # the server: the test-share reply is recorded apart, not in the threshold nor in the validation averages
    reports: list[SiteReport] = []
    s = make_strategy("fedavg", phase=Phase.FINETUNE, shared_keys=["a"], num_sites=100, fraction_train=0.1,
                      evaluate=True, observer=reports.append)

    def as_reply(metrics: dict, node: int) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(dict(metrics))}),
                       metadata=make_metadata(dst_node_id=0, src_node_id=node))

    forged = {**on_test, HISTOGRAM_KEYS[0]: on_val[HISTOGRAM_KEYS[0]], HISTOGRAM_KEYS[1]: on_val[HISTOGRAM_KEYS[1]],
              MetricKey.NUM_EXAMPLES: on_val[MetricKey.NUM_EXAMPLES]}
    averaged = s.aggregate_evaluate(3, [as_reply(on_test, 1), as_reply(on_val, 2), as_reply(forged, 3)])
    assert [(r.kind, r.accepted) for r in reports] == [("evaluate-on-test", True), ("evaluate", True),
                                                       ("evaluate", False)]
    assert "must not send validation score histograms" in reports[2].reason
    assert averaged is not None and averaged["eval-loss"] == pytest.approx(on_val["eval-loss"])
    assert MetricKey.EVALUATED_ON_TEST not in averaged
    alone = make_strategy("fedavg", phase=Phase.FINETUNE, shared_keys=["a"], num_sites=100, fraction_train=0.1,
                          evaluate=True)
    alone.aggregate_evaluate(3, [as_reply(on_val, 2)])
    assert s.thresholds.get(3) == alone.thresholds.get(3)  # the val site's histograms alone
    assert s.evaluated_sites[3] == sorted([site.site_id, with_val[0].site_id])

    recorder = Recorder(ctx.run_dir / "rows.jsonl")
    for report in reports:
        recorder.site_observer("arm")(report)
    assert [r["split"] for r in recorder.rows] == [TEST_SHARE_SPLIT, "val", "val"]


def test_a_site_without_val_trains_and_a_baseline_calibrates_no_threshold_on_it(many_sites) -> None:
    """The local-only baseline calibrates on the site's own val split: a site with none trains, and gets none."""
    ctx, plan, data = many_sites
    site = site_from_split(data, next(s for s in plan.sites if not s.val))
    assert len(site.val_images) == 0 and len(site.train_images) >= 4
    algo = SiteAlgo(ctx.cfg, site)
    state = new_classifier(ctx.cfg, site.spec, site.task, site.num_classes, None).state_dict()
    shared, stats = algo.finetune_round(state, 1)
    assert stats.num_examples == len(site.labelled_images) == 1 and shared
    assert algo.evaluate_val(state) == {} and algo.validation_threshold(state) is None


# ---- central DP under client sampling ------------------------------------------------------------------------


def test_central_dp_accounts_the_poisson_rate_when_sampling_sites(tmp_path: Path) -> None:
    """10 of 1000 sites a round: central DP samples each site independently with q = 0.01 (DP-FedAvg, CSPRNG) and
    divides by q N = 10, so each release is the sampled Gaussian at rate 0.01. Pinned: two releases at z = 1 cost
    epsilon 0.7129 at delta 1e-4 (6.3072 at fraction 1, every site: q = 1)."""
    settings = CentralDPSettings(CentralDP.SERVER_CLIP, 1.0, 1.0, 1e-4)
    ledger = CentralLedger(tmp_path / "sampled", "run/arm", settings)
    central = CentralDPAggregation(settings, ledger, Phase.FINETUNE)
    strategy = make_strategy("fedavg", phase=Phase.FINETUNE, shared_keys=["w"], num_sites=1000, fraction_train=0.01,
                             evaluate=False, central=central)
    assert strategy.central is not None and strategy.central.sampling is not None
    assert strategy.central.sampling.rate == 0.01 and strategy.central.sampling.expected_sites == pytest.approx(10)
    assert strategy.fraction_train == 1.0  # Flower addresses every site; the Poisson draw picks
    sent = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    for rnd in (1, 2):  # two releases (here of empty samples: the accounting does not depend on who was drawn)
        strategy.central.combine(rnd, [], sent)
    with open_signed_ledger(ledger.path, ledger.key_path, "central") as signed:
        rows = list(signed.entries())
    assert [r.sample_rate for r in rows] == [0.01, 0.01]
    sampled = epsilon_spent([MechanismStep(1.0, 0.01, 2)], 1e-4, CENTRAL_ACCOUNTANT)
    assert rows[-1].epsilon_after == pytest.approx(sampled) == pytest.approx(0.7129, abs=1e-4)

    every = CentralLedger(tmp_path / "every", "run/arm", settings)  # fraction 1: every site, q = 1, as before
    full = make_strategy("fedavg", phase=Phase.FINETUNE, shared_keys=["w"], num_sites=1000, fraction_train=1.0,
                         evaluate=False, central=CentralDPAggregation(settings, every, Phase.FINETUNE))
    assert full.central is not None and full.central.sampling is None
    update = {"w": np.zeros(3, np.float32)}
    for rnd in (1, 2):
        full.central.combine(rnd, [update], sent)
    with open_signed_ledger(every.path, every.key_path, "central") as signed:
        rows = list(signed.entries())
    assert [r.sample_rate for r in rows] == [1.0, 1.0]
    assert rows[-1].epsilon_after == pytest.approx(6.3072, abs=1e-4)


# ---- a real simulation ---------------------------------------------------------------------------------------


def run_many(tmp_path: Path, num_sites: int) -> Path:
    cfg = run_config(data="pneumoniamnist", num_sites=num_sites, fraction_train=10 / num_sites, partition="iid",
                     pretrain_rounds=1, pretrain_epochs=1, finetune_rounds=2, finetune_epochs=1, width=8,
                     baselines="none", client_cpus=1, out_dir=str(tmp_path / "runs"))
    return simulate(cfg)


def check_many(run_dir: Path, num_sites: int, without_val: int) -> None:
    """Only the sampled sites trained and were evaluated; the report lists the sites' size distribution."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["split"] == "train"]
    assert len(trained) == 30 and all(r["accepted"] for r in trained)  # 10 sites x (1 + 2 rounds)
    evaluated = [r for r in rows if r["split"] in ("val", TEST_SHARE_SPLIT)]
    assert len(evaluated) == 20  # 10 sampled sites x 2 fine-tuning rounds, not every site
    assert not [r for r in rows if r["split"] == "val" and r.get(MetricKey.EVALUATED_ON_TEST)]
    assert [r for r in evaluated if r["split"] == TEST_SHARE_SPLIT]  # about half the sites have no val (p > 1-1e-6)
    for rnd in (0, 1, 2):  # per-site test rows: only for the sites evaluated that round (none before round 1)
        tested = {r["site"] for r in rows if r["split"] == "test-site" and r["round"] == rnd}
        assert tested <= {r["site"] for r in evaluated if r["round"] == rnd} and (rnd or not tested)
    assert len([r for r in rows if r["split"] == "test" and r["site"] == "global"]) == 3  # rounds 0, 1, 2
    data = json.loads((run_dir / "data.json").read_text())
    assert data["site_sizes"]["sites"] == num_sites and data["site_sizes"]["sites_without_val"] == without_val
    report = (run_dir / "report.md").read_text()
    assert f"{num_sites} sites; {without_val} without a validation split" in report
    assert "| train | 4 | 4 | 5 | 5 | 6 |" in report and "| val | 0 | 0 | 0 | 1 | 2 |" in report  # the distribution
    assert "| site | train images |" not in report  # ... not a row per site


@pytest.mark.timeout(300)
def test_a_1000_site_simulation_samples_10_sites_a_round(tmp_path: Path, data_path_env: Path) -> None:
    """20-45 s on 2 CPU cores (by their load), most of it Flower's and Ray's start: a round costs what its 10
    sites cost."""
    check_many(run_many(tmp_path, 1000), 1000, without_val=530)


# ---- Flower's simulation sweep -------------------------------------------------------------------------------


class FakeLinkState:
    """Flower's in-memory LinkState as the sweep sees it: a message store, its lock and ``get_message_ins``."""

    def __init__(self, pending: dict[int, int]) -> None:  # node -> messages waiting for it
        import threading
        from types import SimpleNamespace

        self.lock, self.asked = threading.RLock(), []
        self.message_ins_store = {
            f"{node}-{i}": SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=""))
            for node, n in pending.items() for i in range(n)}

    def get_message_ins(self, node_id: int, limit: int | None) -> list:
        self.asked.append(node_id)
        with self.lock:
            found = [m for m in self.message_ins_store.values()
                     if m.metadata.dst_node_id == node_id and not m.metadata.delivered_at][:limit]
            for m in found:
                m.metadata.delivered_at = "now"
        return found


def sweep_once(sweep, state: FakeLinkState, nodes: dict[int, int]) -> list:
    import threading
    from queue import Queue

    class OneSweep(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            self.set()
            return True

    queue: Queue = Queue()
    sweep(state, queue, nodes, OneSweep())
    return [queue.get_nowait().metadata.dst_node_id for _ in range(queue.qsize())]


def test_the_sweep_asks_only_nodes_with_a_message_and_delivers_what_flowers_does() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    from medfed.flower_patches.simulation_sweep import pending_nodes_sweep, sweep_pending_nodes

    nodes = {node: i for i, node in enumerate(range(1000, 2000))}  # 1000 nodes, 3 of them with messages
    ours, flowers = FakeLinkState({1500: 2, 1007: 1, 1999: 1}), FakeLinkState({1500: 2, 1007: 1, 1999: 1})
    assert sweep_once(sweep_pending_nodes, ours, nodes) == sweep_once(vce_api.add_messages_to_queue, flowers, nodes)
    assert ours.asked == [1007, 1500, 1999] and len(flowers.asked) == 1000  # same order, 3 questions, not 1000
    assert sweep_once(sweep_pending_nodes, ours, nodes) == [1500]  # its second message, next sweep (limit 1)
    original = vce_api.add_messages_to_queue
    with pending_nodes_sweep():
        assert vce_api.add_messages_to_queue is sweep_pending_nodes
    assert vce_api.add_messages_to_queue is original


def test_the_loss_plot_of_hundreds_of_sampled_sites_shows_each_round_s_mean_and_range(tmp_path: Path) -> None:
    import warnings

    from medfed.experiment.report import MAX_SITE_LINES, plot_losses

    rows = [{"arm": "federated-simclr", "phase": "pretrain", "round": r, "site": 10 * r + k, "split": "train",
             "train-loss": 5.0 - 0.1 * r + 0.01 * k} for r in range(1, 36) for k in range(10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a legend of 350 sites made tight_layout warn (and the plot unreadable)
        assert plot_losses(rows, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert len({r["site"] for r in rows}) > MAX_SITE_LINES
