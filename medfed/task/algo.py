"""A site's local work, free of Flower: pretraining rounds, fine-tuning rounds, evaluation.

`SiteAlgo` is what the ClientApp calls in federated runs and what the centralized and
local-only baselines call directly, so every arm of a comparison runs the same loop.
One training loop (`train_loop`) serves both phases; FedProx (Li et al., MLSys 2020)
adds ``mu/2 * ||w - w_global||^2`` over the shared weights when ``proximal_mu > 0``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from medfed.config import RunConfig
from medfed.constants import (
    DPScope,
    FinetuneMode,
    GradSampleMode,
    MetricKey,
    Mode,
    PersonalParts,
    Phase,
    SSLAggregation,
    TaskType,
)
from medfed.data.site import SiteData
from medfed.data.stores import ImageStore
from medfed.data.transforms import AugmentSpec, augment
from medfed.devices import autocast, to_device, use_bf16
from medfed.exceptions import ConfigError, TrainingDiverged
from medfed.models.heads import Classifier
from medfed.models.parts import norm_parameter_keys, personal_keys
from medfed.privacy.dp_sgd import DPStepSettings, PoissonSchedule, dp_train_loop
from medfed.privacy.grad_modes import MODE_CODES, resolve_grad_sample_mode
from medfed.privacy.guard import PrivacyGuard, RoundPlan
from medfed.selfsup.compat import check_methods_fit
from medfed.selfsup.federated import (
    KEPT_PREFIX,
    OWN_NORMS,
    PREDICTOR_PREFIX,
    keep_after_round,
    shared_predictor,
    split_prefixed,
    start_round,
)
from medfed.selfsup.methods import SSLMethod
from medfed.selfsup.registry import build_method, resolve_encoder_kind
from medfed.task.calibration import Threshold, metrics_at_threshold, pooled_threshold, score_histograms
from medfed.task.metrics import classification_metrics
from medfed.task.model_setup import (
    check_loss_fits_task,
    derive_seed,
    finetune_shared_keys,
    generator,
    new_classifier,
    new_encoder,
    seeded_init,
    ssl_settings,
)

StateDict = dict[str, torch.Tensor]
EVAL_BATCH = 512
EVAL_VOXELS = 1 << 22
"""Evaluation batches hold at most `EVAL_BATCH` images and at most this many pixels (voxels) in all: 512 images of
28x28, 191 of 28^3, 16 volumes of 64^3 (their activations, not the images, are what costs memory: the CNN's first
stage holds width x voxels floats per image, twice while a layer runs)."""


def eval_batch(images: ImageStore | torch.Tensor) -> int:
    """Images per evaluation batch for ``images`` (N, C, *S)."""
    voxels = int(np.prod(tuple(images.shape[2:])))
    return max(1, min(EVAL_BATCH, EVAL_VOXELS // max(1, voxels)))


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    proximal_mu: float = 0.0
    drop_last: bool = False


@dataclass(frozen=True)
class TrainStats:
    num_examples: int
    loss: float  # mean loss over the steps of the last epoch (DP: over the round's non-empty steps)
    steps: int
    seconds: float
    privacy: dict[str, float] = field(default_factory=dict)  # epsilon, delta, budget, sigma, q (metric keys)
    extra: dict[str, float] = field(default_factory=dict)  # other figures of the round (FedEMA's mu...)


def minibatches(n: int, batch_size: int, gen: torch.Generator, drop_last: bool) -> list[torch.Tensor]:
    """Shuffled index batches; with ``drop_last`` a short tail is dropped unless it is the only batch."""
    order = torch.randperm(n, generator=gen)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def train_loop(
    params: list[nn.Parameter],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    settings: TrainSettings,
    gen: torch.Generator,
    *,
    prox_params: list[nn.Parameter] | None = None,
    on_step_end: Callable[[], None] | None = None,
) -> TrainStats:
    """AdamW over ``params`` for ``settings.epochs`` passes over ``n`` examples."""
    start = time.perf_counter()
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    anchors = [p.detach().clone() for p in prox_params] if prox_params and settings.proximal_mu > 0 else None
    steps = 0
    last_losses: list[float] = []
    for _ in range(settings.epochs):
        last_losses = []
        for idx in minibatches(n, settings.batch_size, gen, settings.drop_last):
            loss = batch_loss(idx)
            if anchors is not None and prox_params is not None:
                prox = sum(((p - a).pow(2).sum() for p, a in zip(prox_params, anchors, strict=True)), 0.0)
                loss = loss + 0.5 * settings.proximal_mu * prox
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"training loss became {float(loss)} at step {steps}; lower the learning rate")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if on_step_end is not None:
                on_step_end()
            steps += 1
            last_losses.append(float(loss.detach()))
    mean_loss = float(np.mean(last_losses)) if last_losses else float("nan")
    return TrainStats(n, mean_loss, steps, time.perf_counter() - start)


@torch.no_grad()
def logits_of(model: Classifier, images: ImageStore | torch.Tensor) -> torch.Tensor:
    """Logits ``(N, K)`` on the CPU, in evaluation mode and fp32, computed on the model's device in batches
    (`eval_batch`), read a batch at a time."""
    model.eval()
    size = eval_batch(images)
    device = next(model.parameters()).device
    return torch.cat([model(to_device(images[i : i + size], device)).float().cpu()
                      for i in range(0, len(images), size)])


def metrics_from_logits(
    model: Classifier, logits: torch.Tensor, labels: torch.Tensor, threshold: Threshold | None = None
) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity, FPR and mean loss for precomputed logits; for a binary
    task with a calibrated ``threshold`` also the threshold and the metrics at it (`medfed.task.calibration`)."""
    with torch.no_grad():
        probs = model.probabilities(logits).numpy()
        metrics = classification_metrics(model.task, labels.numpy(), probs)
        metrics[MetricKey.EVAL_LOSS] = float(model.loss(logits, labels))
        if threshold is not None and model.task == TaskType.BINARY:
            metrics.update(metrics_at_threshold(labels.numpy(), probs, threshold))
    return {str(k): float(v) for k, v in metrics.items()}


