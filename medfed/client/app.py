"""The ClientApp: translates Flower messages to and from `SiteAlgo`, nothing more.

Each train message carries the run settings (flat kebab-case), the phase and the global
weights. The reply carries only the shared weights (an ArrayRecord) and scalar metrics
(a MetricRecord); the site-local SSL state (heads, predictors, decoders, momentum targets)
is kept in ``context.state`` and never sent.

Where a site's data comes from is the only thing that differs between simulation and
deployment: a node config with ``data-path`` names the site's own file; otherwise
``partition-id`` picks the site's share of the partition written to the run directory.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM as CLIPPING_NORM_KEY

from medfed.client.algo import SiteAlgo
from medfed.client.redaction import redacted_errors_mod
from medfed.client.replay import RELEASES_DIR, Release, ReleaseCache, release_key
from medfed.config import RunConfig
from medfed.constants import (
    SECAGG_REFUSAL_METRIC,
    SECAGG_SENT_KEYS,
    SECAGG_SHARED_KEYS,
    CentralDP,
    DPScope,
    MetricKey,
    NodeConfigKey,
    Phase,
    RecordKey,
)
from medfed.data.medmnist import MedMNISTData, load_medmnist
from medfed.data.site import SiteData, site_from_own_file, site_from_split
from medfed.data.spec import INPUT_KEYS, DataSpec, check_matches
from medfed.exceptions import ConfigError, DataError, DataMismatch, LedgerError, PrivacyBudgetExceeded
from medfed.packing import packed_transport_mod
from medfed.privacy.central import clip_update
from medfed.privacy.guard import PrivacyGuard, SitePrivacy
from medfed.simulations.partition import SPLIT_FILE, SitePlan

# Keys the server adds to the run settings in every message.
PHASE_KEY, RUN_DIR_KEY, DATA_FILE_KEY, ROUND_KEY = "phase", "run-dir", "data-file", "server-round"
RUN_ID_KEY = "run-id"  # names the run in the sites' ledgers
LEDGER_DIR_KEY = "sim-ledger-dir"  # simulation only: where the virtual sites keep ledgers and keys
LEGACY_FITINS_CONFIG, LEGACY_FITINS_PARAMETERS = "fitins.config", "fitins.parameters"  # SecAgg+ (legacy layout)
EXTRA_KEYS = (PHASE_KEY, RUN_DIR_KEY, DATA_FILE_KEY, ROUND_KEY, RUN_ID_KEY, LEDGER_DIR_KEY, CLIPPING_NORM_KEY,
              *INPUT_KEYS)  # INPUT_KEYS: the run's input spec, which a site's own data must match
REFUSAL_REASON = "reason"

# outermost first: errors reach the server redacted (medfed.client.redaction); arrays are unpacked from what a
# deployment's ServerApp packed (medfed.packing)
app = ClientApp(mods=[redacted_errors_mod, packed_transport_mod])


def read_message_config(config: ConfigRecord) -> tuple[RunConfig, dict[str, object]]:
    """Split a message's ConfigRecord into the RunConfig and the per-message extras."""
    flat = {k: v for k, v in config.items() if k not in EXTRA_KEYS}
    extras = {k: config[k] for k in EXTRA_KEYS if k in config}
    return RunConfig.from_flat(flat), extras


@functools.lru_cache(maxsize=4)
def _read(path: str, size: int, mtime_ns: int) -> MedMNISTData:
    """Validated file contents, cached by file identity (a site reads its file every round)."""
    return load_medmnist(path, download=False)


def read_data(path: str) -> MedMNISTData:
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise DataError(f"data file {path!r} cannot be read at this site ({exc})") from exc
    return _read(path, stat.st_size, stat.st_mtime_ns)


def own_site_id(node_config: dict) -> int:
    """A deployed site's number in the federation (its node config's site-id)."""
    return int(node_config.get(NodeConfigKey.SITE_ID, node_config.get(NodeConfigKey.PARTITION_ID, 0)))


def site_label(node_config: dict) -> str:
    """How a site is named in its messages: its site-name (kit folder), else its number."""
    return str(node_config.get(NodeConfigKey.SITE_NAME, own_site_id(node_config)))


