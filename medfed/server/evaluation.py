"""Server-side evaluation of the global model on the official test split (the benchmark's number).

In simulation the coordinating server reads the public test split of the benchmark file;
site-held validation data are evaluated at the sites (federated evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medfed.client.algo import evaluate, new_classifier
from medfed.config import RunConfig
from medfed.constants import TaskType
from medfed.models.encoders import InputSpec


@dataclass(frozen=True)
class TestSet:
    images: torch.Tensor  # (N, C, *S) in [0, 1]
    labels: torch.Tensor  # (N, K)
    task: TaskType
    num_classes: int

    @property
    def spec(self) -> InputSpec:
        return InputSpec(int(self.images.shape[1]), tuple(int(s) for s in self.images.shape[2:]))


def evaluate_state(cfg: RunConfig, test: TestSet, classifier_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics of a classifier (given by its weights) on the test set."""
    model = new_classifier(cfg, test.spec, test.task, test.num_classes, None)
    model.load_state_dict(classifier_state)
    return evaluate(model, test.images, test.labels)