def evaluate(model: Classifier, images: ImageStore | torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Metrics of ``model`` on a labelled set (one forward pass)."""
    return metrics_from_logits(model, logits_of(model, images), labels)


def evaluate_with_histograms(
    model: Classifier, images: ImageStore | torch.Tensor, labels: torch.Tensor
) -> dict[str, float | list[int]]:
    """`evaluate`'s metrics plus, for a binary task, the score histograms a threshold is calibrated from."""
    logits = logits_of(model, images)
    metrics: dict[str, float | list[int]] = dict(metrics_from_logits(model, logits, labels))
    if model.task == TaskType.BINARY:
        with torch.no_grad():
            metrics.update(score_histograms(labels.numpy(), model.probabilities(logits).numpy()))
    return metrics


# ---- the site -----------------------------------------------------------------------


class SiteAlgo:
    """One site's training, given the run config and the site's data.

    With a `PrivacyGuard` the phases that ``dp`` covers run DP-SGD (each round planned,
    projected, refused past the budget and recorded in the site's ledger) and the other
    phases record their weight releases as uncovered exposure (also when ``dp`` is none).
    """

    def __init__(self, cfg: RunConfig, data: SiteData, privacy: PrivacyGuard | None = None,
                 device: torch.device | None = None) -> None:
        check_methods_fit(cfg)  # a site checks what the server asks of it, too
        self.cfg, self.data, self.privacy = cfg, data, privacy
        self.device = device or torch.device("cpu")  # models are built on the CPU (seeded) and moved here
        self._personal_keys: list[str] | None = None

    @property
    def proximal_mu(self) -> float:
        """FedProx's mu, for federated runs only: baselines have no global model to stay near."""
        return self.cfg.federation.proximal_mu if self.cfg.experiment.mode == Mode.FEDERATED else 0.0

    def _gen(self, phase: Phase, server_round: int) -> torch.Generator:
        """The round's generator (sampling, augmentation, DP noise). Under DP it is keyed by the
        site's secret signing key and the run id: the server knows the run seed, and must not be
        able to re-derive a site's noise or Poisson batches (nor may two runs reuse them)."""
        if self.privacy is not None and self._is_private(phase):
            secret = self.privacy.secret_seed(self.cfg.experiment.seed, phase.value, server_round)
            return torch.Generator().manual_seed(secret)
        return generator(self.cfg.experiment.seed, self.data.site_id, phase.value, server_round)

    def build_method(self, encoder_state: StateDict, local_state: StateDict | None) -> SSLMethod:
        encoder = new_encoder(self.cfg, self.data.spec)
        encoder.load_state_dict(encoder_state)
        method: SSLMethod = seeded_init(  # heads, predictors and decoders: seeded per site
            derive_seed(self.cfg.experiment.seed, self.data.site_id, "ssl-heads"),
            lambda: build_method(self.cfg.ssl.methods, self.cfg.ssl.method_weights, encoder, ssl_settings(self.cfg)),
        )
        if local_state is not None:
            method.load_local_state_dict(local_state)
        return method.to(self.device)

    # ---- privacy ---------------------------------------------------------------------
    def _is_private(self, phase: Phase) -> bool:
        return DPScope(self.cfg.privacy.scope).covers(phase)

    def _schedule(self, phase: Phase) -> PoissonSchedule:
        if phase == Phase.PRETRAIN:
            return PoissonSchedule.for_round(len(self.data.train_images), self.cfg.ssl.batch, self.cfg.ssl.epochs)
        return PoissonSchedule.for_round(
            len(self.data.labelled_images), self.cfg.finetune_recipe.batch_size, self.cfg.finetune.epochs
        )

    def _later_dp_rounds(self, phase: Phase, server_round: int) -> list[tuple[float, int]]:
        """The DP rounds this run still plans after this one (for planning the noise)."""
        later: list[tuple[float, int]] = []
        if phase == Phase.PRETRAIN:
            s = self._schedule(Phase.PRETRAIN)
            later += [(s.sample_rate, s.steps)] * max(0, self.cfg.ssl.rounds - server_round)
            if self._is_private(Phase.FINETUNE):
                f = self._schedule(Phase.FINETUNE)
                later += [(f.sample_rate, f.steps)] * self.cfg.finetune_recipe.rounds
        else:
            f = self._schedule(Phase.FINETUNE)
            later += [(f.sample_rate, f.steps)] * max(0, self.cfg.finetune_recipe.rounds - server_round)
        return later

    def _plan(self, phase: Phase, server_round: int) -> tuple[RoundPlan, DPStepSettings]:
        """Plan and project a DP round; raises PrivacyBudgetExceeded (nothing written) past the budget."""
        if self.privacy is None:
            raise ConfigError("dp is on but this site has no privacy guard (ledger) to account for the round")
        schedule = self._schedule(phase)
        n = len(self.data.train_images) if phase == Phase.PRETRAIN else len(self.data.labelled_images)
        self.privacy.check_site_size(n)
        plan = self.privacy.plan(schedule.sample_rate, schedule.steps, self._later_dp_rounds(phase, server_round))
        p = self.privacy.privacy
        views = (self.cfg.finetune_recipe.augment_multiplicity if phase == Phase.FINETUNE
                 else self.cfg.privacy.augment_multiplicity or 1)
        kind = resolve_encoder_kind(self.cfg.model.encoder, self.cfg.ssl.methods)
        mode = GradSampleMode(p.grad_sample_mode).for_phase(finetuning=phase == Phase.FINETUNE, encoder=kind.value)
        return plan, DPStepSettings(plan.noise_multiplier, p.max_grad_norm, schedule, mode.value, p.secure_rng, views)

    def _record(self, phase: Phase, server_round: int, plan: RoundPlan | None) -> dict[str, float]:
        """Append the round to the ledger; returns the privacy metrics of the reply."""
        if self.privacy is None:
            return {}
        p = self.privacy.privacy
        if plan is None:
            entry = self.privacy.record_uncovered(phase, server_round)
            # no DP anywhere in the run: the row is the record, no epsilon to report
            if self.cfg.privacy.scope == DPScope.NONE:
                return {}
            return {MetricKey.EPSILON.value: entry.epsilon_after, MetricKey.DELTA.value: p.delta,
                    MetricKey.EPSILON_BUDGET.value: p.epsilon, MetricKey.NOISE_MULTIPLIER.value: 0.0}
        entry = self.privacy.record_dp(plan, phase, server_round)
        return {
            MetricKey.EPSILON.value: entry.epsilon_after, MetricKey.DELTA.value: p.delta,
            MetricKey.EPSILON_BUDGET.value: p.epsilon, MetricKey.NOISE_MULTIPLIER.value: plan.noise_multiplier,
            MetricKey.SAMPLE_RATE.value: plan.sample_rate, MetricKey.DP_STEPS.value: float(plan.steps),
        }

    def _train(
        self, phase: Phase, server_round: int, module: nn.Module, trainable: list[nn.Parameter],
        batch_loss: Callable[[torch.Tensor], torch.Tensor], n: int, settings: TrainSettings, gen: torch.Generator,
        prox_params: list[nn.Parameter], on_step_end: Callable[[], None] | None = None,
        per_example_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> TrainStats:
        """One round, with DP-SGD when ``dp`` covers the phase, recorded in the ledger either way; phases without
        DP run their forward passes under bf16 autocast when the precision setting asks (`use_bf16`).
        ``per_example_loss`` (fine-tuning: the losses ``batch_loss`` averages) lets DP-SGD use ghost clipping."""
        if not self._is_private(phase):
            half = use_bf16(self.cfg.compute.precision, self.device, private=False)

            def cast_loss(idx: torch.Tensor) -> torch.Tensor:
                with autocast(self.device, half):
                    return batch_loss(idx)

            stats = train_loop(
                trainable, cast_loss, n, settings, gen, prox_params=prox_params, on_step_end=on_step_end
            )
            return dataclasses.replace(stats, privacy=self._record(phase, server_round, None))
        plan, dp = self._plan(phase, server_round)
        kind = resolve_encoder_kind(self.cfg.model.encoder, self.cfg.ssl.methods)
        mode = resolve_grad_sample_mode(
            self.privacy.privacy.grad_sample_mode if self.privacy else dp.grad_sample_mode,
            finetuning=phase == Phase.FINETUNE, encoder=kind.value, module=module, params=trainable,
            batch_loss=batch_loss, n=n, dp=dp, gen=gen, lr=settings.lr, per_example_loss=per_example_loss)
        dp = dataclasses.replace(dp, grad_sample_mode=mode)
        dp_stats = dp_train_loop(
            module, trainable, batch_loss, n, dp, lr=settings.lr, weight_decay=settings.weight_decay, gen=gen,
            on_step_end=on_step_end, per_example_loss=per_example_loss,
        )
        privacy = {**self._record(phase, server_round, plan), MetricKey.DP_GRAD_MODE.value: MODE_CODES[mode]}
        return TrainStats(n, dp_stats.loss, dp_stats.steps, dp_stats.seconds, privacy)

    # ---- phases ----------------------------------------------------------------------
    def pretrain_round(
        self, encoder_state: StateDict, local_state: StateDict | None, server_round: int
    ) -> tuple[StateDict, StateDict, TrainStats]:
        """Train the global encoder on all of this site's images with the SSL objective.

        ``encoder_state`` is what the server sent: the encoder, and under ``ssl-aggregation fedu`` BYOL's
        predictor under `PREDICTOR_PREFIX`. The site starts from it as ``ssl-aggregation`` says
        (`medfed.selfsup.federated`) with its own normalisation parameters under ``personal norm``.

        Returns the weights to share (the encoder; under fedu the predictor too), the site-local state (heads,
        predictors, decoders, momentum targets and the kept entries: to keep) and training statistics. Under DP
        raises `PrivacyBudgetExceeded` before training when the round would pass the budget.
        """
        ssl = self.cfg.ssl
        global_encoder, global_predictor = split_prefixed(encoder_state, PREDICTOR_PREFIX)
        method_local, kept = split_prefixed(local_state or {}, KEPT_PREFIX)
        kept = {KEPT_PREFIX + k: v for k, v in kept.items()}
        start = start_round(ssl.aggregation, global_encoder, kept, tau=ssl.fedema_tau,
                            fedu_threshold=ssl.fedu_threshold)
        encoder_start = dict(start.encoder)
        _, own_norms = split_prefixed(start.kept, OWN_NORMS)
        if PersonalParts(self.cfg.federation.personal).norm:
            encoder_start.update(own_norms)  # FedBN's idea: this site's own normalisation, never the average
        method = self.build_method(encoder_start, method_local or None)
        predictor = shared_predictor(method) if ssl.aggregation == SSLAggregation.FEDU else None
        if predictor is not None and start.take_global_predictor:
            predictor.load_state_dict({k: v.to(self.device) for k, v in global_predictor.items()})
        method.train()
        gen = self._gen(Phase.PRETRAIN, server_round)
        images = self.data.train_images
        settings = TrainSettings(
            epochs=ssl.epochs, batch_size=ssl.batch, lr=ssl.lr, proximal_mu=self.proximal_mu, drop_last=True,
        )
        trainable = [p for p in method.parameters() if p.requires_grad]
        stats = self._train(
            Phase.PRETRAIN, server_round, method, trainable,
            lambda idx: method.loss(to_device(images[idx], self.device), gen), len(images),
            settings, gen, prox_params=list(method.encoder.parameters()), on_step_end=method.on_step_end,
        )
        encoder_out = {k: v.detach().cpu().clone() for k, v in method.encoder.state_dict().items()}
        shared = dict(encoder_out)
        if predictor is not None:
            shared |= {PREDICTOR_PREFIX + k: v.detach().cpu().clone() for k, v in predictor.state_dict().items()}
        new_kept = keep_after_round(ssl.aggregation, encoder_out, start.kept)
        if PersonalParts(self.cfg.federation.personal).norm:
            new_kept |= {OWN_NORMS + k: encoder_out[k] for k in norm_parameter_keys(method.encoder)}
        local = {k: v.cpu() for k, v in method.local_state_dict().items()} | new_kept
        return shared, local, dataclasses.replace(stats, extra=start.metrics)

    def classifier(self, state: StateDict) -> Classifier:
        model = new_classifier(self.cfg, self.data.spec, self.data.task, self.data.num_classes, None)
        model.load_state_dict(state)
        return model.to(self.device)

    def personal_keys(self) -> list[str]:
        """The classifier's keys this site keeps its own of (``personal``; none by default)."""
        if PersonalParts(self.cfg.federation.personal) == PersonalParts.NONE:
            return []
        if self._personal_keys is None:
            model = new_classifier(self.cfg, self.data.spec, self.data.task, self.data.num_classes, None)
            self._personal_keys = personal_keys(model, self.cfg.federation.personal)
        return self._personal_keys

    def personalised(self, classifier_state: StateDict, personal: StateDict | None) -> StateDict:
        """The global weights with this site's own copy of its personal parts put over them (the global ones
        where the site has none yet: its first round)."""
        if not personal:
            return classifier_state
        return {**classifier_state, **{k: personal[k] for k in self.personal_keys() if k in personal}}

    def finetune_round(self, classifier_state: StateDict, server_round: int,
                       personal: StateDict | None = None) -> tuple[StateDict, TrainStats]:
        """Supervised training on the labelled subset; returns the weights to share and statistics.

        Full: encoder and head train; linear: the head; lora: the adapters and the head. In the first
        ``finetune-probe-rounds`` rounds only the head trains (the encoder is sent back unchanged). ``personal``:
        this site's own copy of its personal parts, trained instead of the global one (`personalised`).
        Under DP raises `PrivacyBudgetExceeded` before training when the round would pass the budget.
        """
        model = self.classifier(self.personalised(classifier_state, personal))
        probing = server_round <= self.cfg.finetune.probe_rounds
        if self.cfg.finetune.mode == FinetuneMode.LINEAR or probing:
            model.encoder.requires_grad_(False)
        model.train()
        gen = self._gen(Phase.FINETUNE, server_round)
        images, labels = self.data.labelled_images, self.data.labelled_labels
        views = AugmentSpec.light()
        recipe = self.cfg.finetune_recipe
        settings = TrainSettings(
            epochs=self.cfg.finetune.epochs, batch_size=recipe.batch_size, lr=recipe.lr_at_round(server_round),
            proximal_mu=self.proximal_mu,
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        shift = self.logit_shift()
        shift = shift.to(self.device) if isinstance(shift, torch.Tensor) else shift
        dev = self.device

        def logits_and_labels(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return model(augment(to_device(images[idx], dev), views, gen)) + shift, to_device(labels[idx], dev)

        def per_example_loss(idx: torch.Tensor) -> torch.Tensor:  # (B,): model.loss of each row alone (ghost)
            return torch.func.vmap(lambda z, y: model.loss(z[None], y[None]))(*logits_and_labels(idx))

        stats = self._train(
            Phase.FINETUNE, server_round, model, trainable, lambda idx: model.loss(*logits_and_labels(idx)),
            len(images), settings, gen, prox_params=trainable, per_example_loss=per_example_loss,
        )
        state = model.state_dict()
        keys = finetune_shared_keys(self.cfg, list(state))
        return {k: state[k].detach().cpu().clone() for k in keys}, stats

    def logit_shift(self) -> torch.Tensor | float:
        """Training-time logit shift: log of this site's label prior (add-one smoothed) for the
        logit-adjusted loss (Menon et al., ICLR 2021), else 0. Predictions use raw logits."""
        if self.cfg.finetune.loss != "logit-adjusted":
            return 0.0
        check_loss_fits_task(self.cfg, self.data.task)
        counts = torch.bincount(self.data.labelled_labels[:, 0], minlength=self.data.num_classes).float() + 1.0
        return torch.log(counts / counts.sum())

    def evaluate_val(self, classifier_state: StateDict) -> dict[str, float | list[int]]:
        """Metrics on this site's validation split and, for a binary task, its score histograms; none for a site
        without validation data (so no threshold is calibrated on it)."""
        if not len(self.data.val_images):
            return {}
        return evaluate_with_histograms(self.classifier(classifier_state), self.data.val_images, self.data.val_labels)

    def validation_threshold(self, classifier_state: StateDict) -> Threshold | None:
        """The threshold calibrated on this site's validation split alone (baselines); None unless binary."""
        return pooled_threshold([self.evaluate_val(classifier_state)])
