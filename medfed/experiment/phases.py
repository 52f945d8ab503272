"""The federated run on the server: a pretraining phase, then a fine-tuning phase.

Pretraining sends and aggregates only the encoder. Fine-tuning starts from the pretrained
encoder plus a fresh head; sites send back encoder and head (full fine-tuning) or only the
head (linear probe). After every fine-tuning round the global model is evaluated on the
official test split (server side) and on each site's validation data (federated evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from medfed.config import RunConfig
from medfed.constants import CentralDP, DPScope, MessageKey, Phase, SecureAggregation, SiteData, TaskType
from medfed.data.spec import DataSpec
from medfed.data.table_data import cache_root
from medfed.experiment.model_selection import SELECTED_SPLIT, resumed_selection, selector
from medfed.experiment.recorder import GLOBAL, Recorder
from medfed.experiment.resume import RoundCheckpoint, save_round_checkpoint
from medfed.files import save_safetensors_durably
from medfed.privacy.central import CentralLedger
from medfed.selfsup.federated import PREDICTOR_PREFIX, split_prefixed
from medfed.server.rounds import TrainRound, run_rounds
from medfed.strategies.central_dp import CentralDPAggregation
from medfed.strategies.replies import metric_scalar
from medfed.strategies.secagg import SecAggSettings, secagg_train_round
from medfed.strategies.server_momentum import ServerMomentum, load_velocity, split_momentum_state
from medfed.strategies.shared_weights import SharedWeightsStrategy, make_strategy
from medfed.task.calibration import THRESHOLD, Threshold
from medfed.task.evaluation import TestSet, evaluate_with_sites
from medfed.task.model_setup import finetune_shared_keys, initial_encoder_state, initial_pretrain_state, new_classifier

PRETRAINED_ENCODER = "pretrained_encoder.safetensors"
ROUND_SPLIT = "round"  # metrics.jsonl split name: the server's wall time of a round
TEST_SITE_SPLIT = "test-site"  # metrics.jsonl split name: a site's share of the official test split
CENTRAL_DP_SPLIT = "central-dp"  # metrics.jsonl split name: the server's central-DP release of a round
FINAL_MODEL = "final_model.safetensors"


@dataclass(frozen=True)
class ArmContext:
    """Everything one arm of an experiment needs besides the transport."""

    arm: str
    cfg: RunConfig
    run_dir: Path
    data_file: Path
    test: TestSet
    recorder: Recorder
    run_id: str = ""
    checkpoints: bool = False  # write RUN_DIR/checkpoint/ after every round (deployment)
    resume: RoundCheckpoint | None = None  # continue after this checkpoint's round

    @property
    def ledger_dir(self) -> Path:
        """Where the simulated sites of this arm keep their ledgers: ``ledger-dir`` (kept across
        runs) or the run directory's ``ledgers/``, one folder per arm (arms are separate worlds)."""
        root = (Path(self.cfg.privacy.ledger_dir).expanduser() if self.cfg.privacy.ledger_dir
                else self.run_dir / "ledgers")
        return root / self.arm

    @property
    def arm_dir(self) -> Path:
        return self.run_dir / "arms" / self.arm

    @property
    def input_spec(self) -> DataSpec:
        """The run's input (the centre's data: its test split's shape, task and classes), which every
        site's data must match (`medfed.data.spec.check_matches`)."""
        test = self.test
        return DataSpec(test.spec.channels, test.spec.spatial_shape, TaskType(test.task), int(test.num_classes),
                        Path(self.data_file).stem.lower())

    def message_config(self, phase: Phase) -> ConfigRecord:
        """What a train or evaluate message carries: the settings a site trains by, the phase, the run id and
        the run's input spec; in simulation also where the partition, the data file and the virtual sites'
        ledgers are, and the run's device setting (a deployed site has its own, and is not told the centre's paths
        nor its device)."""
        record: dict[str, Any] = {
            **self.cfg.site_settings(), MessageKey.PHASE.value: phase.value,
            MessageKey.RUN_ID.value: f"{self.run_id}/{self.arm}", **self.input_spec.to_flat(),
        }
        if self.cfg.dataset.site_data != SiteData.OWN:
            record |= {MessageKey.RUN_DIR.value: str(self.run_dir), MessageKey.DATA_FILE.value: str(self.data_file),
                       MessageKey.LEDGER_DIR.value: str(self.ledger_dir),
                       MessageKey.CACHE_DIR.value: str(cache_root(self.cfg.images)),
                       MessageKey.DEVICE.value: self.cfg.compute.device}
        return ConfigRecord(record)


