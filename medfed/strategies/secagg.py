"""One training round through Flower's SecAgg+ (Bell et al., CCS 2020, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead"): the server learns the sum of the sites' shared weights, not any one.

In Flower 1.41-1.42 SecAgg+ exists only in the legacy workflow API (``flwr.server.workflow.SecAggPlusWorkflow``,
driven by a ``LegacyContext`` holding a legacy ``flwr.server.strategy.Strategy``); the Message-API
strategies (``flwr.serverapp.strategy``) have no SecAgg+. `secagg_train_round` therefore runs one round
of that workflow inside medfed's own round loop (`medfed.server.rounds`), with a small legacy strategy
(`_Bridge`) that only hands the workflow the messages medfed's strategy configured and takes back the
unmasked sum. Everything else stays medfed's: sampling, checkpoints, evaluation, the site reports, the
ledgers, central DP.

The four SecAgg+ stages are four train messages per site per round (setup, share keys, collect masked
vectors, unmask; the site's training runs in the third). On the site, Flower's ``secaggplus_mod``
masks the reply (`medfed.client_app`). Each site's weight in the sum is 1 (0 for a site that refuses
the round at its privacy budget, whose refusal and metrics still arrive in the clear): the result is the
UNWEIGHTED mean of the sites' shared weights, which is what central DP needs, and a site's example count
cannot push the weighted values out of SecAgg+'s quantisation range. Values are quantised to
2**22 levels over ``[-secagg-clipping-range, +secagg-clipping-range]`` (step about 4e-6 at the
default range 8); a site whose shared weights lie outside that range fails its reply
rather than being clipped silently.

What the server cannot do under SecAgg+ (the config refuses these): check each update against the reply
contract, screen norms, aggregate robustly, or clip for central DP (client-clip works). It still checks
the sum (shapes, finite values), every site's plaintext metrics (DP cost, site id) and min-sites.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.app.typing import MetricRecordValues
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from medfed.config import RunConfig
from medfed.constants import SECAGG_REFUSAL_METRIC, SECAGG_SENT_KEYS, SECAGG_SHARED_KEYS, MetricKey, RecordKey
from medfed.exceptions import FederationError
from medfed.strategies.replies import SiteReport, max_privacy_metrics
from medfed.strategies.shared_weights import SharedWeightsMixin

QUANTIZATION_RANGE = 2**22  # Flower's default: levels over [-clipping range, +clipping range]
MODULUS_RANGE = 2**32  # Flower's default; the sum of up to 2**10 sites cannot wrap around


@dataclass(frozen=True)
class SecAggSettings:
    """Flower's SecAgg+ parameters (fractions of the sites sampled in a round)."""

    num_shares: float
    threshold: float
    clipping_range: float
    timeout: float | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> SecAggSettings:
        """The run's SecAgg+ part, with the round timeout the workflow waits for each stage."""
        return cls(cfg.secagg.num_shares, cfg.secagg.threshold, cfg.secagg.clipping_range, cfg.federation.round_timeout)

    def workflow(self) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(num_shares=float(self.num_shares), reconstruction_threshold=float(self.threshold),
                                  max_weight=1.0, clipping_range=float(self.clipping_range),
                                  quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE,
                                  timeout=self.timeout)


class _Bridge(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow calls: configure_fit returns the sites medfed's strategy
    sampled, with the round's settings; aggregate_fit keeps what the workflow unmasked."""

    def __init__(self, node_ids: Sequence[int], fitins: FitIns) -> None:
        self.node_ids, self.fitins = list(node_ids), fitins
        self.results: list[tuple[ClientProxy, FitRes]] | None = None
        self.failures: list[Any] = []
        self.aggregate: Parameters | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        proxies = {int(p.node_id): p for p in client_manager.all().values()}
        return [(proxies[n], self.fitins) for n in self.node_ids if n in proxies]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        self.results, self.failures = list(results), list(failures)
        self.aggregate = results[0][1].parameters if results else None  # every result carries the unmasked sum
        return self.aggregate, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any],
                           failures: list[Any]) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


