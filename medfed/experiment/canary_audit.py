"""Empirical privacy audit with canaries in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

``m`` canaries (images from the official test split, which no site trains on, each given a
wrong label: the examples a model can only fit by memorising them) are each inserted into
one site's labelled training data with probability 1/2. The site then fine-tunes exactly as
the run did, with the same `SiteAlgo` code path (DP-SGD, clipping, noise planning and a
ledger of its own when the run used DP). Each canary is scored by minus its loss under its
canary label; the auditor guesses "member" for the highest scores and "non-member" for the
lowest, and `medfed.privacy.empirical` turns the number of correct guesses into a lower
bound on epsilon that holds with probability 1 - beta.

A lower bound above zero for a non-DP model shows the audit has power; for a DP model it
must stay below the accountant's epsilon (a bound above it would mean the accounting or the
implementation is wrong).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfed.config import RunConfig
from medfed.constants import DPScope, TaskType
from medfed.data.partition import SPLIT_FILE, SitePlan
from medfed.data.site import SiteData, site_from_split
from medfed.data.sources import load_dataset
from medfed.data.stores import ConcatImages, ImageStore, TensorImages
from medfed.devices import resolve_device
from medfed.exceptions import ConfigError, PrivacyBudgetExceeded
from medfed.models.heads import Classifier
from medfed.privacy.empirical import AuditResult, audit_from_scores, canary_inclusion
from medfed.privacy.guard import PrivacyGuard, SitePrivacy
from medfed.task.algo import SiteAlgo, logits_of
from medfed.task.model_setup import derive_seed, initial_encoder_state, new_classifier

PRETRAINED = "pretrained_encoder.safetensors"


@dataclass(frozen=True)
class EmpiricalResult:
    dp: bool
    site: int
    num_canaries: int
    num_inserted: int
    epsilon_lower_bound: float
    accountant_epsilon: float  # inf without DP
    delta: float
    beta: float
    guesses: int
    correct: int
    rounds: int
    seconds: float

    @property
    def consistent(self) -> bool:
        """The empirical bound never exceeds the accountant's epsilon."""
        return self.epsilon_lower_bound <= self.accountant_epsilon

    def describe(self) -> str:
        acc = "no DP (epsilon unbounded)" if not self.dp else f"accountant epsilon {self.accountant_epsilon:.3g}"
        return (
            f"site {self.site}: {self.num_canaries} mislabelled canaries, {self.num_inserted} inserted, "
            f"{self.rounds} rounds; {self.correct}/{self.guesses} membership guesses correct -> empirical "
            f"epsilon >= {self.epsilon_lower_bound:.3f} with probability {1 - self.beta:.0%} "
            f"(delta {self.delta:g}); {acc}"
        )


def canary_labels(true: torch.Tensor, task: TaskType, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A wrong label for each canary: another class (single-label) or every label flipped (multi-label)."""
    if task == TaskType.MULTILABEL:
        return 1 - true
    shift = torch.randint(1, num_classes, (len(true), 1), generator=gen)
    return (true + shift) % num_classes


def with_canaries(site: SiteData, images: torch.Tensor, labels: torch.Tensor, inserted: np.ndarray) -> SiteData:
    keep = torch.as_tensor(np.flatnonzero(inserted), dtype=torch.long)
    return dataclasses.replace(
        site,
        labelled_images=ConcatImages(site.labelled_images, TensorImages(images[keep])),
        labelled_labels=torch.cat([site.labelled_labels, labels[keep]]),
    )


def canary_scores(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Minus each canary's loss under its canary label (higher = more likely a member)."""
    logits = logits_of(model, images)
    with torch.no_grad():
        if model.task == TaskType.MULTILABEL:
            losses = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, labels.float(), reduction="none"
            ).mean(1)
        else:
            losses = torch.nn.functional.cross_entropy(logits, labels[:, 0], reduction="none")
    return (-losses).numpy().astype(np.float64)