def phase_strategy(ctx: ArmContext, grid: Grid, phase: Phase, shared_keys: list[str], *, evaluate: bool
                   ) -> tuple[SharedWeightsStrategy, TrainRound | None]:
    """The strategy of one phase, assembled from the run's settings, and its training exchange.

    Central DP (``central-dp``) is one of the strategy's parts, with one ledger row per release in the arm's
    ledger folder; ``secure-aggregation secagg+`` exchanges each round through Flower's SecAgg+ workflow."""
    cfg = ctx.cfg
    central = None
    if cfg.central.mode != CentralDP.NONE:
        def on_release(server_round: int, figures: dict[str, float]) -> None:
            ctx.recorder.record(ctx.arm, phase, server_round, GLOBAL, CENTRAL_DP_SPLIT, figures)

        ledger = CentralLedger(ctx.ledger_dir, f"{ctx.run_id}/{ctx.arm}", cfg.central)
        central = CentralDPAggregation(cfg.central, ledger, phase, on_release)
    strategy = make_strategy(
        cfg.federation.strategy, phase=phase, shared_keys=shared_keys, evaluate=evaluate,
        num_sites=cfg.dataset.num_sites, fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=cfg.federation.fraction_evaluate,
        proximal_mu=cfg.federation.proximal_mu, observer=ctx.recorder.site_observer(ctx.arm),
        private=DPScope(cfg.privacy.scope).covers(phase), aggregation=cfg.robust, central=central,
        min_sites=cfg.federation.min_sites,
        server_step=ServerMomentum(cfg.ssl.server_lr, cfg.ssl.server_momentum, shared_keys)
        if phase == Phase.PRETRAIN else None,
    )
    if cfg.secagg.mode != SecureAggregation.SECAGG_PLUS:
        return strategy, None
    secagg = SecAggSettings.from_config(cfg)

    def train_round(server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord | None:
        return secagg_train_round(strategy, grid, server_round, arrays, config, secagg)

    return strategy, train_round


def _threshold(note: dict[str, float]) -> Threshold | None:
    """The `Threshold` a `BestRound` note holds (None: that round had none)."""
    if not note:
        return None
    return Threshold(note["probability"], note["youden_j"], int(note["positives"]), int(note["negatives"]))


def run_federated(grid: Grid, ctx: ArmContext) -> dict[str, float]:
    """Run both phases over the grid; returns the final global test metrics.

    With ``ctx.checkpoints`` the global weights are checkpointed after every round; with
    ``ctx.resume`` the run continues after the checkpoint's round (same run id, same rounds).
    """
    cfg, spec, test = ctx.cfg, ctx.test.spec, ctx.test
    meta = {"arm": ctx.arm, "config": cfg.to_json()}
    resume = ctx.resume
    encoder_state = initial_encoder_state(cfg, spec)

    def timing(phase: Phase) -> Callable[[int, dict[str, float]], None]:
        def record(server_round: int, seconds: dict[str, float]) -> None:
            ctx.recorder.record(ctx.arm, phase, server_round, GLOBAL, ROUND_SPLIT, seconds)

        return record

    def checkpoint(phase: Phase, extra: Callable[[], dict[str, Any]] = dict
                   ) -> Callable[[int, ArrayRecord], None] | None:
        """The after-round checkpoint: the global weights and ``extra()``'s arrays (the server step's velocity,
        FedAvgM; the best-validation round's model)."""
        if not ctx.checkpoints:
            return None

        def save(server_round: int, arrays: ArrayRecord) -> None:
            save_round_checkpoint(ctx.run_dir, run_id=ctx.run_id, arm=ctx.arm, phase=phase,
                                  completed_round=server_round, settings=cfg.to_flat(),
                                  weights={**arrays.to_torch_state_dict(), **extra()})

        return save

    if cfg.ssl.methods and not cfg.model.encoder_init and (resume is None or resume.phase == Phase.PRETRAIN):
        first, pretrain_state = 1, initial_pretrain_state(cfg, spec, encoder_state)  # under fedu: + predictor
        velocity: dict[str, Any] = {}
        if resume is not None:
            (pretrain_state, velocity), first = split_momentum_state(resume.weights), resume.completed_round + 1
        strategy, exchange = phase_strategy(ctx, grid, Phase.PRETRAIN, list(pretrain_state), evaluate=False)
        load_velocity(strategy.server_step, velocity)  # the resumed rounds continue with the same velocity
        step = strategy.server_step
        arrays, _ = run_rounds(strategy, grid, ArrayRecord(pretrain_state), first_round=first,
                               last_round=cfg.ssl.rounds, train_config=ctx.message_config(Phase.PRETRAIN),
                               after_round=checkpoint(Phase.PRETRAIN, step.state if step else dict),
                               timeout=cfg.federation.round_timeout,
                               on_round_timing=timing(Phase.PRETRAIN), train_round=exchange)
        encoder_state, _ = split_prefixed(arrays.to_torch_state_dict(), PREDICTOR_PREFIX)
        save_safetensors_durably(ctx.arm_dir / PRETRAINED_ENCODER, encoder_state, meta)

    keeper = selector(cfg.finetune.select)  # finetune-select best-validation: the best round's model, kept
    if resume is not None and resume.phase == Phase.FINETUNE:
        (state, keeper), first = resumed_selection(resume.weights, cfg.finetune.select), resume.completed_round + 1
    else:
        state, first = new_classifier(cfg, spec, test.task, test.num_classes, encoder_state).state_dict(), 1
        if (save := checkpoint(Phase.FINETUNE)) is not None:  # round 0: the starting model, so a resume repeats it
            save(0, ArrayRecord(state))
    strategy, exchange = phase_strategy(ctx, grid, Phase.FINETUNE, finetune_shared_keys(cfg, list(state)),
                                        evaluate=True)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """The global model on the test split, and on the test share of each site whose federated evaluation
        answered this round: every site when all are sampled (fraction-evaluate 1), else only those sampled (so a
        round costs what its sampled sites cost, whatever the federation's size); round 0 (the starting model,
        before any federated evaluation) has per-site rows only when every site is sampled."""
        # the round's federated evaluation came first: its pooled validation histograms set the threshold
        every = cfg.sites_per_evaluation >= cfg.dataset.num_sites
        sites = None if every else strategy.evaluated_sites.get(server_round, [])
        metrics, per_site = evaluate_with_sites(cfg, test, arrays.to_torch_state_dict(),
                                                strategy.thresholds.get(server_round), sites=sites)
        ctx.recorder.record(ctx.arm, Phase.FINETUNE, server_round, GLOBAL, "test", metrics)
        for site, site_metrics in per_site.items():  # the global model on each site's share of the test split
            ctx.recorder.record(ctx.arm, Phase.FINETUNE, server_round, site, TEST_SITE_SPLIT, site_metrics)
        return MetricRecord(dict(metrics))

    def offer(server_round: int, arrays: ArrayRecord, validation: MetricRecord | None) -> None:
        if keeper is not None:
            threshold = strategy.thresholds.get(server_round)
            keeper.offer(server_round, arrays.to_torch_state_dict(),
                         {k: metric_scalar(v) for k, v in (validation or {}).items()},
                         asdict(threshold) if threshold is not None else None)

    config = ctx.message_config(Phase.FINETUNE)
    last = cfg.finetune_recipe.rounds
    arrays, server_metrics = run_rounds(strategy, grid, ArrayRecord(state), first_round=first, last_round=last,
                                        train_config=config, evaluate_config=config, evaluate_fn=evaluate_fn,
                                        after_round=checkpoint(Phase.FINETUNE, keeper.state if keeper else dict),
                                        timeout=cfg.federation.round_timeout,
                                        evaluate_initial=resume is None or resume.phase != Phase.FINETUNE,
                                        on_round_timing=timing(Phase.FINETUNE), train_round=exchange,
                                        on_evaluated=offer)
    chosen, weights = last, dict(arrays.to_torch_state_dict())
    threshold = strategy.thresholds.get(last)
    if keeper is not None:
        chosen, weights = keeper.chosen(last, weights)
        if keeper.round is not None:  # the kept round's threshold travelled with it (through a resume too)
            threshold = _threshold(keeper.note)
        ctx.recorder.record(ctx.arm, Phase.FINETUNE, chosen, GLOBAL, SELECTED_SPLIT, keeper.figures(chosen))
    if threshold is not None:  # the operating point travels with the model it was calibrated for
        meta = {**meta, THRESHOLD: f"{threshold.probability:.17g}"}
    save_safetensors_durably(ctx.arm_dir / FINAL_MODEL, weights, meta)
    if chosen in server_metrics:
        return {k: float(metric_scalar(v)) for k, v in server_metrics[chosen].items()}
    if keeper is None:  # a resumed run whose last round was already done: evaluate (and record) it
        return {k: float(metric_scalar(v)) for k, v in evaluate_fn(last, arrays).items()}
    final, _ = evaluate_with_sites(cfg, test, weights, threshold, sites=[])  # its test row was recorded before
    return final
