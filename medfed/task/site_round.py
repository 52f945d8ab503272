"""One site's side of a round, free of Flower: read the message's settings, find the site's data, train or
refuse, and say what leaves the site.

`medfed.client_app` translates Flower messages to and from these functions and nothing more; tests call
them directly. What a round decides here:

* where the site's data come from: its own file (a deployment's node config ``data-path``, checked
  against the run's input spec) or its share of the simulation's partition (``partition-id``);
* refusals: data that do not fit the run, a site that requires DP the run does not give, a privacy
  budget that would be passed, a ledger that fails verification; a refusal releases nothing and says
  why without a site-local path;
* replay: a deployed site asked again for a round it already released (the server was resumed)
  sends that same release instead of spending privacy twice;
* central DP with client-side clipping: the update is clipped here, to the norm the run set;
* which metrics leave: under DP the training loss stays at the site.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medfed.config import DatasetSettings, ExperimentSettings, RunConfig
from medfed.constants import (
    PERSONAL_PREFIX,
    PERSONAL_TEST_PREFIX,
    CentralDP,
    DPScope,
    MessageKey,
    MetricKey,
    NodeConfigKey,
    Phase,
)
from medfed.data.cache import default_cache_dir
from medfed.data.dataset import Dataset
from medfed.data.partition import SPLIT_FILE, load_plan
from medfed.data.site import SiteData, site_from_own_file, site_from_split
from medfed.data.sources import load_dataset
from medfed.data.spec import INPUT_KEYS, DataSpec, check_matches
from medfed.devices import on_device, resolve_device
from medfed.exceptions import ConfigError, DataError, DataMismatch, LedgerError, PrivacyBudgetExceeded
from medfed.privacy.central import clip_update
from medfed.privacy.guard import PrivacyGuard, SitePrivacy
from medfed.selfsup.federated import rekeep
from medfed.task.algo import SiteAlgo, evaluate
from medfed.task.replay import RELEASES_DIR, Release, ReleaseCache, release_key
from medfed.task.site_state import StateStamp

StateDict = dict[str, torch.Tensor]
log = logging.getLogger(__name__)

MESSAGE_EXTRAS = (*(k.value for k in MessageKey), *INPUT_KEYS)
"""Keys of a message's settings that are not run settings: the server's per-message extras and the run's
input spec (`medfed.data.spec`), which a site's own data must match."""


def read_message_config(config: Mapping[str, Any]) -> tuple[RunConfig, dict[str, Any]]:
    """Split a message's settings (its ConfigRecord) into the RunConfig and the per-message extras.

    Only the settings a site trains by are taken from a message (`RunConfig.site_settings`); the centre's own
    (its output and cache folders, its aggregation...) keep their defaults here, whatever a message says: a
    server must not choose, say, where a hospital writes its prepared scans.
    """
    settings = RunConfig.settings()
    flat = {k: v for k, v in config.items()
            if k not in MESSAGE_EXTRAS and (k not in settings or settings[k][1].site)}
    extras = {k: config[k] for k in MESSAGE_EXTRAS if k in config}
    return RunConfig.from_flat(flat), extras


@functools.lru_cache(maxsize=4)
def _read(path: str, file_size: int, mtime_ns: int, cfg: RunConfig, num_classes: int | None, cache_dir: str,
          shape: tuple[int, ...] | None) -> Dataset:
    """Validated data, cached by the file's identity and the settings that read it (a site reads its data every
    round; a table's cases come from the cache after the first read)."""
    return load_dataset(cfg, path, download=False, num_classes=num_classes,
                        cache_dir=Path(cache_dir) if cache_dir else None, size=shape, progress=False)


def read_data(path: str, cfg: RunConfig, *, num_classes: int | None = None, cache_dir: str = "",
              shape: tuple[int, ...] | None = None) -> Dataset:
    """A site's data: a MedMNIST-style file or a labels table, read with the run's image settings.

    Raises:
        DataError: the data cannot be read at this site (the message names no site-local path).
    """
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise DataError(f"this site's data cannot be read ({exc.strerror or type(exc).__name__})") from None
    return _read(path, stat.st_size, stat.st_mtime_ns, reading_settings(cfg), num_classes, cache_dir, shape)


