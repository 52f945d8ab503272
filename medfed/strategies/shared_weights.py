"""FedAvg / FedProx that aggregate only the weights sites are allowed to share, built from small parts.

A round's aggregation is a pipeline; each step is a part with one job:

1. **triage** (`triage_replies`): error replies and refusals are recorded; every other reply must hold
   the contract (`medfed.strategies.replies.check_reply`), then each of the strategy's checks (a DP round's
   update reports its cost; central DP's client-clip norm), and one update per site;
2. **screen** (`NormScreen`, ``norm-outlier-factor``): an update far beyond the others is rejected;
3. **enough?** fewer valid updates or refusals than ``min-sites`` fail the round (resumable);
4. **combine**: Flower's FedAvg example-weighted mean (McMahan et al., AISTATS 2017) by default, or a part:
   a Byzantine-robust rule (`RobustRule`, unweighted) or central DP (`CentralDPAggregation`);
5. **carry over** the weights sites do not send (a frozen encoder under a linear probe, the LoRA base);
6. **server step** (`ServerMomentum`, ``pretrain-server-lr`` / ``pretrain-server-momentum``): FedAvgM's velocity
   on the aggregate (off: the aggregate as it is).

FedProx (Li et al., MLSys 2020) sends ``proximal-mu`` and the sites add the proximal term. Federated evaluation
(``fraction-evaluate`` of the sites) pools their validation score histograms into a decision threshold per round; a
site without val data (``evaluated-on-test``) is recorded apart, out of the threshold and the validation averages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from medfed.config import RobustSettings
from medfed.constants import AggregationRule, MetricKey, Phase, StrategyName
from medfed.exceptions import FederationError
from medfed.strategies import robust
from medfed.strategies.central_dp import CentralDPAggregation, train_metrics
from medfed.strategies.replies import (
    EVALUATE_ON_TEST,
    Observer,
    SiteReport,
    check_evaluate_reply,
    check_reply,
    dp_costs_reported,
    evaluated_on_test,
    metric_scalar,
    refusal_reason,
    scalar_metrics,
    update_arrays,
    weighted_eval_metrics,
)
from medfed.strategies.server_momentum import ServerMomentum
from medfed.task.calibration import Threshold, pooled_threshold

Update = dict[str, np.ndarray]
ReplyCheck = Callable[[Update, dict[str, float], ArrayRecord], str]  # (update, metrics, sent) -> reason or ''


@dataclass(frozen=True)
class NormScreen:
    """Rejects an update whose L2 distance from the weights sent exceeds ``factor`` x the median distance of the
    others (`medfed.strategies.robust.norm_outliers`); off below `robust.MIN_UPDATES_TO_SCREEN` updates."""

    factor: float

    def __call__(self, updates: list[Update], sent: ArrayRecord) -> dict[int, str]:
        if not self.factor or len(updates) < robust.MIN_UPDATES_TO_SCREEN:
            return {}
        reference = {key: sent[key].numpy() for key in updates[0]}
        return robust.norm_outliers(updates, reference, self.factor)


@dataclass(frozen=True)
class RobustRule:
    """Trimmed mean, median or (Multi-)Krum over the accepted updates: UNWEIGHTED (a faulty site could claim any
    example count), dtypes kept. Krum with too few updates left for its guarantee falls back to the median (3 or
    more) or the mean, and says so."""

    settings: RobustSettings
    phase: Phase

    def __call__(self, server_round: int, updates: list[Update], sites: list[int]) -> Update:
        s, rule, n = self.settings, AggregationRule(self.settings.rule), len(updates)
        problem = robust.krum_problem(n, s.krum_byzantine, s.krum_select) if rule == AggregationRule.KRUM else ""
        if problem:  # sites failed, refused or were rejected this round: too few left for Krum's guarantee
            fallback = AggregationRule.MEDIAN if n >= 3 else AggregationRule.MEAN
            log(WARNING, "%s round %s: %s accepted update(s) left, too few for Krum (%s); this round uses the "
                "coordinate-wise %s", self.phase.value, server_round, n, problem, fallback.value)
            return robust.aggregate(fallback, updates)
        if rule == AggregationRule.KRUM:
            chosen = robust.krum_selection(updates, s.krum_byzantine, s.krum_select)
            log(INFO, "%s round %s: Krum (f=%s) kept site(s) %s of %s updates", self.phase.value, server_round,
                s.krum_byzantine, [sites[i] for i in chosen], n)
            return robust.mean([updates[i] for i in chosen])
        if (rule == AggregationRule.MEDIAN and n < 3) or (
                rule == AggregationRule.TRIMMED_MEAN and robust.trim_count(n, s.trim_fraction) == 0):
            log(WARNING, "%s round %s: %s over only %s update(s) is the plain (unweighted) mean", self.phase.value,
                server_round, rule.value, n)
        return robust.aggregate(rule, updates, trim_fraction=s.trim_fraction)


@dataclass
class Triage:
    """One round's replies sorted out: the valid updates (in site order), refusals, errors and the reports."""

    valid: list[Message] = field(default_factory=list)
    reports: list[SiteReport] = field(default_factory=list)  # in reply order
    report_of: dict[int, int] = field(default_factory=dict)  # id of a valid reply -> its report's index
    errors: list[str] = field(default_factory=list)
    refusals: list[int] = field(default_factory=list)
    refusal_epsilons: list[float] = field(default_factory=list)

    def reject(self, msg: Message, reason: str) -> None:
        """Turn a valid reply's report into a rejection (the screen's verdict)."""
        at = self.report_of[id(msg)]
        report = self.reports[at]
        self.errors.append(f"node {report.node_id}: {reason}")
        self.reports[at] = SiteReport(report.phase, report.server_round, "train", report.site_id, report.node_id,
                                      report.metrics, False, reason)
        self.valid.remove(msg)


