"""Everything that can be wrong with an experiment's input, checked before anything is written.

`prepare` loads and checks the data file, makes the partition, checks the model fits the data and that
the settings fit the self-supervised methods, and that the output folder is writable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfed.config import RunConfig
from medfed.constants import DPScope, EncoderKind, Phase
from medfed.data.medmnist import MedMNISTData, load_medmnist
from medfed.data.partition import SitePlan, make_site_plan
from medfed.data.transforms import scale_intensity
from medfed.exceptions import ConfigError
from medfed.models.encoders import InputSpec, vit_patch_size
from medfed.privacy.accounting import check_budget
from medfed.selfsup.compat import check_methods_fit
from medfed.selfsup.registry import resolve_encoder_kind
from medfed.task.evaluation import TestSet
from medfed.task.model_setup import check_loss_fits_task, initial_encoder_state


@dataclass(frozen=True)
class Prepared:
    """A validated experiment, ready to run."""

    cfg: RunConfig
    data: MedMNISTData
    plan: SitePlan | None  # None in a deployment (site-data own): the sites' data are theirs
    test: TestSet


def prepare(cfg: RunConfig) -> Prepared:
    """Check the settings fit the methods, load and check the data, make the partition, check the model fits the
    data: no writes."""
    check_methods_fit(cfg)  # before any download
    data = load_medmnist(cfg.dataset.source)
    spec = InputSpec(data.channels, data.spatial_shape)
    kind = resolve_encoder_kind(cfg.model.encoder, cfg.ssl.methods)
    if kind == EncoderKind.VIT:
        vit_patch_size(spec)  # raises ConfigError when no patch size divides the image
    initial_encoder_state(cfg, spec)  # raises ConfigError when encoder-init does not fit
    check_loss_fits_task(cfg, data.task)
    check_out_dir(Path(cfg.output.out_dir).expanduser())
    # deployment: every site reads its own file; the server holds only its test split
    if cfg.dataset.site_data == "own":
        test = TestSet(scale_intensity(data.test.images, data.intensity_range), torch.as_tensor(data.test.labels),
                       data.task, data.num_classes)
        return Prepared(cfg, data, None, test)
    plan = make_site_plan(
        data.train.labels, data.val.labels, data.task, test_labels=data.test.labels, scheme=cfg.dataset.partition,
        num_sites=cfg.dataset.num_sites,
        alpha=cfg.dataset.alpha, label_fraction=cfg.dataset.label_fraction, seed=cfg.experiment.seed,
        data_sha256=data.sha256,
        min_site_size=cfg.dataset.min_site_size,
    )
    check_delta_fits_sites(cfg, plan)
    test = TestSet(
        scale_intensity(data.test.images, data.intensity_range), torch.as_tensor(data.test.labels), data.task,
        data.num_classes, site_indices={s.site_id: np.asarray(s.test, dtype=np.int64) for s in plan.sites},
    )
    return Prepared(cfg, data, plan, test)


def check_delta_fits_sites(cfg: RunConfig, plan: SitePlan) -> None:
    """Under DP every site's delta must be below 1/n for the n examples its DP phases train on."""
    if cfg.privacy.scope == DPScope.NONE:
        return
    scope = DPScope(cfg.privacy.scope)
    for site in plan.sites:
        sizes = []
        if scope.covers(Phase.PRETRAIN) and cfg.ssl.methods:
            sizes.append(len(site.train))
        if scope.covers(Phase.FINETUNE):
            sizes.append(len(site.labelled))
        for n in sizes:
            try:
                check_budget(cfg.privacy.epsilon, cfg.privacy.delta, site_size=n)
            except ConfigError as exc:
                raise ConfigError(f"site {site.site_id}: {exc}") from None


def check_out_dir(out: Path) -> None:
    """The output folder must be a writable folder (or creatable under one)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out-dir {str(out)!r}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out-dir {str(out)!r}: {str(existing)!r} is not writable")
