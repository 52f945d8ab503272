"""The federated run on the server: a pretraining phase, then a fine-tuning phase.

Pretraining sends and aggregates only the encoder. Fine-tuning starts from the pretrained
encoder plus a fresh head; sites send back encoder and head (full fine-tuning) or only the
head (linear probe). After every fine-tuning round the global model is evaluated on the
official test split (server side) and on each site's validation data (federated evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from medfed.client.algo import finetune_shared_keys, initial_encoder_state, new_classifier
from medfed.client.app import DATA_FILE_KEY, LEDGER_DIR_KEY, PHASE_KEY, RUN_DIR_KEY, RUN_ID_KEY
from medfed.config import RunConfig
from medfed.constants import DPScope, Phase
from medfed.server.checkpoints import save_checkpoint
from medfed.server.evaluation import TestSet, evaluate_with_sites
from medfed.server.recorder import GLOBAL, Recorder
from medfed.strategies.shared_weights import AggregationSettings, make_strategy

PRETRAINED_ENCODER = "pretrained_encoder.safetensors"
TEST_SITE_SPLIT = "test-site"  # metrics.jsonl split name: a site's share of the official test split
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

    @property
    def ledger_dir(self) -> Path:
        """Where the simulated sites of this arm keep their ledgers: ``ledger-dir`` (kept across
        runs) or the run directory's ``ledgers/``, one folder per arm (arms are separate worlds)."""
        root = Path(self.cfg.ledger_dir).expanduser() if self.cfg.ledger_dir else self.run_dir / "ledgers"
        return root / self.arm

    @property
    def arm_dir(self) -> Path:
        return self.run_dir / "arms" / self.arm

    def message_config(self, phase: Phase) -> ConfigRecord:
        return ConfigRecord(
            {
                **self.cfg.to_flat(), PHASE_KEY: phase.value, RUN_DIR_KEY: str(self.run_dir),
                DATA_FILE_KEY: str(self.data_file), RUN_ID_KEY: f"{self.run_id}/{self.arm}",
                LEDGER_DIR_KEY: str(self.ledger_dir),
            }
        )


def run_federated(grid: Grid, ctx: ArmContext) -> dict[str, float]:
    """Run both phases over the grid; returns the final global test metrics."""
    cfg, spec, test = ctx.cfg, ctx.test.spec, ctx.test
    meta = {"arm": ctx.arm, "config": cfg.to_json()}
    encoder_state = initial_encoder_state(cfg, spec)
    if cfg.ssl_methods and not cfg.encoder_init:
        strategy = make_strategy(
            cfg.strategy, phase=Phase.PRETRAIN, shared_keys=list(encoder_state), num_sites=cfg.num_sites,
            fraction_train=cfg.fraction_train, evaluate=False, proximal_mu=cfg.proximal_mu,
            observer=ctx.recorder.site_observer(ctx.arm), private=DPScope(cfg.dp).covers(Phase.PRETRAIN),
            aggregation=AggregationSettings.from_config(cfg),
        )
        result = strategy.start(
            grid, ArrayRecord(encoder_state), num_rounds=cfg.pretrain_rounds,
            train_config=ctx.message_config(Phase.PRETRAIN),
        )
        encoder_state = result.arrays.to_torch_state_dict()
        save_checkpoint(ctx.arm_dir / PRETRAINED_ENCODER, encoder_state, meta)

    state = new_classifier(cfg, spec, test.task, test.num_classes, encoder_state).state_dict()
    strategy = make_strategy(
        cfg.strategy, phase=Phase.FINETUNE, shared_keys=finetune_shared_keys(cfg, list(state)),
        num_sites=cfg.num_sites, fraction_train=cfg.fraction_train, evaluate=True, proximal_mu=cfg.proximal_mu,
        observer=ctx.recorder.site_observer(ctx.arm), private=DPScope(cfg.dp).covers(Phase.FINETUNE),
        aggregation=AggregationSettings.from_config(cfg),
    )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics, per_site = evaluate_with_sites(cfg, test, arrays.to_torch_state_dict())
        ctx.recorder.record(ctx.arm, Phase.FINETUNE, server_round, GLOBAL, "test", metrics)
        for site, site_metrics in per_site.items():  # the global model on each site's share of the test split
            ctx.recorder.record(ctx.arm, Phase.FINETUNE, server_round, site, TEST_SITE_SPLIT, site_metrics)
        return MetricRecord(metrics)

    config = ctx.message_config(Phase.FINETUNE)
    result = strategy.start(
        grid, ArrayRecord(state), num_rounds=cfg.finetune_recipe.rounds, train_config=config,
        evaluate_config=config, evaluate_fn=evaluate_fn,
    )
    save_checkpoint(ctx.arm_dir / FINAL_MODEL, result.arrays.to_torch_state_dict(), meta)
    final = result.evaluate_metrics_serverapp[cfg.finetune_recipe.rounds]
    return {k: float(v) for k, v in final.items()}