def load_site(node_config: dict, cfg: RunConfig, extras: dict[str, object]) -> SiteData:
    """This site's data: its own file (deployment) or its partition (simulation). Its own file must match the
    run's input spec the server sent (`medfed.data.spec`), else `DataMismatch` before anything trains."""
    if NodeConfigKey.DATA_PATH in node_config:
        site_id = own_site_id(node_config)
        run_spec = DataSpec.from_flat(extras)  # ConfigError when the server sent none
        data = read_data(str(node_config[NodeConfigKey.DATA_PATH]))
        check_matches(DataSpec.of(data), run_spec, site_label(node_config))
        return site_from_own_file(data, site_id, cfg.label_fraction, cfg.seed)
    if NodeConfigKey.PARTITION_ID not in node_config:
        raise DataError("node config names neither 'data-path' (own data) nor 'partition-id' (simulation)")
    site_id = int(node_config[NodeConfigKey.PARTITION_ID])
    plan = SitePlan.load(Path(str(extras[RUN_DIR_KEY])) / SPLIT_FILE)
    data = read_data(str(extras[DATA_FILE_KEY]))
    if data.sha256 != plan.data_sha256:
        raise DataError(f"{data.path}: contents differ from the file the split was made from (sha256 mismatch)")
    if not 0 <= site_id < len(plan.sites):
        raise DataError(f"partition-id {site_id} is outside the split's {len(plan.sites)} sites")
    partitions = node_config.get(NodeConfigKey.NUM_PARTITIONS)
    if partitions is not None and int(partitions) != len(plan.sites):
        raise DataError(f"this SuperNode is one of {partitions} partitions but the split has {len(plan.sites)} sites")
    return site_from_split(data, plan.sites[site_id])


def process_seconds() -> float:
    """Seconds since this process started or was forked (a deployed site's ClientApp process serves one message)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def release_cache(node_config: dict) -> ReleaseCache | None:
    """Where a deployed site keeps its last releases: beside its ledger, on its own disk (None in
    simulation, which has no server to resume)."""
    if NodeConfigKey.DATA_PATH not in node_config or NodeConfigKey.LEDGER_PATH not in node_config:
        return None
    return ReleaseCache(Path(str(node_config[NodeConfigKey.LEDGER_PATH])).expanduser().parent / RELEASES_DIR)


def privacy_guard(cfg: RunConfig, site: SiteData, node_config: dict, extras: dict[str, object]) -> PrivacyGuard:
    """The site's privacy guard, with or without DP (every release that leaves the site is recorded; without DP
    as uncovered exposure): its ledger and key from the node config (deployment), else under the simulation's
    ledger folder."""
    if NodeConfigKey.DATA_PATH in node_config and NodeConfigKey.LEDGER_PATH not in node_config:
        raise ConfigError("this site's node config must name its 'ledger-path' (on the site's own disk): every "
                          "release that leaves the site is recorded there, with or without DP")
    default_dir = None if NodeConfigKey.LEDGER_PATH in node_config else Path(
        str(extras.get(LEDGER_DIR_KEY) or Path(str(extras[RUN_DIR_KEY])) / "ledgers"))
    privacy = SitePrivacy.resolve(cfg, str(node_config.get(NodeConfigKey.SITE_NAME, site.site_id)), node_config, default_dir)
    return PrivacyGuard(privacy, str(extras.get(RUN_ID_KEY, "")))


@dataclass
class TrainOutcome:
    """What a site releases for a train message: its shared weights and metrics, or a refusal."""

    shared: dict[str, torch.Tensor] | None
    metrics: dict[str, float]
    refusal: str = ""


def _refusal(site: SiteData, guard: PrivacyGuard | None, exc: PrivacyBudgetExceeded) -> TrainOutcome:
    """A site's refusal: no arrays, its spending so far, and why (the server records it)."""
    metrics = {MetricKey.SITE_ID.value: site.site_id, MetricKey.REFUSED.value: 1.0}
    if guard is not None:
        try:
            spent = guard.spent()
        except LedgerError as err:  # the ledger went bad since the round was planned: the refusal still goes out
            log(WARNING, "Site %s: its spending cannot be reported: %s", site.site_id, err)
        else:
            p = guard.privacy
            metrics |= {MetricKey.EPSILON.value: spent, MetricKey.DELTA.value: p.delta,
                        MetricKey.EPSILON_BUDGET.value: p.epsilon}
    return TrainOutcome(None, metrics, str(exc))


def ledger_refusal(site: SiteData, exc: LedgerError) -> TrainOutcome:
    """A site whose privacy ledger cannot be used (it failed verification, or is behind what its key signed)
    releases nothing and refuses. The server gets the site and the kind of problem only; the full message, with
    the ledger's site-local path and the rows at fault, is logged here at the site."""
    log(WARNING, "Site %s refuses the round: %s", site.site_id, exc)
    reason = f"site {site.site_id}: its privacy ledger {exc.kind}; nothing is released (details in the site's log)"
    return TrainOutcome(None, {MetricKey.SITE_ID.value: site.site_id, MetricKey.REFUSED.value: 1.0}, reason)