def reading_settings(cfg: RunConfig) -> RunConfig:
    """Only the settings that decide how data are read (image settings, split fractions, seed): the key under
    which a site's data stay cached in its process from round to round and phase to phase."""
    d = cfg.dataset
    return RunConfig(dataset=dataclasses.replace(DatasetSettings(), val_fraction=d.val_fraction,
                                                 test_fraction=d.test_fraction),
                     images=cfg.images, experiment=dataclasses.replace(ExperimentSettings(), seed=cfg.experiment.seed))


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
        cache = node_config.get(NodeConfigKey.CACHE_DIR) or default_cache_dir()  # the site's own, never the server's
        data = read_data(str(node_config[NodeConfigKey.DATA_PATH]), cfg, num_classes=run_spec.num_classes,
                         cache_dir=str(cache), shape=run_spec.spatial_shape)
        check_matches(DataSpec.of(data), run_spec, site_label(node_config))
        return site_from_own_file(data, site_id, cfg.dataset.label_fraction, cfg.experiment.seed)
    if NodeConfigKey.PARTITION_ID not in node_config:
        raise DataError("node config names neither 'data-path' (own data) nor 'partition-id' (simulation)")
    site_id = int(node_config[NodeConfigKey.PARTITION_ID])
    plan = load_plan(Path(str(extras[MessageKey.RUN_DIR])) / SPLIT_FILE)
    num_classes = DataSpec.from_flat(extras).num_classes if INPUT_KEYS[0] in extras else None
    data = read_data(str(extras[MessageKey.DATA_FILE]), cfg, num_classes=num_classes,
                     cache_dir=str(extras.get(MessageKey.CACHE_DIR, "")))
    if data.sha256 != plan.data_sha256:
        raise DataError(f"{data.name}: contents differ from the data the split was made from (sha256 mismatch)")
    if not 0 <= site_id < len(plan.sites):
        raise DataError(f"partition-id {site_id} is outside the split's {len(plan.sites)} sites")
    partitions = node_config.get(NodeConfigKey.NUM_PARTITIONS)
    if partitions is not None and int(partitions) != len(plan.sites):
        raise DataError(f"this SuperNode is one of {partitions} partitions but the split has {len(plan.sites)} sites")
    return site_from_split(data, plan.sites[site_id])


def site_device(node_config: Mapping[str, Any], extras: Mapping[str, Any]) -> torch.device:
    """Where this site computes: a deployed site's own node config ``device`` (default auto), never the server's
    word; a simulated site the run's device setting (`MessageKey.DEVICE`; under Ray with GPUs per site, ``cuda`` is
    the GPU Ray gave this worker).

    Raises:
        ConfigError: a device this machine does not have (a GPU asked for without one).
    """
    if NodeConfigKey.DATA_PATH in node_config:
        try:
            return resolve_device(str(node_config.get(NodeConfigKey.DEVICE, "auto")), where="node config device")
        except ConfigError as exc:  # the details (library versions, GPU count) stay in the site's log
            log.warning("This site cannot compute where its node config says: %s", exc)
            raise ConfigError("this site's node config names a device this machine does not have (details in the "
                              "site's log)") from None
    return resolve_device(str(extras.get(MessageKey.DEVICE, "auto")))


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


def kept_state(stamp: StateStamp, held: StateDict | None, cache: ReleaseCache | None, run_id: str,
               phase: Phase) -> StateDict | None:
    """This run's kept state of ``phase``: what the node state holds (another run's is dropped, `StateStamp`),
    else, at a deployed site whose node state is empty or another run's (a resumed run, a restarted SuperNode),
    what its disk kept with its latest release of (run, phase)."""
    state = stamp.open(held)
    if state is None and cache is not None:
        state = stamp.open(cache.latest_kept(run_id, phase.value))
    return state


