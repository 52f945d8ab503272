"""Settings parts for training at the sites: self-supervised pretraining, supervised fine-tuning (and its
recipes), and LoRA adapters. Each part checks its own values."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from medfed.config.base import Part, setting
from medfed.constants import NO_PRETRAIN, FinetuneLoss, FinetuneMode, FinetuneSelect, SSLAggregation, SSLMethodName
from medfed.exceptions import ConfigError

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class FinetuneRecipe:
    """How federated fine-tuning steps: AdamW learning rate, (Poisson) batch size, rounds."""

    lr: float
    batch_size: int
    rounds: int
    augment_multiplicity: int = 1  # under DP-SGD: views per example, gradients averaged before clipping
    lr_schedule: str = "constant"  # constant | cosine (over rounds; `lr_at_round`)

    def lr_at_round(self, server_round: int) -> float:
        """The learning rate of fine-tuning round ``server_round`` (1-based) of ``rounds``: constant, or cosine
        decay from ``lr`` in round 1 towards 0 after the last round (Loshchilov and Hutter, ICLR 2017, one cycle,
        stepped per round). Decaying shrinks the last rounds' noisy steps, so the final model sits nearer the
        optimum than DP noise at the full rate would let it (the released model is the last round's)."""
        if self.lr_schedule == "constant":
            return self.lr
        progress = min(max(server_round - 1, 0), self.rounds) / self.rounds
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


FINETUNE_RECIPE = FinetuneRecipe(lr=3e-4, batch_size=32, rounds=25)
"""Fine-tuning without DP (sized with `benchmarks/default_run.py`)."""

DP_FINETUNE_RECIPE: dict[str, FinetuneRecipe] = {
    FinetuneMode.FULL.value: FinetuneRecipe(lr=1e-2, batch_size=64, rounds=10),
    FinetuneMode.LORA.value: FinetuneRecipe(lr=3e-2, batch_size=64, rounds=20),
    FinetuneMode.LINEAR.value: FinetuneRecipe(lr=2e-1, batch_size=64, rounds=10, lr_schedule="cosine"),  # dp_linear
}
"""Fine-tuning under DP-SGD, per fine-tuning mode: chosen on the sites' validation data (never the test
split) by `benchmarks/dp_recipe.py` at epsilon 8 (PneumoniaMNIST, 5 sites, delta 1e-5); its table is in
docs/RESULTS.md (dp_recipe). Linear's learning rate and schedule were chosen by `benchmarks/dp_variants.py`
over 0.01-0.5, constant or cosine, on three seeds' federated SimCLR encoders (docs/RESULTS.md dp_linear): a head on
frozen pretrained features takes steps 20x full fine-tuning's under DP-SGD, and beats it there (validation 0.957
against 0.905, test 0.939 against 0.900: DP learning wants good features more than end-to-end training, Tramer and
Boneh, ICLR 2021); the cosine decay keeps the last rounds' noisy steps from moving the released model far."""


AUTO_PRETRAIN_BATCH = 128
"""The pretraining batch of ``pretrain-batch-size 0`` when it fits the memory."""


@dataclass(frozen=True)
class PretrainSettings(Part):
    """Self-supervised pretraining of the encoder: the method(s), rounds, optimisation and the methods' knobs."""

    TITLE: ClassVar[str] = "pretrain"

    method: str = setting("simclr", f"Self-supervised method: {', '.join(m.value for m in SSLMethodName)}, several "
                          "joined by '+', or none.", key="pretrain")
    weights: str = setting("", "Comma-separated weight per method when combining (e.g. 1,0.5 for simclr+restore).",
                           key="pretrain-weights")
    rounds: int = setting(10, "Federated rounds of self-supervised pretraining.", key="pretrain-rounds")
    epochs: int = setting(1, "Local epochs per pretraining round.", key="pretrain-epochs")
    lr: float = setting(1e-3, "AdamW learning rate for pretraining.", key="pretrain-lr")
    batch_size: int = setting(0, f"Batch size for pretraining (SimCLR's negatives come from the batch); 0: auto, "
                              f"{AUTO_PRETRAIN_BATCH} or the largest that fits pretrain-memory-gb (decided at the "
                              "centre, sent to the sites).", key="pretrain-batch-size")
    memory_gb: float = setting(0.0, "Memory (GB) one site's pretraining may use; 0: a fifth of this machine's "
                               "memory, shared by the sites that train at once. An explicit pretrain-batch-size that "
                               "does not fit is refused.", key="pretrain-memory-gb")
    temperature: float = setting(0.2, "NT-Xent temperature (SimCLR).", key="temperature")
    byol_momentum: float = setting(0.99, "Momentum of BYOL's target network (kept at each site).", key="byol-momentum")
    mask_ratio: float = setting(0.75, "Fraction of patches MAE hides.", key="mask-ratio")
    aggregation: SSLAggregation = setting(
        SSLAggregation.FEDAVG, "How a site takes the global encoder into its pretraining round: fedavg (replaces its "
        "own), fedema (an EMA of its own last encoder and the global one, weighted by their divergence; FedEMA, "
        "Zhuang et al., ICLR 2022) or fedu (BYOL's predictor is shared too, and a site takes the global predictor "
        "only while its encoder has not diverged from the global one; FedU, Zhuang et al., ICCV 2021). Momentum "
        "targets, projectors and decoders stay at the site.", key="ssl-aggregation")
    fedema_tau: float = setting(0.7, "FedEMA's autoscaler tau in (0, 1]: at a site's first divergence d0, lambda = "
                                "tau / d0, then mu = min(lambda d, 1) (the paper's default 0.7).", key="fedema-tau")
    fedu_threshold: float = setting(0.05, "FedU's divergence threshold: a site takes the global predictor when "
                                    "||global - own encoder|| / ||global|| is below it.", key="fedu-threshold")
    server_lr: float = setting(1.0, "Server learning rate on each pretraining round's aggregate (FedAvgM, Hsu et al. "
                               "2019; Reddi et al., ICLR 2021): the new global weights are the sent ones plus this "
                               "times the server velocity; 1 with pretrain-server-momentum 0 is FedAvg.",
                               key="pretrain-server-lr", site=False)
    server_momentum: float = setting(0.0, "Server momentum beta in [0, 1) over pretraining rounds (FedAvgM): the "
                                     "velocity is beta times the last one plus the round's aggregate minus the sent "
                                     "weights, so a direction the sites agree on round after round is followed "
                                     "further than one round's local steps go; 0: off.",
                                     key="pretrain-server-momentum", site=False)

    def check(self) -> None:
        known = sorted(m.value for m in SSLMethodName)
        methods = self.methods
        if self.method != NO_PRETRAIN:
            if len(set(methods)) != len(methods) or not all(methods):
                raise ConfigError(f"pretrain must be 'none' or distinct methods joined by '+'; got {self.method!r}")
            for m in methods:
                if m not in known:
                    raise ConfigError(
                        f"unknown self-supervised method {m!r} in pretrain; known: {', '.join(known)}, or 'none'"
                    )
        if self.weights:
            try:
                weights = [float(w) for w in self.weights.split(",")]
            except ValueError as exc:
                raise ConfigError(f"pretrain-weights must be comma-separated numbers; got {self.weights!r}") from exc
            if len(weights) != len(methods):
                raise ConfigError(
                    f"pretrain-weights needs one weight per method in pretrain ({len(methods)}); got {len(weights)}"
                )
            if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
                raise ConfigError(f"pretrain-weights must be >= 0 with at least one > 0; got {self.weights!r}")
        if self.rounds < 0:
            raise ConfigError(f"pretrain-rounds must be >= 0; got {self.rounds}")
        if self.method != NO_PRETRAIN and self.rounds < 1:
            raise ConfigError("pretrain-rounds must be >= 1 when a pretrain method is set (or use --pretrain none)")
        if self.epochs < 1:
            raise ConfigError(f"pretrain-epochs must be >= 1; got {self.epochs}")
        if self.batch_size < 0:
            raise ConfigError(f"pretrain-batch-size must be >= 1 (0: auto); got {self.batch_size}")
        if self.memory_gb < 0:
            raise ConfigError(f"pretrain-memory-gb must be >= 0 (0: from this machine's memory); got {self.memory_gb}")
        if "simclr" in methods and self.batch == 1:
            raise ConfigError("pretrain-batch-size must be >= 2 for simclr (it needs in-batch negatives)")
        for key, fvalue in (("pretrain-lr", self.lr), ("temperature", self.temperature)):
            if not fvalue > 0:
                raise ConfigError(f"{key} must be > 0; got {fvalue}")
        if not 0 <= self.byol_momentum < 1:
            raise ConfigError(f"byol-momentum must be in [0, 1); got {self.byol_momentum}")
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"mask-ratio must be in (0, 1); got {self.mask_ratio}")
        if not 0 < self.fedema_tau <= 1:
            raise ConfigError(f"fedema-tau must be in (0, 1]; got {self.fedema_tau}")
        if not self.server_lr > 0:
            raise ConfigError(f"pretrain-server-lr must be > 0; got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            raise ConfigError(f"pretrain-server-momentum must be in [0, 1); got {self.server_momentum}")
        if not self.fedu_threshold > 0:
            raise ConfigError(f"fedu-threshold must be > 0; got {self.fedu_threshold}")
        if self.aggregation == SSLAggregation.FEDU and "byol" not in methods:
            raise ConfigError(f"ssl-aggregation fedu shares BYOL's predictor: it needs byol among the pretrain "
                              f"methods; got pretrain {self.method!r} (fedema works with every method)")

    @property
    def batch(self) -> int:
        """The pretraining batch size: the setting, or `AUTO_PRETRAIN_BATCH` when it is 0 and the centre has not
        sized it yet (`medfed.experiment.memory.fit_pretrain_batch`)."""
        return self.batch_size or AUTO_PRETRAIN_BATCH

    @property
    def methods(self) -> list[str]:
        """The SSL methods named by `method` ('simclr+restore' -> ['simclr', 'restore']; 'none' -> [])."""
        return [] if self.method == NO_PRETRAIN else self.method.split("+")

    @property
    def method_weights(self) -> list[float]:
        """One weight per method (all 1 unless `weights` says otherwise)."""
        if not self.weights:
            return [1.0] * len(self.methods)
        return [float(w) for w in self.weights.split(",")]


@dataclass(frozen=True)
class FinetuneSettings(Part):
    """Supervised fine-tuning on the labelled share of each site: what is trained and how (0 / '': the recipe's)."""

    TITLE: ClassVar[str] = "finetune"

    mode: FinetuneMode = setting(FinetuneMode.FULL, "full (encoder and head), linear (head only; only the head is "
                                 "sent) or lora (low-rank adapters on the encoder's conv/linear layers plus the head; "
                                 "only those are sent).", key="finetune-mode")
    rounds: int = setting(0, "Federated rounds of supervised fine-tuning (0: the recipe's, 25 without DP; under DP the "
                          "recipe chosen on validation data, docs/RESULTS.md dp_recipe).", key="finetune-rounds")
    epochs: int = setting(1, "Local epochs per fine-tuning round.", key="finetune-epochs")
    lr: float = setting(0.0, "AdamW learning rate for fine-tuning (0: the recipe's, 3e-4 without DP).",
                        key="finetune-lr")
    batch_size: int = setting(0, "Batch size for fine-tuning, expected Poisson batch under DP (0: the recipe's, 32 "
                              "without DP).", key="finetune-batch-size")
    lr_schedule: str = setting("", "Learning rate over the fine-tuning rounds: constant, or cosine (decays from "
                               "finetune-lr towards 0 by the last round); empty: the recipe's.",
                               key="finetune-lr-schedule")
    loss: FinetuneLoss = setting(FinetuneLoss.CE, "ce, or logit-adjusted: cross-entropy on logits plus the log of the "
                                 "site's own label prior (Menon et al. 2021; FedLC, Zhang et al. 2022), so a site with "
                                 "skewed labels does not drag the shared head towards its majority class. Single-label "
                                 "tasks only.", key="finetune-loss")
    probe_rounds: int = setting(0, "The first N fine-tuning rounds train the head only, the encoder frozen, before "
                                "the encoder trains too (linear probing then fine-tuning, Kumar et al., ICLR 2022: "
                                "a random head's first gradients do not distort the pretrained features). Counted "
                                "within the fine-tuning rounds; 0: off.", key="finetune-probe-rounds")
    select: FinetuneSelect = setting(FinetuneSelect.LAST, "Which round's model the run keeps: last, or "
                                     "best-validation (the round whose global model had the highest validation AUC, "
                                     "mean over the sites' validation shares weighted by images; early stopping on "
                                     "held-out data, Prechelt 1998): few labels under label skew make the rounds' "
                                     "models swing; needs validation data in the hundreds of images, or it chooses "
                                     "by noise (docs/RESULTS.md). The centre's choice, never sent to a site.",
                                     key="finetune-select", site=False)

    def check(self) -> None:
        if self.lr_schedule and self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"finetune-lr-schedule must be one of {', '.join(LR_SCHEDULES)}; "
                              f"got {self.lr_schedule!r}")
        if self.rounds < 0:
            raise ConfigError(f"finetune-rounds must be >= 1 (the run ends with a fine-tuned model), or 0 for the "
                              f"recipe's; got {self.rounds}")
        if self.epochs < 1:
            raise ConfigError(f"finetune-epochs must be >= 1; got {self.epochs}")
        if self.probe_rounds < 0:
            raise ConfigError(f"finetune-probe-rounds must be >= 0; got {self.probe_rounds}")
        if self.batch_size < 0:
            raise ConfigError(f"finetune-batch-size must be >= 1, or 0 for the recipe's; got {self.batch_size}")
        if self.lr < 0:
            raise ConfigError(f"finetune-lr must be > 0, or 0 for the recipe's; got {self.lr}")


@dataclass(frozen=True)
class LoRASettings(Part):
    """Low-rank adapters for ``finetune-mode lora`` (Hu et al., ICLR 2022; peft)."""

    TITLE: ClassVar[str] = "lora"

    rank: int = setting(4, "Rank of the LoRA adapters (finetune-mode lora).", key="lora-rank")
    alpha: float = setting(8.0, "LoRA scaling numerator: adapters are scaled by lora-alpha / lora-rank.",
                           key="lora-alpha")

    def check(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora-rank must be >= 1; got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"lora-alpha must be > 0; got {self.alpha}")