def _data_refusal(node_config: dict, exc: DataMismatch) -> TrainOutcome:
    """A site whose own data do not fit the run's input refuses, before any training: no arrays, and the reason
    (shapes, channels, task and classes only: `check_matches` puts no path in it), logged here too."""
    log(WARNING, "Refusing the round: %s", exc)
    metrics = {MetricKey.SITE_ID.value: own_site_id(node_config), MetricKey.REFUSED.value: 1.0}
    return TrainOutcome(None, metrics, str(exc))


def _reply(msg: Message, arrays: ArrayRecord | None, metrics: dict[str, float]) -> Message:
    content = RecordDict({RecordKey.METRICS.value: MetricRecord(metrics)})
    if arrays is not None:
        content[RecordKey.ARRAYS.value] = arrays
    return Message(content=content, reply_to=msg)


def clip_for_central_dp(cfg: RunConfig, extras: dict[str, object], shared: dict[str, torch.Tensor],
                        incoming: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """central-dp client-clip: the site's update (shared weights minus those it was sent) clipped to the norm
    Flower's client-side DP wrapper sent (``clipping_norm``), which must be the run's central-dp-clipping-norm."""
    if cfg.central_dp != CentralDP.CLIENT_CLIP:
        return shared
    norm = float(extras.get(CLIPPING_NORM_KEY, cfg.central_dp_clipping_norm))  # type: ignore[arg-type]
    if norm != cfg.central_dp_clipping_norm:
        raise ConfigError(f"the server asks for clipping norm {norm:g} but the run's central-dp-clipping-norm is "
                          f"{cfg.central_dp_clipping_norm:g}")
    weights = {k: v.detach().cpu().numpy() for k, v in shared.items()}
    reference = {k: incoming[k].detach().cpu().numpy() for k in shared}
    clipped, _ = clip_update(weights, reference, norm)
    return {k: torch.from_numpy(v) for k, v in clipped.items()}


def train_site(config: ConfigRecord, incoming: dict[str, torch.Tensor], context: Context) -> TrainOutcome:
    """One training round at this site (Flower-free apart from ``context``'s node config and state): replay a
    release already made, or train, record the DP cost, clip for central DP, and return what leaves."""
    cfg, extras = read_message_config(config)
    phase, server_round = Phase(str(extras[PHASE_KEY])), int(extras[ROUND_KEY])
    node_config = dict(context.node_config)
    try:
        site = load_site(node_config, cfg, extras)
    except DataMismatch as exc:
        return _data_refusal(node_config, exc)
    try:
        required = DPScope(str(node_config.get(NodeConfigKey.DP_REQUIRE, DPScope.NONE.value)))
    except ValueError:
        raise ConfigError(f"node config dp-require must be one of {', '.join(s.value for s in DPScope)}") from None
    if required.covers(phase) and not DPScope(cfg.dp).covers(phase):
        return _refusal(site, None, PrivacyBudgetExceeded(
            f"site {site.site_id} requires DP for {phase.value} (node config dp-require {required.value}); the run has dp {cfg.dp}"))
    guard = privacy_guard(cfg, site, node_config, extras)
    algo = SiteAlgo(cfg, site, guard)
    cache = release_cache(node_config)
    run_id = str(extras.get(RUN_ID_KEY, ""))
    settings = cfg.run_settings()  # a resumed run asks the same question
    key = release_key(run_id, phase.value, server_round, settings, incoming) if cache else ""
    if cache is not None and (kept := cache.get(run_id, phase.value, key)) is not None:
        # the server asks again for a round this site already released (it was resumed): send that
        # same release; training again would spend privacy a second time for one round
        return TrainOutcome(kept.arrays, {**kept.metrics, MetricKey.REPLAYED.value: 1.0})
    try:
        if phase == Phase.PRETRAIN:
            local = context.state.array_records.get(RecordKey.SITE_LOCAL.value)
            local_state = local.to_torch_state_dict() if local is not None else None
            shared, new_local, stats = algo.pretrain_round(incoming, local_state, server_round)
            context.state[RecordKey.SITE_LOCAL.value] = ArrayRecord(new_local)
        else:
            shared, stats = algo.finetune_round(incoming, server_round)
    except PrivacyBudgetExceeded as exc:  # only the privacy guard refuses rounds
        return _refusal(site, guard, exc)
    except LedgerError as exc:  # verification failed, or the ledger is behind its anchor: refuse, name no path
        return ledger_refusal(site, exc)
    shared = clip_for_central_dp(cfg, extras, shared, incoming)
    metrics = {
        MetricKey.NUM_EXAMPLES.value: stats.num_examples,
        MetricKey.SITE_ID.value: site.site_id,
        MetricKey.LOSS.value: stats.loss,
        MetricKey.STEPS.value: stats.steps,
        MetricKey.SECONDS.value: stats.seconds,
        **stats.privacy,
    }
    if DPScope(cfg.dp).covers(phase):  # the training loss is a non-private statistic of the batches: kept at the site
        metrics.pop(MetricKey.LOSS.value)
    if NodeConfigKey.DATA_PATH in node_config:  # deployment: one ClientApp process per message, so its age is
        metrics[MetricKey.PROCESS_SECONDS.value] = process_seconds()  # pulling the message + reading data + training
    if cache is not None:
        cache.put(run_id, phase.value, key, Release(shared, metrics))
    return TrainOutcome(shared, metrics)


def secagg_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round (they carry its stage record); every
    other train message goes straight to the handler (the mod would reject it)."""
    if SECAGG_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _train_secagg(msg: Message, context: Context) -> Message:
    """The handler's side of a SecAgg+ round: Flower's legacy layout in (``fitins.*``, arrays unnamed), a
    ``fitres`` out whose parameters ``secaggplus_mod`` masks. Weight 1, or 0 for a refusal (zeros of the right
    shapes, so the secure sum still adds up; the reason travels in the clear metrics)."""
    config = msg.content.config_records[LEGACY_FITINS_CONFIG]
    sent_keys, shared_keys = str(config[SECAGG_SENT_KEYS]).split("\n"), str(config[SECAGG_SHARED_KEYS]).split("\n")
    values = list(msg.content.array_records[LEGACY_FITINS_PARAMETERS].values())
    if len(values) != len(sent_keys):
        raise DataError(f"SecAgg+ round: {len(values)} arrays arrived for {len(sent_keys)} names")
    incoming = {k: torch.from_numpy(np.array(v.numpy())) for k, v in zip(sent_keys, values, strict=True)}
    own = ConfigRecord({k: v for k, v in config.items() if k not in (SECAGG_SENT_KEYS, SECAGG_SHARED_KEYS)})
    outcome = train_site(own, incoming, context)
    metrics: dict[str, Any] = dict(outcome.metrics)
    if outcome.shared is None:
        arrays, weight = [np.zeros_like(incoming[k].numpy()) for k in shared_keys], 0
        metrics[SECAGG_REFUSAL_METRIC] = outcome.refusal
    else:
        if sorted(outcome.shared) != sorted(shared_keys):
            raise DataError("SecAgg+ round: this site's shared weights differ from the arrays the server sums")
        arrays, weight = [outcome.shared[k].detach().cpu().numpy() for k in shared_keys], 1
        limit = read_message_config(own)[0].secagg_clipping_range
        peak = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
        if peak > limit:
            raise DataError(f"SecAgg+ round: a shared weight of magnitude {peak:.4g} lies outside the quantisation range "
                            f"[-{limit:g}, {limit:g}] (secagg-clipping-range); raise it rather than have the sum clipped")
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, metrics)
    return Message(content=fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


@app.train(mods=[secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
    if LEGACY_FITINS_CONFIG in msg.content.config_records:  # a SecAgg+ round (Flower's legacy layout)
        return _train_secagg(msg, context)
    incoming = msg.content[RecordKey.ARRAYS.value].to_torch_state_dict()
    outcome = train_site(msg.content[RecordKey.CONFIG.value], incoming, context)
    if outcome.shared is None:
        content = RecordDict({RecordKey.METRICS.value: MetricRecord(outcome.metrics),
                              RecordKey.REFUSAL.value: ConfigRecord({REFUSAL_REASON: outcome.refusal})})
        return Message(content=content, reply_to=msg)
    return _reply(msg, ArrayRecord(outcome.shared), outcome.metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on this site's validation data. A site whose own data do not fit the run's input
    raises `DataMismatch` (an error reply naming only shapes and tasks), as its train reply refuses."""
    cfg, extras = read_message_config(msg.content[RecordKey.CONFIG.value])
    site = load_site(dict(context.node_config), cfg, extras)
    state = msg.content[RecordKey.ARRAYS.value].to_torch_state_dict()
    metrics = SiteAlgo(cfg, site).evaluate_val(state)
    metrics[MetricKey.NUM_EXAMPLES.value] = float(len(site.val_images))
    metrics[MetricKey.SITE_ID.value] = float(site.site_id)
    return _reply(msg, None, metrics)
