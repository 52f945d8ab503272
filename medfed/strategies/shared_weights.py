"""FedAvg / FedProx that aggregate only the weights sites are allowed to share.

Every train reply is checked against the contract before aggregation: exactly the
expected array keys (the encoder in pretraining; encoder + head, or only the head for a
linear probe, in fine-tuning), each with the shape and dtype the server sent, finite
values, and a MetricRecord of scalars with ``num-examples`` and ``site-id``. A reply that
breaks it is rejected with a logged reason and recorded, never averaged. Weights that
sites do not send (a frozen encoder under a linear probe) are carried over unchanged.

Optionally (``norm-outlier-factor``), an update that passes those checks but lies far beyond the
others (L2 distance from the global weights more than factor x the median of the others') is
rejected the same way.

Aggregation ``mean`` is Flower's: example-weighted FedAvg (McMahan et al., AISTATS 2017);
FedProx (Li et al., MLSys 2020) sends ``proximal-mu`` and the sites add the proximal term.
The robust rules (``trimmed-mean``, ``median``, ``krum``; `medfed.strategies.robust`) replace
that average with an UNWEIGHTED robust one over the same shared arrays; train metrics are
still aggregated by ``train_metrics_aggr_fn`` over the accepted replies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from medfed.config import RobustSettings
from medfed.constants import AggregationRule, CentralDP, MetricKey, Phase, RecordKey, StrategyName
from medfed.exceptions import FederationError
from medfed.privacy.central import CLIP_TOLERANCE, CentralDPSettings, CentralLedger, add_noise, clip_update, update_norm
from medfed.strategies import robust
from medfed.task.calibration import HISTOGRAM_KEYS, Threshold, histogram_problem, pooled_threshold


@dataclass(frozen=True)
class SiteReport:
    """What the strategy tells its observer about one site in one round."""

    phase: Phase
    server_round: int
    kind: str  # "train" or "evaluate"
    site_id: int
    node_id: int
    metrics: dict[str, float]
    accepted: bool
    reason: str = ""
    bytes_sent: int = 0


Observer = Callable[[SiteReport], None]
ReleaseObserver = Callable[[int, dict[str, float]], None]  # (round, central-DP figures of the release)


def check_reply(content: RecordDict, sent: ArrayRecord, expected_keys: list[str]) -> str:
    """Return why a train reply breaks the contract, or '' if it holds."""
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, found {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, found {len(content.metric_records)}"
    if content.config_records:
        return f"unexpected ConfigRecord(s) {sorted(content.config_records)} in a train reply"
    arrays = next(iter(content.array_records.values()))
    keys = list(arrays.keys())
    if set(keys) != set(expected_keys):
        extra = sorted(set(keys) - set(expected_keys))
        missing = sorted(set(expected_keys) - set(keys))
        return f"array keys differ from the shared weights: unexpected {extra[:5]}, missing {missing[:5]}"
    for key in keys:
        got, want = arrays[key], sent[key]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            return f"array {key!r} is {got.dtype}{tuple(got.shape)}, expected {want.dtype}{tuple(want.shape)}"
        values = got.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"array {key!r} holds NaN or infinite values"
    metrics = next(iter(content.metric_records.values()))
    for key in (MetricKey.NUM_EXAMPLES, MetricKey.SITE_ID):
        if key not in metrics:
            return f"metric {key.value!r} missing"
    for key, value in metrics.items():
        if isinstance(value, list):
            return f"metric {key!r} is a list; sites may only send scalar metrics"
    n = metrics[MetricKey.NUM_EXAMPLES]
    if not (np.isfinite(n) and float(n).is_integer() and n > 0):
        return f"num-examples must be a whole number > 0; got {n}"
    return ""


def check_evaluate_reply(content: RecordDict) -> str:
    """Return why an evaluate reply breaks the contract (it may hold scalar metrics only), or ''."""
    if content.array_records:
        return "an evaluate reply must not carry arrays"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, found {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    lists = sorted(k for k, v in metrics.items() if isinstance(v, list) and k not in HISTOGRAM_KEYS)
    if lists:
        return f"evaluate metrics must be scalars (apart from the score histograms); {lists[0]!r} is a list"
    if MetricKey.NUM_EXAMPLES not in metrics or MetricKey.SITE_ID not in metrics:
        return "evaluate metrics need num-examples and site-id"
    return histogram_problem(dict(metrics), float(metrics[MetricKey.NUM_EXAMPLES]))


def _scalar_metrics(content: RecordDict) -> dict[str, float]:
    """The scalar metrics of a reply (lists, which the contract forbids, are left out)."""
    if not content.metric_records:
        return {}
    record = next(iter(content.metric_records.values()))
    return {k: float(v) for k, v in record.items() if not isinstance(v, list)}


def _update_arrays(msg: Message) -> dict[str, np.ndarray]:
    """The arrays of a (checked) train reply as numpy, by key."""
    record = next(iter(msg.content.array_records.values()))
    return {key: array.numpy() for key, array in record.items()}


PRIVACY_MAX_KEYS = (MetricKey.EPSILON, MetricKey.DELTA)
DP_REPLY_KEYS = (MetricKey.EPSILON, MetricKey.DELTA, MetricKey.NOISE_MULTIPLIER, MetricKey.SAMPLE_RATE, MetricKey.DP_STEPS)
"""Privacy metrics aggregate as the MAX over sites: the federation is as private as its most
exposed site. (Flower's default, an example-weighted mean, would understate it.)"""


def sum_examples(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Train metrics across sites: example-weighted mean loss, total examples, and the max
    epsilon and delta over the sites that report them (site ids dropped)."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weighting_key]) for m in rows)
    loss = sum(float(m[MetricKey.LOSS]) * float(m[weighting_key]) for m in rows if MetricKey.LOSS in m)
    out = {MetricKey.LOSS.value: loss / total, "total-examples": total, "sites": len(records)}
    out.update(max_privacy_metrics(rows))
    return MetricRecord(out)


def max_privacy_metrics(rows: Iterable[dict[str, float] | MetricRecord]) -> dict[str, float]:
    """``epsilon`` and ``delta``: the max over the sites that report them (absent if none does)."""
    out: dict[str, float] = {}
    for key in PRIVACY_MAX_KEYS:
        values = [float(m[key]) for m in rows if key in m]  # type: ignore[operator]
        if values:
            out[key.value] = max(values)
    return out


def refusal_reason(content: RecordDict) -> str | None:
    """The reason a site refused the round (its privacy budget, or its data do not fit the run's input), or None
    for an ordinary reply."""
    record = content.config_records.get(RecordKey.REFUSAL.value)
    if record is None or content.array_records:
        return None
    return str(record.get("reason", "refused"))


def weighted_eval_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Evaluation metrics across sites, example-weighted, ignoring ids and NaNs (undefined AUC)."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    out: dict[str, float] = {}
    keys = {k for m in rows for k, v in m.items() if k not in (weighting_key, MetricKey.SITE_ID) and not isinstance(v, list)}
    for key in sorted(keys):
        pairs = [(float(m[key]), float(m[weighting_key])) for m in rows if key in m and np.isfinite(float(m[key]))]
        if pairs:
            out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    return MetricRecord(out)


class SharedWeightsMixin:
    """Adds the contract check, the norm-outlier screen, robust aggregation, per-site reporting and
    carried-over frozen weights to a FedAvg."""

    phase: Phase
    shared_keys: list[str]
    observer: Observer | None
    aggregation: RobustSettings
    _sent: ArrayRecord | None

    def _setup(self, phase: Phase, shared_keys: list[str], observer: Observer | None, private: bool = False,
               aggregation: RobustSettings | None = None) -> None:
        self.phase, self.shared_keys, self.observer = phase, list(shared_keys), observer
        self.private = private  # a DP phase: every update must say what it cost
        self.aggregation = aggregation or RobustSettings()
        self._sent = None
        self.thresholds: dict[int, Threshold] = {}  # round -> threshold calibrated on the sites' pooled val histograms
        self.min_updates = 1  # sites a round needs a valid update (or a refusal) from (min-sites); fewer fail the round
        self.min_updates_note = ""  # how min_updates follows from min-sites, for the error message
        self.central: CentralDPSettings | None = None
        self.central_ledger: CentralLedger | None = None
        self.on_central_release: ReleaseObserver | None = None
        self.site_of_node: Callable[[int], int | None] = lambda node: None  # the deployment grid's registry

    def enable_central_dp(self, settings: CentralDPSettings, ledger: CentralLedger,
                          on_release: ReleaseObserver | None = None) -> None:
        """Aggregate as DP-FedAvg (`medfed.privacy.central`): clipped updates (clipped here for server-clip,
        checked here for client-clip), unweighted mean, Gaussian noise, one ledger row per release."""
        self.central, self.central_ledger, self.on_central_release = settings, ledger, on_release

    def release_central(self, server_round: int, mean: dict[str, np.ndarray], num_updates: int) -> dict[str, np.ndarray]:
        """Noise the mean of ``num_updates`` clipped updates, record the release, report its figures."""
        assert self.central is not None and self.central_ledger is not None
        std = self.central.noise_std(num_updates)
        noisy = add_noise(mean, std)
        epsilon = self.central_ledger.record(self.phase.value, server_round)
        log(INFO, "%s round %s: central DP noise (std %.3g = z %.3g x C %.3g / %s sites); site-level epsilon %.4g at "
            "delta %.3g", self.phase.value, server_round, std, self.central.noise_multiplier, self.central.clipping_norm,
            num_updates, epsilon, self.central.delta)
        if self.on_central_release is not None:
            self.on_central_release(server_round, {
                MetricKey.CENTRAL_EPSILON.value: epsilon, MetricKey.DELTA.value: self.central.delta,
                MetricKey.NOISE_MULTIPLIER.value: self.central.noise_multiplier,
                MetricKey.CLIPPING_NORM.value: self.central.clipping_norm, MetricKey.NOISE_STD.value: std,
                "sites": float(num_updates),
            })
        return noisy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._sent = arrays
        site_of = getattr(grid, "site_of", None)  # a deployment's registry names the site of a node that failed
        if callable(site_of):
            self.site_of_node = site_of
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def _report(self, report: SiteReport) -> None:
        if self.observer is not None:
            self.observer(report)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._sent is None:
            raise FederationError("aggregate_train called before configure_train")
        replies = list(replies)
        valid: list[Message] = []
        reports: list[SiteReport] = []  # in reply order; sent once the norm screen has had its say
        report_of: dict[int, int] = {}  # id of an accepted reply -> its report in `reports`
        errors: list[str] = []
        refusals: list[int] = []
        refusal_epsilons: list[float | None] = []
        seen_sites: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                reason = f"site error: {msg.error.reason}"
                site = self.site_of_node(node)
                errors.append(f"node {node}{'' if site is None else f' (site {site})'}: {reason}")
                reports.append(SiteReport(self.phase, server_round, "train", -1 if site is None else site, node, {},
                                          False, reason))
                continue
            metrics = _scalar_metrics(msg.content)
            site_id = int(metrics.get(MetricKey.SITE_ID, -1))
            refused = refusal_reason(msg.content)
            if refused is not None:  # a site at its privacy budget: recorded, not averaged, not an error
                log(WARNING, "Site %s refused %s round %s: %s", site_id, self.phase.value, server_round, refused)
                reports.append(
                    SiteReport(self.phase, server_round, "train", site_id, node, metrics, False, f"refused: {refused}")
                )
                refusals.append(site_id)
                refusal_epsilons.append(metrics.get(MetricKey.EPSILON))
                continue
            reason = check_reply(msg.content, self._sent, self.shared_keys)
            if not reason and self.private:
                missing = [k.value for k in DP_REPLY_KEYS if k not in metrics]
                if missing:
                    reason = f"a DP round's update must report {', '.join(missing)}"
            if not reason and self.central is not None and self.central.mode == CentralDP.CLIENT_CLIP:
                norm = update_norm(_update_arrays(msg), {k: self._sent[k].numpy() for k in self.shared_keys})
                if norm > self.central.clipping_norm * (1 + CLIP_TOLERANCE):
                    reason = (f"update norm {norm:.4g} is above the central-dp clipping norm "
                              f"{self.central.clipping_norm:g}: the site did not clip (client-clip)")
            if not reason and site_id in seen_sites:
                reason = f"a second update from site {site_id} in the same round"
            seen_sites.add(site_id)
            if reason:
                log(WARNING, "Rejected update from node %s (site %s) in round %s: %s", node, site_id, server_round, reason)
                errors.append(f"node {node}: {reason}")
                reports.append(SiteReport(self.phase, server_round, "train", site_id, node, metrics, False, reason))
                continue
            sent_bytes = sum(a.numpy().nbytes for a in next(iter(msg.content.array_records.values())).values())
            report_of[id(msg)] = len(reports)
            reports.append(
                SiteReport(self.phase, server_round, "train", site_id, node, metrics, True, bytes_sent=sent_bytes)
            )
            valid.append(msg)
        # Replies arrive in any order; working on them in site order makes the float result reproducible.
        valid.sort(key=lambda m: _scalar_metrics(m.content)[MetricKey.SITE_ID])
        for i, reason in self._screen_norms(valid).items():
            msg, at = valid[i], report_of[id(valid[i])]
            node, site_id = msg.metadata.src_node_id, reports[at].site_id
            log(WARNING, "Rejected update from node %s (site %s) in round %s: %s", node, site_id, server_round, reason)
            errors.append(f"node {node}: {reason}")
            reports[at] = SiteReport(self.phase, server_round, "train", site_id, node, reports[at].metrics, False,
                                     reason)
        valid = [m for m in valid if reports[report_of[id(m)]].accepted]
        for report in reports:
            self._report(report)
        if not valid and not refusals:
            raise FederationError(
                f"{self.phase.value} round {server_round}: no valid site update to aggregate ({'; '.join(errors) or 'no replies'})"
            )
        if len(valid) + len(refusals) < self.min_updates:  # a refusal answers the round: it has nothing to wait for
            refused = f" and {len(refusals)} refusal(s)" if refusals else ""
            raise FederationError(
                f"{self.phase.value} round {server_round}: {len(valid)} valid site update(s){refused}, fewer than "
                f"min-sites {self.min_updates}{self.min_updates_note} ({'; '.join(errors) or 'sites did not reply'}); "
                "resume the run when sites are back"
            )
        if not valid and not errors:
            log(WARNING, "%s round %s: every replying site refused (privacy budget or data; reasons above); the "
                "global model is kept", self.phase.value, server_round)
            return None, MetricRecord({"refused-sites": len(refusals)})
        if not valid:
            raise FederationError(
                f"{self.phase.value} round {server_round}: no valid site update to aggregate ({'; '.join(errors) or 'no replies'})"
            )
        if self.central is not None:
            arrays, metrics = self._central_aggregate(server_round, valid)
        elif AggregationRule(self.aggregation.rule) == AggregationRule.MEAN:
            arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        else:
            arrays, metrics = self._robust_aggregate(server_round, valid)
        if arrays is None:
            raise FederationError(f"{self.phase.value} round {server_round}: aggregation produced no weights")
        if refusals and metrics is not None:
            metrics["refused-sites"] = len(refusals)
            refused_eps = [float(v) for v in refusal_epsilons if v is not None]
            if refused_eps:  # a site that refused has still spent what it spent
                metrics[MetricKey.EPSILON.value] = max([float(metrics.get(MetricKey.EPSILON.value, 0.0)), *refused_eps])
        merged = ArrayRecord()
        for key in self._sent.keys():  # keep the sent order; frozen weights carried over
            merged[key] = arrays[key] if key in arrays else self._sent[key]
        return merged, metrics

    def _screen_norms(self, valid: list[Message]) -> dict[int, str]:
        """``{index in valid: reason}`` for the checked replies whose update lies far beyond the others'
        (``norm-outlier-factor``; distance from the global weights sent, over the shared weights)."""
        factor = self.aggregation.norm_outlier_factor
        if not factor or len(valid) < robust.MIN_UPDATES_TO_SCREEN:
            return {}
        assert self._sent is not None
        updates = [_update_arrays(m) for m in valid]
        reference = {key: self._sent[key].numpy() for key in updates[0]}
        return robust.norm_outliers(updates, reference, factor)

    def _central_aggregate(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
        """DP-FedAvg: clip each update (server-clip; client-clip updates were checked), unweighted mean, noise."""
        assert self._sent is not None and self.central is not None
        updates = [_update_arrays(m) for m in valid]
        if self.central.mode == CentralDP.SERVER_CLIP:
            reference = {key: self._sent[key].numpy() for key in updates[0]}
            updates = [clip_update(u, reference, self.central.clipping_norm)[0] for u in updates]
        noisy = self.release_central(server_round, robust.mean(updates), len(updates))
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)  # type: ignore[attr-defined]
        return ArrayRecord({key: Array(value) for key, value in noisy.items()}), metrics

    def _robust_aggregate(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
        """Trimmed mean, median or (Multi-)Krum over the valid replies' shared arrays: UNWEIGHTED (a faulty site
        could claim any example count); dtypes kept. Metrics as in the mean path (``train_metrics_aggr_fn``)."""
        settings, rule = self.aggregation, AggregationRule(self.aggregation.rule)
        updates = [_update_arrays(m) for m in valid]
        n = len(updates)
        problem = robust.krum_problem(n, settings.krum_byzantine, settings.krum_select) if rule == AggregationRule.KRUM else ""
        if problem:  # sites failed, refused or were rejected this round: too few left for Krum's guarantee
            fallback = AggregationRule.MEDIAN if n >= 3 else AggregationRule.MEAN
            log(WARNING, "%s round %s: %s accepted update(s) left, too few for Krum (%s); this round uses the "
                "coordinate-wise %s", self.phase.value, server_round, n, problem, fallback.value)
            aggregated = robust.aggregate(fallback, updates)
        elif rule == AggregationRule.KRUM:
            chosen = robust.krum_selection(updates, settings.krum_byzantine, settings.krum_select)
            sites = [int(_scalar_metrics(valid[i].content)[MetricKey.SITE_ID]) for i in chosen]
            log(INFO, "%s round %s: Krum (f=%s) kept site(s) %s of %s updates", self.phase.value, server_round,
                settings.krum_byzantine, sites, n)
            aggregated = robust.mean([updates[i] for i in chosen])
        else:
            if (rule == AggregationRule.MEDIAN and n < 3) or (
                    rule == AggregationRule.TRIMMED_MEAN and robust.trim_count(n, settings.trim_fraction) == 0):
                log(WARNING, "%s round %s: %s over only %s update(s) is the plain (unweighted) mean", self.phase.value,
                    server_round, rule.value, n)
            aggregated = robust.aggregate(rule, updates, trim_fraction=settings.trim_fraction)
        contents = [m.content for m in valid]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)  # type: ignore[attr-defined]
        return ArrayRecord({key: Array(value) for key, value in aggregated.items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                site = self.site_of_node(node)
                self._report(SiteReport(self.phase, server_round, "evaluate", -1 if site is None else site, node, {},
                                        False, msg.error.reason))
                continue
            metrics = _scalar_metrics(msg.content)
            site_id = int(metrics.get(MetricKey.SITE_ID, -1))
            reason = check_evaluate_reply(msg.content)
            if reason:
                log(WARNING, "Rejected evaluation from node %s in round %s: %s", node, server_round, reason)
            else:
                valid.append(msg)
            self._report(SiteReport(self.phase, server_round, "evaluate", site_id, node, metrics, not reason, reason))
        valid.sort(key=lambda m: _scalar_metrics(m.content)[MetricKey.SITE_ID])
        threshold = pooled_threshold([dict(next(iter(m.content.metric_records.values()))) for m in valid])
        if threshold is not None:
            self.thresholds[server_round] = threshold
            log(INFO, "%s round %s: decision threshold %.4g (Youden's J %.3f on %s + %s pooled validation cases)",
                self.phase.value, server_round, threshold.probability, threshold.youden_j, threshold.positives,
                threshold.negatives)
        return super().aggregate_evaluate(server_round, valid) if valid else None  # type: ignore[misc]


class SharedWeightsFedAvg(SharedWeightsMixin, FedAvg):
    """FedAvg over the shared weights only, with the reply contract enforced."""

    def __init__(self, *, phase: Phase, shared_keys: list[str], observer: Observer | None = None, private: bool = False,
                 aggregation: RobustSettings | None = None, **fedavg_kwargs: object) -> None:
        FedAvg.__init__(self, **fedavg_kwargs)  # type: ignore[arg-type]
        self._setup(phase, shared_keys, observer, private, aggregation)


class SharedWeightsFedProx(SharedWeightsMixin, FedProx):
    """FedProx over the shared weights only (sites add the proximal term)."""

    def __init__(self, *, phase: Phase, shared_keys: list[str], observer: Observer | None = None, private: bool = False,
                 aggregation: RobustSettings | None = None, **fedprox_kwargs: object) -> None:
        FedProx.__init__(self, **fedprox_kwargs)  # type: ignore[arg-type]
        self._setup(phase, shared_keys, observer, private, aggregation)


def make_strategy(
    name: str,
    *,
    phase: Phase,
    shared_keys: list[str],
    num_sites: int,
    fraction_train: float,
    evaluate: bool,
    proximal_mu: float = 0.0,
    observer: Observer | None = None,
    private: bool = False,
    aggregation: RobustSettings | None = None,
    min_sites: int = 0,
) -> SharedWeightsMixin:
    """The strategy for one phase; ``evaluate`` turns federated evaluation on each site's val data on or off;
    ``aggregation`` picks the rule (default: the strategy's example-weighted mean) and the norm-outlier screen.

    ``min_sites``: a round starts once this many sites are connected and fails (resumable) unless this many send
    a valid update (a site refusing at its privacy budget, or for its data or ledger, answers too: it is recorded,
    not waited for). 0 means every site: all ``num_sites`` connected, and every site sampled for the round (all of
    them unless ``fraction_train`` < 1) must answer."""
    required = min_sites or num_sites  # sites that must be connected before a round starts
    min_nodes = max(1, min(required, int(num_sites * fraction_train)))
    common = dict(
        fraction_train=fraction_train,
        fraction_evaluate=1.0 if evaluate else 0.0,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=required if evaluate else 1,
        min_available_nodes=required,
        weighted_by_key=MetricKey.NUM_EXAMPLES.value,
        train_metrics_aggr_fn=sum_examples,
        evaluate_metrics_aggr_fn=weighted_eval_metrics,
    )
    strategy: SharedWeightsMixin
    if StrategyName(name) == StrategyName.FEDPROX:
        strategy = SharedWeightsFedProx(phase=phase, shared_keys=shared_keys, observer=observer, proximal_mu=proximal_mu,
                                    private=private, aggregation=aggregation, **common)
    else:
        strategy = SharedWeightsFedAvg(phase=phase, shared_keys=shared_keys, observer=observer, private=private,
                                       aggregation=aggregation, **common)
    strategy.min_updates = min_sites if min_sites > 0 else min_nodes
    strategy.min_updates_note = "" if min_sites > 0 else " (min-sites 0: every site sampled)"
    return strategy


__all__ = [
    "SharedWeightsFedAvg", "SharedWeightsFedProx", "SiteReport", "check_evaluate_reply",
    "check_reply", "make_strategy",
]
