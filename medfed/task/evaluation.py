"""Server-side evaluation of the global model on the official test split (the benchmark's number).

In simulation the coordinating server reads the public test split of the benchmark file;
site-held validation data are evaluated at the sites (federated evaluation).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import torch

from medfed.config import RunConfig
from medfed.constants import TaskType
from medfed.data.stores import ImageStore
from medfed.devices import resolve_device
from medfed.models.encoders import InputSpec
from medfed.task.algo import logits_of, metrics_from_logits
from medfed.task.calibration import Threshold
from medfed.task.model_setup import new_classifier


@dataclass(frozen=True)
class TestSet:
    images: ImageStore  # (N, C, *S) in [0, 1], read a batch at a time
    labels: torch.Tensor  # (N, K)
    task: TaskType
    num_classes: int
    site_indices: dict[int, np.ndarray] = field(default_factory=dict)  # each site's share (per-site metrics)

    @property
    def spec(self) -> InputSpec:
        return InputSpec(self.images.channels, self.images.spatial_shape)


def evaluate_state(cfg: RunConfig, test: TestSet, classifier_state: dict[str, torch.Tensor],
                   threshold: Threshold | None = None) -> dict[str, float]:
    """Metrics of a classifier (given by its weights) on the whole test set."""
    return evaluate_with_sites(cfg, test, classifier_state, threshold, sites=())[0]


def evaluate_with_sites(
    cfg: RunConfig, test: TestSet, classifier_state: dict[str, torch.Tensor], threshold: Threshold | None = None,
    *, sites: Collection[int] | None = None,
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Metrics on the whole test set and on the share of it of each of ``sites`` (None: every site; a site with no
    test share has none), in one forward pass; with a ``threshold`` calibrated on validation data, also the metrics
    at it (binary tasks). The per-site metrics cost one evaluation per site named: a caller with many sites names
    those that matter this round (`medfed.experiment.phases`)."""
    model = new_classifier(cfg, test.spec, test.task, test.num_classes, None)
    model.load_state_dict(classifier_state)
    logits = logits_of(model.to(resolve_device(cfg.compute.device)), test.images)
    overall = metrics_from_logits(model, logits, test.labels, threshold)
    chosen = test.site_indices if sites is None else {s: test.site_indices[s] for s in sites
                                                      if s in test.site_indices}
    per_site = {
        site: metrics_from_logits(model, logits[idx], test.labels[idx], threshold)
        for site, idx in chosen.items()
        if len(idx)
    }
    return overall, per_site