@dataclass(frozen=True)
class Pipeline:
    """The parts of a shared-weights strategy (see the module docstring)."""

    phase: Phase
    shared_keys: list[str]
    observer: Observer | None = None
    checks: tuple[ReplyCheck, ...] = ()
    screen: NormScreen | None = None
    rule: RobustRule | None = None
    central: CentralDPAggregation | None = None
    min_updates: int = 1  # valid updates (or refusals) a round needs, fewer fail it; 0: central DP's Poisson rounds
    min_updates_note: str = ""  # how min_updates follows from min-sites, for the error message
    server_step: ServerMomentum | None = None  # FedAvgM on the aggregate; None: the aggregate as it is


class SharedWeightsMixin:
    """The shared-weights pipeline on top of a Flower FedAvg (or FedProx); see the module docstring."""

    def __init__(self, *, pipeline: Pipeline, **flower_kwargs: object) -> None:
        super().__init__(**flower_kwargs)  # FedAvg's (or FedProx's) own settings
        p = pipeline
        self.phase, self.shared_keys, self.observer = p.phase, list(p.shared_keys), p.observer
        self.checks, self.screen, self.rule, self.central = p.checks, p.screen, p.rule, p.central
        self.min_updates, self.min_updates_note = p.min_updates, p.min_updates_note
        self.server_step = p.server_step
        self._sent: ArrayRecord | None = None
        self.thresholds: dict[int, Threshold] = {}  # round -> threshold calibrated on the sites' pooled val histograms
        self.evaluated_sites: dict[int, list[int]] = {}  # round -> the sites whose federated evaluation arrived
        self.site_of_node: Callable[[int], int | None] = lambda node: None  # the deployment grid's registry

    # ---- configure -------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = arrays
        site_of = getattr(grid, "site_of", None)  # a deployment's registry names the site of a node that failed
        if callable(site_of):
            self.site_of_node = site_of
        if self.central is not None and self.central.train_config():
            config = ConfigRecord({**config, **self.central.train_config()})
        messages = super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]  # FedAvg/FedProx
        return messages if self.central is None else self.central.sample(server_round, messages)  # Poisson at q < 1

    # ---- aggregate -------------------------------------------------------------------------------------------
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._sent is None:
            raise FederationError("aggregate_train called before configure_train")
        triage = self.triage_replies(server_round, list(replies))
        if self.screen is not None:
            verdicts = self.screen([update_arrays(m) for m in triage.valid], self._sent)
            for msg, reason in [(triage.valid[i], reason) for i, reason in verdicts.items()]:
                log(WARNING, "Rejected update from node %s (site %s) in round %s: %s", msg.metadata.src_node_id,
                    triage.reports[triage.report_of[id(msg)]].site_id, server_round, reason)
                triage.reject(msg, reason)
        for report in triage.reports:
            self._report(report)
        self._require_enough(server_round, triage)
        if not triage.valid and self.min_updates:  # every replying site refused (errors failed the round above)
            log(WARNING, "%s round %s: every replying site refused (privacy budget or data; reasons above); the "
                "global model is kept", self.phase.value, server_round)
            return None, MetricRecord({"refused-sites": len(triage.refusals)})
        arrays, metrics = self._combine(server_round, triage.valid)
        if triage.refusals and metrics is not None:
            metrics["refused-sites"] = len(triage.refusals)
            if triage.refusal_epsilons:  # a site that refused has still spent what it spent
                metrics[MetricKey.EPSILON.value] = max([float(metric_scalar(metrics.get(MetricKey.EPSILON.value, 0.0))),
                                                        *triage.refusal_epsilons])
        merged = ArrayRecord()
        for key in self._sent.keys():  # keep the sent order; frozen weights carried over
            merged[key] = arrays[key] if key in arrays else self._sent[key]
        return self.take_step(merged), metrics

    def take_step(self, merged: ArrayRecord) -> ArrayRecord:
        """The round's new global weights: the server step (FedAvgM) on the merged aggregate, when there is one."""
        assert self._sent is not None
        return merged if self.server_step is None else self.server_step.step(self._sent, merged)

    def triage_replies(self, server_round: int, replies: list[Message]) -> Triage:
        """Record error replies and refusals; check every other reply (contract, the strategy's checks, one update
        per site). Valid replies come out in site order: replies arrive in any order, and working on them in
        site order makes the float result reproducible."""
        assert self._sent is not None
        t, seen_sites = Triage(), set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                reason, site = f"site error: {msg.error.reason}", self.site_of_node(node)
                t.errors.append(f"node {node}{'' if site is None else f' (site {site})'}: {reason}")
                t.reports.append(SiteReport(self.phase, server_round, "train", -1 if site is None else site, node, {},
                                            False, reason))
                continue
            metrics = scalar_metrics(msg.content)
            site_id = int(metrics.get(MetricKey.SITE_ID, -1))
            refused = refusal_reason(msg.content)
            if refused is not None:  # a site at its privacy budget: recorded, not averaged, not an error
                log(WARNING, "Site %s refused %s round %s: %s", site_id, self.phase.value, server_round, refused)
                t.reports.append(SiteReport(self.phase, server_round, "train", site_id, node, metrics, False,
                                            f"refused: {refused}"))
                t.refusals.append(site_id)
                if MetricKey.EPSILON in metrics:
                    t.refusal_epsilons.append(float(metrics[MetricKey.EPSILON]))
                continue
            reason = check_reply(msg.content, self._sent, self.shared_keys)
            for check in self.checks:
                reason = reason or check(update_arrays(msg), metrics, self._sent)
            if not reason and site_id in seen_sites:
                reason = f"a second update from site {site_id} in the same round"
            seen_sites.add(site_id)
            if reason:
                log(WARNING, "Rejected update from node %s (site %s) in round %s: %s", node, site_id, server_round,
                    reason)
                t.errors.append(f"node {node}: {reason}")
                t.reports.append(SiteReport(self.phase, server_round, "train", site_id, node, metrics, False, reason))
                continue
            sent_bytes = sum(a.numpy().nbytes for a in next(iter(msg.content.array_records.values())).values())
            t.report_of[id(msg)] = len(t.reports)
            t.reports.append(SiteReport(self.phase, server_round, "train", site_id, node, metrics, True,
                                        bytes_sent=sent_bytes))
            t.valid.append(msg)
        t.valid.sort(key=lambda m: scalar_metrics(m.content)[MetricKey.SITE_ID])
        return t

    def _require_enough(self, server_round: int, t: Triage) -> None:
        """Fail the round (resumable) with every reason when fewer than min_updates (0: none) answered or refused."""
        reasons = "; ".join(t.errors)
        if not t.valid and not t.refusals and self.min_updates:
            raise FederationError(f"{self.phase.value} round {server_round}: no valid site update to aggregate "
                                  f"({reasons or 'no replies'})")
        if len(t.valid) + len(t.refusals) < self.min_updates:  # a refusal answers the round: nothing to wait for
            refused = f" and {len(t.refusals)} refusal(s)" if t.refusals else ""
            raise FederationError(
                f"{self.phase.value} round {server_round}: {len(t.valid)} valid site update(s){refused}, fewer than "
                f"min-sites {self.min_updates}{self.min_updates_note} ({reasons or 'sites did not reply'}); "
                "resume the run when sites are back"
            )
        if not t.valid and t.errors and self.min_updates:
            raise FederationError(f"{self.phase.value} round {server_round}: no valid site update to aggregate "
                                  f"({reasons})")

    def _combine(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
        """The aggregate of the valid replies' shared arrays: central DP, a robust rule, or FedAvg's mean."""
        if self.central is None and self.rule is None:
            # FedAvg's (the Flower base after the mixin in the MRO)
            arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
            if arrays is None:
                raise FederationError(f"{self.phase.value} round {server_round}: aggregation produced no weights")
            return arrays, metrics
        assert self._sent is not None
        updates = [update_arrays(m) for m in valid]
        if self.central is not None:
            combined = self.central.combine(server_round, updates, self._sent)
        else:
            assert self.rule is not None
            sites = [int(scalar_metrics(m.content)[MetricKey.SITE_ID]) for m in valid]
            combined = self.rule(server_round, updates, sites)
        # train_metrics_aggr_fn, weighted_by_key: FedAvg's settings, set by the Flower base the mixin is combined with
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)  # type: ignore[attr-defined]
        return ArrayRecord({key: Array(value) for key, value in combined.items()}), metrics

    def _report(self, report: SiteReport) -> None:
        if self.observer is not None:
            self.observer(report)

    # ---- evaluate --------------------------------------------------------------------------------------------
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record every reply; calibrate the round's threshold on, and average, the validation replies only."""
        valid: list[Message] = []
        evaluated: list[int] = []  # the sites whose reply was accepted: on their val data or on their test share
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                site = self.site_of_node(node)
                self._report(SiteReport(self.phase, server_round, "evaluate", -1 if site is None else site, node, {},
                                        False, msg.error.reason or ""))
                continue
            metrics = scalar_metrics(msg.content)
            site_id = int(metrics.get(MetricKey.SITE_ID, -1))
            reason = check_evaluate_reply(msg.content)
            kind = EVALUATE_ON_TEST if not reason and evaluated_on_test(metrics) else "evaluate"
            if reason:
                log(WARNING, "Rejected evaluation from node %s in round %s: %s", node, server_round, reason)
            elif kind != EVALUATE_ON_TEST:
                valid.append(msg)
            evaluated += [] if reason else [site_id]
            self._report(SiteReport(self.phase, server_round, kind, site_id, node, metrics, not reason, reason))
        valid.sort(key=lambda m: scalar_metrics(m.content)[MetricKey.SITE_ID])
        self.evaluated_sites[server_round] = sorted(evaluated)
        if len(evaluated) > len(valid):
            log(INFO, "%s round %s: %s site(s) without val data evaluated on their test share (recorded apart)",
                self.phase.value, server_round, len(evaluated) - len(valid))
        threshold = pooled_threshold([dict(next(iter(m.content.metric_records.values()))) for m in valid])
        if threshold is not None:
            self.thresholds[server_round] = threshold
            log(INFO, "%s round %s: decision threshold %.4g (Youden's J %.3f on %s + %s pooled validation cases)",
                self.phase.value, server_round, threshold.probability, threshold.youden_j, threshold.positives,
                threshold.negatives)
        # FedAvg's (the Flower base after the mixin in the MRO)
        return super().aggregate_evaluate(server_round, valid) if valid else None  # type: ignore[misc]