def privacy_guard(cfg: RunConfig, site: SiteData, node_config: dict, extras: dict[str, object]) -> PrivacyGuard:
    """The site's privacy guard, with or without DP (every release that leaves the site is recorded; without DP
    as uncovered exposure): its ledger and key from the node config (deployment), else under the simulation's
    ledger folder."""
    if NodeConfigKey.DATA_PATH in node_config and NodeConfigKey.LEDGER_PATH not in node_config:
        raise ConfigError("this site's node config must name its 'ledger-path' (on the site's own disk): every "
                          "release that leaves the site is recorded there, with or without DP")
    default_dir = None if NodeConfigKey.LEDGER_PATH in node_config else Path(
        str(extras.get(MessageKey.LEDGER_DIR) or Path(str(extras[MessageKey.RUN_DIR])) / "ledgers"))
    site_name = str(node_config.get(NodeConfigKey.SITE_NAME, site.site_id))
    privacy = SitePrivacy.resolve(cfg, site_name, node_config, default_dir)
    return PrivacyGuard(privacy, str(extras.get(MessageKey.RUN_ID, "")))


@dataclass
class TrainOutcome:
    """What a site releases for a train message: its shared weights and metrics, or a refusal."""

    shared: dict[str, torch.Tensor] | None
    metrics: dict[str, float]
    refusal: str = ""
    local_state: StateDict | None = None  # pretraining: the site-local SSL state to keep for the next round
    personal_state: StateDict | None = None  # fine-tuning under `personal`: the site's own copy of those parts


def _refusal(site: SiteData, guard: PrivacyGuard | None, exc: PrivacyBudgetExceeded) -> TrainOutcome:
    """A site's refusal: no arrays, its spending so far, and why (the server records it)."""
    metrics = {MetricKey.SITE_ID.value: site.site_id, MetricKey.REFUSED.value: 1.0}
    if guard is not None:
        try:
            spent = guard.spent()
        except LedgerError as err:  # the ledger went bad since the round was planned: the refusal still goes out
            log.warning("Site %s: its spending cannot be reported: %s", site.site_id, err)
        else:
            p = guard.privacy
            metrics |= {MetricKey.EPSILON.value: spent, MetricKey.DELTA.value: p.delta,
                        MetricKey.EPSILON_BUDGET.value: p.epsilon}
    return TrainOutcome(None, metrics, str(exc))


def ledger_refusal(site: SiteData, exc: LedgerError) -> TrainOutcome:
    """A site whose privacy ledger cannot be used (it failed verification, or is behind what its key signed)
    releases nothing and refuses. The server gets the site and the kind of problem only; the full message, with
    the ledger's site-local path and the rows at fault, is logged here at the site."""
    log.warning("Site %s refuses the round: %s", site.site_id, exc)
    reason = f"site {site.site_id}: its privacy ledger {exc.kind}; nothing is released (details in the site's log)"
    return TrainOutcome(None, {MetricKey.SITE_ID.value: site.site_id, MetricKey.REFUSED.value: 1.0}, reason)


def _data_refusal(node_config: dict, exc: DataMismatch) -> TrainOutcome:
    """A site whose own data do not fit the run's input refuses, before any training: no arrays, and the reason
    (shapes, channels, task and classes only: `check_matches` puts no path in it), logged here too."""
    log.warning("Refusing the round: %s", exc)
    metrics = {MetricKey.SITE_ID.value: own_site_id(node_config), MetricKey.REFUSED.value: 1.0}
    return TrainOutcome(None, metrics, str(exc))