def secagg_train_round(strategy: SharedWeightsMixin, grid: Grid, server_round: int, arrays: ArrayRecord,
                       config: ConfigRecord, settings: SecAggSettings) -> ArrayRecord | None:
    """Run round ``server_round`` under SecAgg+; returns the new global arrays (None: every site refused, keep
    the old ones). The strategy's ``configure_train`` samples the sites and writes the round's settings (with
    central DP client-clip, the clipping norm).

    Raises:
        FederationError: the protocol halted (too few sites left to unmask) or the sum is unusable, naming why.
    """
    phase = strategy.phase
    messages = list(strategy.configure_train(server_round, arrays, config, grid))  # sets _sent
    node_ids = [m.metadata.dst_node_id for m in messages]
    shared = [key for key in arrays.keys() if key in set(strategy.shared_keys)]  # the order sites return them in
    if messages:  # as configured (RecordDict indexing is typed as any record; the strategy put a ConfigRecord there)
        config = cast(ConfigRecord, next(iter(messages)).content[RecordKey.CONFIG.value])
    fit_config = {**dict(config), SECAGG_SENT_KEYS: "\n".join(arrays.keys()), SECAGG_SHARED_KEYS: "\n".join(shared)}
    parameters = ndarrays_to_parameters([a.numpy() for a in arrays.values()])
    # FitIns wants Scalar values; a ConfigRecord's type also allows lists (the run's settings are scalars)
    bridge = _Bridge(node_ids, FitIns(parameters, fit_config))  # type: ignore[arg-type]

    manager = SimpleClientManager()
    for node in node_ids:
        manager.register(GridClientProxy(node_id=node, grid=grid, run_id=grid.run.run_id))
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round, WorkflowKey.START_TIME: time.time()})
    state.array_records[MAIN_PARAMS_RECORD] = arrays  # the workflow reads it by position
    legacy = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={}),
                           config=ServerConfig(num_rounds=server_round), strategy=bridge, client_manager=manager)
    log(INFO, "%s round %s: SecAgg+ over %s site(s)", phase.value, server_round, len(node_ids))
    with np.errstate(divide="ignore", invalid="ignore"):  # every site refusing makes the total weight 0
        settings.workflow()(grid, legacy)
    if bridge.results is None:
        raise FederationError(
            f"{phase.value} round {server_round}: SecAgg+ halted: too few sites completed its stages to unmask the sum "
            f"(threshold {settings.threshold:g} of the shares; {len(bridge.failures)} failure(s)); resume the run when "
            "sites are back")

    contributing, refused = [], []
    for proxy, res in bridge.results:
        metrics = dict(res.metrics)
        site_id = int(metrics.get(MetricKey.SITE_ID.value, -1))
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if res.num_examples == 0:
            reason = str(metrics.get(SECAGG_REFUSAL_METRIC, "refused"))
            log(WARNING, "Site %s refused %s round %s: %s", site_id, phase.value, server_round, reason)
            strategy._report(SiteReport(phase, server_round, "train", site_id, int(proxy.node_id), numeric, False,
                                        f"refused: {reason}"))
            refused.append(numeric)
            continue
        strategy._report(SiteReport(phase, server_round, "train", site_id, int(proxy.node_id), numeric, True))
        contributing.append(numeric)
    for failure in bridge.failures:
        strategy._report(SiteReport(phase, server_round, "train", -1, -1, {}, False, f"site error: {failure}"))
    if len(contributing) + len(refused) < strategy.min_updates:  # a refusal answers the round
        raise FederationError(f"{phase.value} round {server_round}: {len(contributing)} site update(s) in the secure "
                              f"sum and {len(refused)} refusal(s), fewer than min-sites {strategy.min_updates}"
                              f"{strategy.min_updates_note}; resume the run when sites are back")
    if not contributing:
        log(WARNING, "%s round %s: every replying site refused (privacy budget or data; reasons above); the global "
            "model is kept", phase.value, server_round)
        return None
    # not None: aggregate_fit kept the sum that every (non-empty) result carries, and some site contributed
    total = parameters_to_ndarrays(bridge.aggregate)  # type: ignore[arg-type]
    if len(total) != len(shared):
        raise FederationError(f"{phase.value} round {server_round}: the secure sum holds {len(total)} arrays, expected "
                              f"the {len(shared)} shared ones")
    mean: dict[str, np.ndarray] = {}
    for key, value in zip(shared, total, strict=True):
        want = arrays[key].numpy()
        if value.shape != want.shape or not np.isfinite(value).all():
            raise FederationError(f"{phase.value} round {server_round}: the secure sum's {key!r} is "
                                  f"{value.shape}{'' if np.isfinite(value).all() else ' with NaN/inf'}, "
                                  f"expected {want.shape}")
        mean[key] = value.astype(want.dtype)
    if strategy.central is not None:  # client-clip: the sites clipped; the server adds the noise to the mean
        mean = strategy.central.release(server_round, mean, len(contributing))
    merged = ArrayRecord()
    for key in arrays.keys():
        merged[key] = Array(mean[key]) if key in mean else arrays[key]
    merged = strategy.take_step(merged)  # FedAvgM's server step on the unmasked mean (configure_train set _sent)
    rows = [*contributing, *refused]
    summary: dict[str, MetricRecordValues] = {"sites": float(len(contributing)), "refused-sites": float(len(refused)),
                                              **max_privacy_metrics(rows)}
    log(INFO, "%s round %s: SecAgg+ sum of %s site(s) unmasked %s", phase.value, server_round, len(contributing),
        MetricRecord(summary))
    return merged