def audit_site_training(
    cfg: RunConfig, site: SiteData, pool_images: ImageStore | torch.Tensor, pool_labels: torch.Tensor, *,
    encoder_state: dict[str, torch.Tensor], num_canaries: int, rounds: int, beta: float = 0.05,
    device: torch.device | None = None,
) -> EmpiricalResult:
    """Insert canaries into ``site``, fine-tune ``rounds`` rounds as the run would, score, bound."""
    if num_canaries <= 0:  # default: up to 500, as many as the test split holds
        num_canaries = min(500, len(pool_images))
    if num_canaries < 2 or num_canaries > len(pool_images):
        raise ConfigError(f"canaries must be in [2, {len(pool_images)}] (the official test split); got {num_canaries}")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(derive_seed(cfg.experiment.seed, "canaries"))
    pick = torch.randperm(len(pool_images), generator=gen)[:num_canaries]
    images = pool_images[pick]
    labels = canary_labels(pool_labels[pick], site.task, site.num_classes, gen)
    inserted = canary_inclusion(num_canaries, derive_seed(cfg.experiment.seed, "canary-inclusion") % (2**32))
    audited = with_canaries(site, images, labels, inserted)
    private = DPScope(cfg.privacy.scope).covers_finetune
    with tempfile.TemporaryDirectory(prefix="medfed-canary-ledger-") as tmp:
        run = cfg.replace(dp=DPScope.FINETUNE.value if private else DPScope.NONE.value, finetune_rounds=rounds,
                          mode="local-only")
        guard = (PrivacyGuard(SitePrivacy.resolve(run, str(site.site_id), {}, Path(tmp)), "empirical-audit")
                 if private else None)
        algo = SiteAlgo(run, audited, guard, device)
        state = new_classifier(run, site.spec, site.task, site.num_classes, encoder_state).state_dict()
        trained = 0
        for rnd in range(1, rounds + 1):
            try:
                shared, _ = algo.finetune_round(state, rnd)
            except PrivacyBudgetExceeded:  # the site stops at its budget, as in the run
                break
            state.update(shared)
            trained = rnd
        accountant_epsilon = guard.spent() if guard is not None else math.inf
    model = algo.classifier(state)
    result: AuditResult = audit_from_scores(
        canary_scores(model, images, labels), inserted, delta=cfg.privacy.delta, beta=beta
    )
    return EmpiricalResult(
        dp=private, site=site.site_id, num_canaries=num_canaries, num_inserted=int(inserted.sum()),
        epsilon_lower_bound=result.epsilon_lower_bound, accountant_epsilon=accountant_epsilon, delta=cfg.privacy.delta,
        beta=beta, guesses=result.num_guesses, correct=result.num_correct, rounds=trained,
        seconds=time.perf_counter() - start,
    )


def run_empirical_audit(run_dir: Path, *, num_canaries: int = 0, site_id: int = 0, rounds: int | None = None,
                        dp: str | None = None, device: str | None = None) -> EmpiricalResult:
    """Replay a run's fine-tuning at one site with canaries (its settings, split and pretrained encoder).

    ``dp`` overrides the run's DP scope (e.g. ``"none"`` to show the audit's power); ``device`` the run's device
    setting (the audit may run on another machine than the run).

    Raises:
        ConfigError: a site the run does not have, or a device this machine does not have.
    """
    flat = json.loads((run_dir / "config.json").read_text())
    cfg = RunConfig.from_flat(flat)
    if dp is not None:
        cfg = cfg.replace(dp=dp)
    torch_device = resolve_device(device or cfg.compute.device)
    data = load_dataset(cfg)
    plan = SitePlan.load(run_dir / SPLIT_FILE)
    if not 0 <= site_id < len(plan.sites):
        raise ConfigError(f"site {site_id} is not one of the run's {len(plan.sites)} sites")
    site = site_from_split(data, plan.sites[site_id])
    pretrained = sorted((run_dir / "arms").glob(f"*/{PRETRAINED}"))
    main_arm = f"{cfg.experiment.mode}-{cfg.ssl.method}"
    chosen = [p for p in pretrained if p.parent.name == main_arm] or pretrained
    if chosen and cfg.ssl.methods:
        from safetensors.torch import load_file

        encoder_state = load_file(str(chosen[0]))
    else:
        encoder_state = initial_encoder_state(cfg, site.spec)
    return audit_site_training(
        cfg, site, data.test.images, torch.as_tensor(data.test.labels), encoder_state=encoder_state,
        num_canaries=num_canaries,
        rounds=rounds or cfg.finetune_recipe.rounds, device=torch_device,
    )
