"""What one site holds: its train images (for pretraining), its labelled subset, its validation data, and its
share of the test split (federated evaluation of a site that got no validation data evaluates on it).

A site is built from a `SitePlan` partition (simulation), from all sites pooled
(centralized baseline), or from the site's own data (deployment: the whole train split of its
own file or table is the site's, and its labelled fraction is drawn locally). Images are views of
the dataset's `ImageStore`s: nothing is read until a batch is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medfed.constants import TaskType
from medfed.data.dataset import Dataset
from medfed.data.partition import SitePlan, SiteSplit, make_site_plan
from medfed.data.stores import ImageStore
from medfed.models.encoders import InputSpec

POOLED_SITE_ID = -1


@dataclass(frozen=True)
class SiteData:
    """Images read on demand as float32 in [0, 1] ``(B, C, *S)`` (``images[idx]``) and int64 labels ``(N, K)``."""

    site_id: int
    train_images: ImageStore
    labelled_images: ImageStore
    labelled_labels: torch.Tensor
    val_images: ImageStore
    val_labels: torch.Tensor
    task: TaskType
    num_classes: int
    test_images: ImageStore | None = None  # the site's share of the test split (None: not known here)
    test_labels: torch.Tensor | None = None

    @property
    def spec(self) -> InputSpec:
        return InputSpec(self.train_images.channels, self.train_images.spatial_shape)


def _indices(values: list[int] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)  # an empty list stays an index array


def site_from_split(data: Dataset, site: SiteSplit) -> SiteData:
    return _site(data, site.site_id, _indices(site.train), _indices(site.labelled), _indices(site.val),
                 _indices(site.test))


def pooled_site(data: Dataset, plan: SitePlan) -> SiteData:
    """All sites' data together: the centralized baseline sees exactly what the sites hold."""
    def cat(attr: str) -> np.ndarray:
        return np.sort(np.concatenate([_indices(getattr(s, attr)) for s in plan.sites]))

    return _site(data, POOLED_SITE_ID, cat("train"), cat("labelled"), cat("val"), cat("test"))


def site_from_own_file(data: Dataset, site_id: int, label_fraction: float, seed: int) -> SiteData:
    """Deployment: this site's own data; its labelled subset is drawn with the run seed. Its test split is not part
    of the site (no test share): a deployed site is never evaluated on its own held-out test data by weights a server
    chose, which would make it an oracle for the server."""
    plan = make_site_plan(
        data.train.labels, data.val.labels, data.task, scheme="iid", num_sites=1, alpha=1.0,
        label_fraction=label_fraction, seed=seed, min_site_size=1,
    )
    only = plan.sites[0]
    return _site(data, site_id, _indices(only.train), _indices(only.labelled), _indices(only.val), None)


def _site(data: Dataset, site_id: int, train: np.ndarray, labelled: np.ndarray, val: np.ndarray,
          test: np.ndarray | None) -> SiteData:
    return SiteData(
        site_id=site_id,
        train_images=data.train.images.subset(train),
        labelled_images=data.train.images.subset(labelled),
        labelled_labels=torch.as_tensor(data.train.labels[labelled]),
        val_images=data.val.images.subset(val),
        val_labels=torch.as_tensor(data.val.labels[val]),
        task=data.task,
        num_classes=data.num_classes,
        test_images=None if test is None else data.test.images.subset(test),
        test_labels=None if test is None else torch.as_tensor(data.test.labels[test]),
    )