def clip_for_central_dp(cfg: RunConfig, extras: dict[str, Any], shared: dict[str, torch.Tensor],
                        incoming: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """central-dp client-clip: the site's update (shared weights minus those it was sent) clipped to the norm
    Flower's client-side DP wrapper sent (``clipping_norm``), which must be the run's central-dp-clipping-norm."""
    if cfg.central.mode != CentralDP.CLIENT_CLIP:
        return shared
    norm = float(extras.get(MessageKey.CLIPPING_NORM, cfg.central.clipping_norm))
    if norm != cfg.central.clipping_norm:
        raise ConfigError(f"the server asks for clipping norm {norm:g} but the run's central-dp-clipping-norm is "
                          f"{cfg.central.clipping_norm:g}")
    weights = {k: v.detach().cpu().numpy() for k, v in shared.items()}
    reference = {k: incoming[k].detach().cpu().numpy() for k in shared}
    clipped, _ = clip_update(weights, reference, norm)
    return {k: torch.from_numpy(v) for k, v in clipped.items()}


def train_site(config: Mapping[str, Any], incoming: StateDict, node_config: Mapping[str, Any],
               local_state: StateDict | None = None, personal_state: StateDict | None = None) -> TrainOutcome:
    """One training round at this site: replay a release already made, or train, record the DP cost, clip for
    central DP, and return what leaves.

    Args:
        config: the message's settings (`read_message_config`: the run's site settings and the extras).
        incoming: the global weights the server sent (the shared ones, and any frozen ones).
        node_config: this SuperNode's node config (``data-path``, ``ledger-path``, ``dp-require`` in a
            deployment; ``partition-id`` in simulation).
        local_state: the site-local SSL state kept from the previous pretraining round (None at first).
        personal_state: the site's own copy of its personal parts from its last fine-tuning round (``personal``).

    Returns:
        The shared weights and scalar metrics, or a refusal (no weights) with its reason, and the new
        site-local state after a pretraining round (the new personal state after a fine-tuning round).

    Raises:
        ConfigError, DataError: settings or data this site cannot work with (the ClientApp's redaction mod
            sends the server only the kind of error and an incident number).
    """
    cfg, extras = read_message_config(config)
    phase, server_round = Phase(str(extras[MessageKey.PHASE])), int(extras[MessageKey.ROUND])
    node_config = dict(node_config)
    try:
        site = load_site(node_config, cfg, extras)
    except DataMismatch as exc:
        return _data_refusal(node_config, exc)
    try:
        required = DPScope(str(node_config.get(NodeConfigKey.DP_REQUIRE, DPScope.NONE.value)))
    except ValueError:
        raise ConfigError(f"node config dp-require must be one of {', '.join(s.value for s in DPScope)}") from None
    if required.covers(phase) and not DPScope(cfg.privacy.scope).covers(phase):
        return _refusal(site, None, PrivacyBudgetExceeded(
            f"site {site.site_id} requires DP for {phase.value} (node config dp-require {required.value}); "
            f"the run has dp {cfg.privacy.scope}"))
    cache = release_cache(node_config)
    run_id = str(extras.get(MessageKey.RUN_ID, ""))
    stamp = StateStamp.of(run_id, cfg.run_settings())
    local_state = kept_state(stamp, local_state, cache, run_id, Phase.PRETRAIN)
    personal_state = kept_state(stamp, personal_state, cache, run_id, Phase.FINETUNE)
    guard = privacy_guard(cfg, site, node_config, extras)
    device = site_device(node_config, extras)
    algo = SiteAlgo(cfg, site, guard, device)
    settings = cfg.run_settings()  # a resumed run asks the same question
    key = release_key(run_id, phase.value, server_round, settings, incoming) if cache else ""
    if cache is not None and (kept := cache.get(run_id, phase.value, key)) is not None:
        # the server asks again for a round this site already released (it was resumed): send that
        # same release; training again would spend privacy a second time for one round
        pretrain = phase == Phase.PRETRAIN
        return TrainOutcome(kept.arrays, {**kept.metrics, MetricKey.REPLAYED.value: 1.0},
                            local_state=kept.kept if pretrain and kept.kept else None,
                            personal_state=kept.kept if not pretrain and kept.kept else None)
    try:
        with on_device(device):  # the site's tensors are released when its work is done (the next site's turn)
            new_local = None
            if phase == Phase.PRETRAIN:
                shared, new_local, stats = algo.pretrain_round(incoming, local_state, server_round)
            else:
                shared, stats = algo.finetune_round(incoming, server_round, personal_state)
    except PrivacyBudgetExceeded as exc:  # only the privacy guard refuses rounds
        return _refusal(site, guard, exc)
    except LedgerError as exc:  # verification failed, or the ledger is behind its anchor: refuse, name no path
        return ledger_refusal(site, exc)
    shared = clip_for_central_dp(cfg, extras, shared, incoming)
    # what the site keeps as its own is what it released (after any clipping), never more
    new_local = rekeep(new_local, shared) if new_local is not None else None
    new_personal = {k: shared[k] for k in algo.personal_keys()} if phase == Phase.FINETUNE else {}
    metrics = {
        MetricKey.NUM_EXAMPLES.value: stats.num_examples,
        MetricKey.SITE_ID.value: site.site_id,
        MetricKey.LOSS.value: stats.loss,
        MetricKey.STEPS.value: stats.steps,
        MetricKey.SECONDS.value: stats.seconds,
        **stats.privacy,
        **stats.extra,
    }
    # the training loss is a non-private statistic of the batches: kept at the site
    if DPScope(cfg.privacy.scope).covers(phase):
        metrics.pop(MetricKey.LOSS.value)
    if NodeConfigKey.DATA_PATH in node_config:  # deployment: one ClientApp process per message, so its age is
        metrics[MetricKey.PROCESS_SECONDS.value] = process_seconds()  # pulling the message + reading data + training
    outcome = TrainOutcome(shared, metrics, local_state=stamp.seal(new_local),
                           personal_state=stamp.seal(new_personal or None))
    if cache is not None:  # the release and the state kept after it, in one file (atomic)
        cache.put(run_id, phase.value, key, Release(shared, metrics, outcome.local_state or outcome.personal_state
                                                    or {}))
    return outcome


def personalised_metrics(algo: SiteAlgo, state: StateDict, images: Any, labels: torch.Tensor,
                         site: SiteData) -> dict[str, float]:
    """A site's personalised model on its evaluation images and, where it has one (simulation), on its test share;
    threshold-free metrics (no histograms: the threshold is calibrated for the global model)."""
    model = algo.classifier(state)
    out = {PERSONAL_PREFIX + k: v for k, v in evaluate(model, images, labels).items()} if len(images) else {}
    if site.test_images is not None and site.test_labels is not None and len(site.test_images):
        out |= {PERSONAL_TEST_PREFIX + k: v for k, v in evaluate(model, site.test_images, site.test_labels).items()}
        out[PERSONAL_TEST_PREFIX + MetricKey.NUM_EXAMPLES.value] = float(len(site.test_images))
    return out


def evaluate_site(
    config: Mapping[str, Any], state: StateDict, node_config: Mapping[str, Any], personal: StateDict | None = None
) -> dict[str, float | list[int]]:
    """The global model ``state`` on this site's validation data, with the site's number and example count.

    A site that got no validation data (more sites than val images) is evaluated on its share of the test split
    instead (`SiteData.test_images`, possibly empty: then no metric but the count 0), says so
    (``evaluated-on-test`` 1) and sends no score histograms: the server records it apart and keeps it out of the
    threshold calibration and the validation averages (`medfed.strategies.shared_weights`).

    Under ``personal`` the site's personalised model (the global one with its own ``personal`` parts) is evaluated
    on the same images too (metrics prefixed `PERSONAL_PREFIX`) and, in simulation, on the site's share of the test
    split (prefixed `PERSONAL_TEST_PREFIX`; a deployed site has no test share).

    A site whose own data do not fit the run's input raises `DataMismatch` (an error reply naming only
    shapes and tasks), as its train reply refuses."""
    cfg, extras = read_message_config(config)
    run_id = str(extras.get(MessageKey.RUN_ID, ""))
    personal = kept_state(StateStamp.of(run_id, cfg.run_settings()), personal, release_cache(dict(node_config)),
                          run_id, Phase.FINETUNE)
    site = load_site(dict(node_config), cfg, extras)
    device = site_device(dict(node_config), extras)
    algo = SiteAlgo(cfg, site, device=device)
    images, labels, on_test = site.val_images, site.val_labels, False
    if not len(images) and site.test_images is not None and site.test_labels is not None:
        images, labels, on_test = site.test_images, site.test_labels, True
    metrics: dict[str, float | list[int]] = {}
    with on_device(device):
        if not on_test:
            metrics = algo.evaluate_val(state)
        elif len(images):
            metrics = dict(evaluate(algo.classifier(state), images, labels))
        if personal and algo.personal_keys():
            metrics |= personalised_metrics(algo, algo.personalised(state, personal), images, labels, site)
    metrics[MetricKey.NUM_EXAMPLES.value] = float(len(images))
    metrics[MetricKey.SITE_ID.value] = float(site.site_id)
    if on_test:
        metrics[MetricKey.EVALUATED_ON_TEST.value] = 1.0
    return metrics