class SharedWeightsFedAvg(SharedWeightsMixin, FedAvg):
    """FedAvg over the shared weights only, through the shared-weights pipeline."""


class SharedWeightsFedProx(SharedWeightsMixin, FedProx):
    """FedProx over the shared weights only (sites add the proximal term)."""


SharedWeightsStrategy = SharedWeightsFedAvg | SharedWeightsFedProx
"""What `make_strategy` returns: the shared-weights pipeline and a Flower strategy (for `medfed.server.rounds`)."""


def make_strategy(
    name: str,
    *,
    phase: Phase,
    shared_keys: list[str],
    num_sites: int,
    fraction_train: float,
    evaluate: bool,
    fraction_evaluate: float = 0.0,
    proximal_mu: float = 0.0,
    observer: Observer | None = None,
    private: bool = False,
    aggregation: RobustSettings | None = None,
    central: CentralDPAggregation | None = None,
    min_sites: int = 0,
    server_step: ServerMomentum | None = None,
) -> SharedWeightsStrategy:
    """The strategy for one phase, assembled from its parts.

    Args:
        name: fedavg or fedprox (with ``proximal_mu``).
        phase: pretrain or finetune (names rounds in logs, reports and the central ledger).
        shared_keys: the arrays sites send and the strategy aggregates; the others are carried over.
        num_sites, fraction_train: the federation and the fraction sampled per round.
        evaluate: federated evaluation on the sampled sites' validation data after each round.
        fraction_evaluate: the fraction of sites sampled for it (0: ``fraction_train``), at least one.
        observer: told of every site's reply (accepted or not, and why).
        private: a DP phase: every update must report its privacy cost.
        aggregation: the rule (default: FedAvg's example-weighted mean) and the norm-outlier screen.
        central: central DP (clip, unweighted mean, noise, ledger); replaces the rule; Poisson-samples at fraction < 1.
        min_sites: a round starts once this many sites are connected and fails (resumable) unless this many
            send a valid update or refuse (a refusal is recorded, not waited for). 0 means every site: all
            ``num_sites`` connected, and every site sampled for the round must answer.
        server_step: FedAvgM's server learning rate and momentum on each round's aggregate (None: FedAvg's).

    Returns:
        A Flower strategy whose ``aggregate_train`` runs the shared-weights pipeline.
    """
    settings = aggregation or RobustSettings()
    central = central.with_sampling(num_sites, fraction_train, shared_keys) if central is not None else None
    required = min_sites or num_sites  # sites that must be connected before a round starts
    min_nodes = max(1, min(required, int(num_sites * fraction_train)))
    fraction_evaluate = fraction_evaluate or fraction_train
    flower = dict(
        fraction_train=fraction_train if central is None or central.sampling is None else 1.0,  # Poisson: asks all
        fraction_evaluate=fraction_evaluate if evaluate else 0.0,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=max(1, min(required, int(num_sites * fraction_evaluate))) if evaluate else 1,
        min_available_nodes=required,
        weighted_by_key=MetricKey.NUM_EXAMPLES.value,
        train_metrics_aggr_fn=train_metrics,
        evaluate_metrics_aggr_fn=weighted_eval_metrics,
    )
    checks: list[ReplyCheck] = [dp_costs_reported] if private else []
    if central is not None:
        checks.append(central.check)
    pipeline = Pipeline(
        phase=phase, shared_keys=list(shared_keys), observer=observer, checks=tuple(checks),
        screen=NormScreen(settings.norm_outlier_factor) if settings.norm_outlier_factor else None,
        rule=None if AggregationRule(settings.rule) == AggregationRule.MEAN else RobustRule(settings, phase),
        central=central, min_updates=0 if central and central.sampling else min_sites if min_sites > 0 else min_nodes,
        min_updates_note="" if min_sites > 0 else " (min-sites 0: every site sampled)",
        server_step=None if server_step is None or server_step.is_fedavg else server_step,
    )
    strategy: SharedWeightsStrategy
    if StrategyName(name) == StrategyName.FEDPROX:
        strategy = SharedWeightsFedProx(pipeline=pipeline, proximal_mu=proximal_mu, **flower)
    else:
        strategy = SharedWeightsFedAvg(pipeline=pipeline, **flower)
    return strategy


__all__ = [
    "NormScreen", "Pipeline", "RobustRule", "SharedWeightsFedAvg", "SharedWeightsFedProx", "SharedWeightsMixin",
    "SharedWeightsStrategy", "SiteReport", "Triage", "check_evaluate_reply", "check_reply", "dp_costs_reported",
    "make_strategy",
]
