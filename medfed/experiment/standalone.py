"""Centralized and local-only arms: the same `SiteAlgo` rounds, without a federation.

* centralized: one "site" holding every site's data (exactly the union of the partition).
* local-only: each site trains alone on its own data; the arm's number is the mean of the
  sites' test metrics (the per-site values are recorded too).

Rounds keep their meaning (each round = the same local epochs as a federated round), so
curves and budgets line up with the federated arms.
"""

from __future__ import annotations

import numpy as np

from medfed.constants import DPScope, MetricKey, Mode, Phase
from medfed.data.dataset import Dataset
from medfed.data.partition import SitePlan
from medfed.data.site import SiteData, pooled_site, site_from_split
from medfed.devices import resolve_device
from medfed.exceptions import PrivacyBudgetExceeded
from medfed.experiment.model_selection import SELECTED_SPLIT, selector
from medfed.experiment.phases import FINAL_MODEL, PRETRAINED_ENCODER, ArmContext
from medfed.experiment.recorder import GLOBAL
from medfed.files import save_safetensors_durably
from medfed.privacy.guard import PrivacyGuard, SitePrivacy
from medfed.task.algo import SiteAlgo
from medfed.task.calibration import THRESHOLD, pooled_threshold
from medfed.task.evaluation import evaluate_state
from medfed.task.model_setup import initial_encoder_state, new_classifier


def _guard(ctx: ArmContext, site_label: int | str) -> PrivacyGuard | None:
    """A baseline's "site" keeps its own ledger under the arm's ledger folder (the pooled site of
    the centralized arm is one data holder with one budget)."""
    if ctx.cfg.privacy.scope == DPScope.NONE:
        return None
    return PrivacyGuard(SitePrivacy.resolve(ctx.cfg, str(site_label), {}, ctx.ledger_dir), f"{ctx.run_id}/{ctx.arm}")


def _refused(ctx: ArmContext, phase: Phase, rnd: int, site_label: int | str, exc: PrivacyBudgetExceeded) -> None:
    ctx.recorder.write({"arm": ctx.arm, "phase": phase.value, "round": rnd, "site": site_label, "split": "train",
                        "accepted": False, "reason": f"refused: {exc}", MetricKey.REFUSED.value: 1.0})


def _train_one(ctx: ArmContext, site: SiteData, site_label: int | str, suffix: str) -> dict[str, float]:
    cfg, rec = ctx.cfg, ctx.recorder
    algo = SiteAlgo(cfg, site, _guard(ctx, site_label), resolve_device(cfg.compute.device))
    encoder_state = initial_encoder_state(cfg, site.spec)
    pretrain = bool(cfg.ssl.methods) and not cfg.model.encoder_init
    local = None
    meta = {"arm": ctx.arm, "config": cfg.to_json(), "site": str(site_label)}
    for rnd in range(1, cfg.ssl.rounds + 1 if pretrain else 1):
        try:
            encoder_state, local, stats = algo.pretrain_round(encoder_state, local, rnd)
        except PrivacyBudgetExceeded as exc:  # the site keeps its current encoder and stops
            _refused(ctx, Phase.PRETRAIN, rnd, site_label, exc)
            break
        rec.record(ctx.arm, Phase.PRETRAIN, rnd, site_label, "train",
                   {MetricKey.LOSS.value: stats.loss, MetricKey.NUM_EXAMPLES.value: stats.num_examples,
                    **stats.privacy})
    if pretrain:
        name = f"{PRETRAINED_ENCODER.removesuffix('.safetensors')}{suffix}.safetensors"
        save_safetensors_durably(ctx.arm_dir / name, encoder_state, meta)
    state = new_classifier(cfg, site.spec, site.task, site.num_classes, encoder_state).state_dict()
    threshold = algo.validation_threshold(state)  # calibrated on the arm's own validation split
    metrics: dict[str, float] = evaluate_state(cfg, ctx.test, state, threshold)
    rec.record(ctx.arm, Phase.FINETUNE, 0, site_label, "test", metrics)
    keeper = selector(cfg.finetune.select)  # finetune-select best-validation: on this arm's own validation split
    tests = {0: (metrics, threshold)}
    last = 0
    for rnd in range(1, cfg.finetune_recipe.rounds + 1):
        try:
            shared, stats = algo.finetune_round(state, rnd)
        except PrivacyBudgetExceeded as exc:
            _refused(ctx, Phase.FINETUNE, rnd, site_label, exc)
            break
        state.update(shared)
        rec.record(ctx.arm, Phase.FINETUNE, rnd, site_label, "train",
                   {MetricKey.LOSS.value: stats.loss, MetricKey.NUM_EXAMPLES.value: stats.num_examples,
                    **stats.privacy})
        validation = algo.evaluate_val(state)
        threshold = pooled_threshold([validation])
        metrics = evaluate_state(cfg, ctx.test, state, threshold)
        rec.record(ctx.arm, Phase.FINETUNE, rnd, site_label, "test", metrics)
        last, tests[rnd] = rnd, (metrics, threshold)
        if keeper is not None:
            keeper.offer(rnd, state, validation)
    if keeper is not None:
        chosen, state = keeper.chosen(last, state)
        metrics, threshold = tests[chosen]
        rec.record(ctx.arm, Phase.FINETUNE, chosen, site_label, SELECTED_SPLIT, keeper.figures(chosen))
    if threshold is not None:
        meta[THRESHOLD] = f"{threshold.probability:.17g}"
    name = f"{FINAL_MODEL.removesuffix('.safetensors')}{suffix}.safetensors"
    save_safetensors_durably(ctx.arm_dir / name, state, meta)
    return metrics


def run_standalone(
    ctx: ArmContext, data: Dataset, plan: SitePlan
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Returns the arm's test metrics and, for local-only, each site's."""
    if ctx.cfg.experiment.mode == Mode.CENTRALIZED:
        return _train_one(ctx, pooled_site(data, plan), GLOBAL, ""), {}
    per_site = {
        s.site_id: _train_one(ctx, site_from_split(data, s), s.site_id, f"_site{s.site_id}") for s in plan.sites
    }
    keys = sorted({k for m in per_site.values() for k in m})  # a site without both classes in val has no threshold
    mean = {k: float(np.nanmean([m.get(k, np.nan) for m in per_site.values()])) for k in keys}
    return mean, per_site
