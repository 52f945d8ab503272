"""What one site holds: its train images (for pretraining), its labelled subset, its validation data.

A site is built from a `SitePlan` partition (simulation), from all sites pooled
(centralized baseline), or from the site's own MedMNIST-style file (deployment: the whole
official train split of that file is the site's, and its labelled fraction is drawn locally).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medfed.constants import TaskType
from medfed.data.medmnist import MedMNISTData
from medfed.data.partition import SitePlan, SiteSplit, make_site_plan
from medfed.data.transforms import scale_intensity
from medfed.models.encoders import InputSpec

POOLED_SITE_ID = -1


@dataclass(frozen=True)
class SiteData:
    """Float images in [0, 1] ``(N, C, *S)`` and int64 labels ``(N, K)``."""

    site_id: int
    train_images: torch.Tensor
    labelled_images: torch.Tensor
    labelled_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    task: TaskType
    num_classes: int

    @property
    def spec(self) -> InputSpec:
        return InputSpec(int(self.train_images.shape[1]), tuple(int(s) for s in self.train_images.shape[2:]))


def site_from_split(data: MedMNISTData, site: SiteSplit) -> SiteData:
    return _site(data, site.site_id, np.asarray(site.train), np.asarray(site.labelled), np.asarray(site.val))


def pooled_site(data: MedMNISTData, plan: SitePlan) -> SiteData:
    """All sites' data together: the centralized baseline sees exactly what the sites hold."""
    def cat(attr: str) -> np.ndarray:
        return np.sort(np.concatenate([np.asarray(getattr(s, attr)) for s in plan.sites]))

    return _site(data, POOLED_SITE_ID, cat("train"), cat("labelled"), cat("val"))


def site_from_own_file(data: MedMNISTData, site_id: int, label_fraction: float, seed: int) -> SiteData:
    """Deployment: this site's own file; its labelled subset is drawn with the run seed."""
    plan = make_site_plan(
        data.train.labels, data.val.labels, data.task, scheme="iid", num_sites=1, alpha=1.0,
        label_fraction=label_fraction, seed=seed, min_site_size=1,
    )
    only = plan.sites[0]
    return _site(data, site_id, np.asarray(only.train), np.asarray(only.labelled), np.asarray(only.val))


def _site(data: MedMNISTData, site_id: int, train: np.ndarray, labelled: np.ndarray, val: np.ndarray) -> SiteData:
    scale = data.intensity_range
    return SiteData(
        site_id=site_id,
        train_images=scale_intensity(data.train.images[train], scale),
        labelled_images=scale_intensity(data.train.images[labelled], scale),
        labelled_labels=torch.as_tensor(data.train.labels[labelled]),
        val_images=scale_intensity(data.val.images[val], scale),
        val_labels=torch.as_tensor(data.val.labels[val]),
        task=data.task,
        num_classes=data.num_classes,
    )
