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
from medfed.constants import DPScope, EncoderKind, PartitionScheme, Phase
from medfed.data.dataset import Dataset
from medfed.data.partition import SitePlan, make_natural_plan, make_site_plan
from medfed.data.sources import load_dataset
from medfed.devices import prepare_device, resolve_device
from medfed.exceptions import ConfigError
from medfed.experiment.memory import fit_pretrain_batch
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
    data: Dataset
    plan: SitePlan | None  # None in a deployment (site-data own): the sites' data are theirs
    test: TestSet


def prepare(cfg: RunConfig) -> Prepared:
    """Check the settings fit the methods, load and check the data, make the partition, check the model fits the
    data and the pretraining batch fits the sites' memory: no writes (but a table's cases enter the cache).
    ``Prepared.cfg`` is ``cfg`` with its automatic settings decided (the pretraining batch)."""
    check_methods_fit(cfg)  # before any download
    prepare_device(resolve_device(cfg.compute.device))  # a GPU asked for and not there: refused before anything
    data = load_dataset(cfg)  # every case read and checked (a table's into the cache), nothing written beside it
    spec = InputSpec(data.channels, data.spatial_shape)
    kind = resolve_encoder_kind(cfg.model.encoder, cfg.ssl.methods)
    if kind == EncoderKind.VIT:
        vit_patch_size(spec)  # raises ConfigError when no patch size divides the image
    initial_encoder_state(cfg, spec)  # raises ConfigError when encoder-init does not fit
    check_loss_fits_task(cfg, data.task)
    check_out_dir(Path(cfg.output.out_dir).expanduser())
    cfg = fit_pretrain_batch(cfg, spec)  # the pretraining batch the sites' memory holds (decided here, sent out)
    # deployment: every site reads its own file; the server holds only its test split
    if cfg.dataset.site_data == "own":
        test = TestSet(data.test.images, torch.as_tensor(data.test.labels), data.task, data.num_classes)
        return Prepared(cfg, data, None, test)
    plan = make_plan(cfg, data)
    check_delta_fits_sites(cfg, plan)
    test = TestSet(
        data.test.images, torch.as_tensor(data.test.labels), data.task,
        data.num_classes, site_indices={s.site_id: np.asarray(s.test, dtype=np.int64) for s in plan.sites},
    )
    return Prepared(cfg, data, plan, test)


def with_natural_sites(cfg: RunConfig, *, num_sites_given: bool) -> RunConfig:
    """With ``partition natural`` and num-sites not given, num-sites becomes the number of hospitals the table
    names (read from the table alone, no image opened); otherwise ``cfg`` as it is (a given num-sites that differs
    is refused by `make_plan`)."""
    if cfg.dataset.partition != PartitionScheme.NATURAL or num_sites_given:
        return cfg
    from medfed.data.datalists import is_table_source, read_source

    if not is_table_source(cfg.dataset.source):
        return cfg  # make_plan says natural needs a table
    names = read_source(cfg.dataset.source, num_classes=cfg.dataset.num_classes).sites
    return cfg.replace(num_sites=len(names)) if names else cfg


def make_plan(cfg: RunConfig, data: Dataset) -> SitePlan:
    """The partition of ``data`` into the run's sites: ``natural`` from a table's hospitals (then num-sites must be
    their number), else cut by the run's scheme.

    Raises:
        ConfigError: natural sites with num-sites other than the number of hospitals.
        SplitError: a partition that cannot be made.
    """
    if cfg.dataset.partition == PartitionScheme.NATURAL:
        if data.site_names and cfg.dataset.num_sites != len(data.site_names):
            raise ConfigError(f"partition natural: the table names {len(data.site_names)} hospitals "
                              f"({', '.join(data.site_names)}) but num-sites is {cfg.dataset.num_sites}; set "
                              f"--num-sites {len(data.site_names)}")
        return make_natural_plan(data.train.sites, data.val.sites, data.test.sites, data.site_names,
                                 data.train.labels, label_fraction=cfg.dataset.label_fraction,
                                 seed=cfg.experiment.seed, data_sha256=data.sha256,
                                 min_site_size=cfg.dataset.min_site_size)
    return make_site_plan(
        data.train.labels, data.val.labels, data.task, test_labels=data.test.labels, scheme=cfg.dataset.partition,
        num_sites=cfg.dataset.num_sites,
        alpha=cfg.dataset.alpha, label_fraction=cfg.dataset.label_fraction, seed=cfg.experiment.seed,
        data_sha256=data.sha256,
        min_site_size=cfg.dataset.min_site_size,
    )


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
